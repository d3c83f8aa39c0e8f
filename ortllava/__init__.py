"""ortllava: LLaVA-NeXT on onnxruntime, without PyTorch.

    pipe = ortllava.load("models/bundles/tiny")
    result = pipe.generate(messages=[{"role": "user", "content": [{"type": "image", "path": "cat.jpg"},
                                                                  {"type": "text", "text": "What is this?"}]}])
    print(result.text)
"""

from .api import Pipeline, generate, load
from .bundle.manifest import BundleError
from .chat import ChatSession
from .decoders import ContextLengthError
from .generation.generate import GenerationMetrics, GenerationResult
from .generation.runs import StreamChunk
from .generation.settings import GenerationSettings, SettingError
from .hf_pipeline import pipeline
from .preprocess.chat_template import ChatTemplateError
from .preprocess.image_source import ImageLoadError
from .warn import GenerationWarning

__version__ = "0.1.0"

__all__ = [
    "BundleError", "ChatSession", "ChatTemplateError", "ContextLengthError", "GenerationMetrics", "GenerationResult", "GenerationSettings", "GenerationWarning",
    "ImageLoadError", "Pipeline", "SettingError", "StreamChunk", "generate", "load", "pipeline", "__version__",
]
