"""ortllava: LLaVA-NeXT on onnxruntime, without PyTorch.

    pipe = ortllava.load("models/bundles/tiny")
    result = pipe.generate(messages=[{"role": "user", "content": [{"type": "image", "path": "cat.jpg"},
                                                                  {"type": "text", "text": "What is this?"}]}])
    print(result.text)
"""

from .api import Pipeline, generate, load
from .chat import ChatSession
from .chat_template import ChatTemplateError
from .decoders import ContextLengthError
from .generate import GenerationMetrics, GenerationResult
from .settings import GenerationSettings, SettingError
from .hf_pipeline import pipeline
from .image_source import ImageLoadError
from .manifest import BundleError
from .runs import StreamChunk
from .warn import GenerationWarning

__version__ = "0.1.0"

__all__ = [
    "BundleError", "ChatSession", "ChatTemplateError", "ContextLengthError", "GenerationMetrics", "GenerationResult", "GenerationSettings", "GenerationWarning",
    "ImageLoadError", "Pipeline", "SettingError", "StreamChunk", "generate", "load", "pipeline", "__version__",
]
