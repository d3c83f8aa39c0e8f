"""The registry of checkpoint families the exporter supports (see models/README.md).

Besides the supported decoders and towers, the registry holds each family's default chat template
(`templates/<name>.jinja` beside this module, installed with it), used for checkpoints that ship none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' text_config.model_type
    examples: str  # checkpoints of this family


FAMILIES = {
    "mistral": Family("mistral", "llava-hf/llava-v1.6-mistral-7b-hf"),
    "llama": Family("llama", "llava-hf/llava-v1.6-vicuna-7b-hf, -13b, llava-hf/llava-v1.6-34b-hf, llava-hf/llama3-llava-next-8b-hf"),
    "qwen2": Family("qwen2", "llava-hf/llava-next-72b-hf, llava-hf/llava-next-110b-hf"),
    "granite": Family("granite", "ibm-granite/granite-vision-3.1-2b-preview, granite-vision-3.2-2b, granite-vision-3.3-2b"),
}
VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


class UnsupportedModelError(ValueError):
    pass


def check_supported(config) -> Family:
    """Raises `UnsupportedModelError` saying what is supported unless `config` is a LLaVA-NeXT we can export."""
    supported = ", ".join(f"{name} ({family.examples})" for name, family in FAMILIES.items())
    if getattr(config, "model_type", None) != "llava_next":
        raise UnsupportedModelError(
            f"model type {getattr(config, 'model_type', None)!r} is not LLaVA-NeXT; ortllava exports llava_next checkpoints "
            f"with these decoders: {supported}"
        )
    text_type = config.text_config.model_type
    if text_type not in FAMILIES:
        raise UnsupportedModelError(f"decoder {text_type!r} is not supported; supported decoders: {supported}")
    vision_type = config.vision_config.model_type
    if vision_type not in VISION_TOWERS:
        raise UnsupportedModelError(f"vision tower {vision_type!r} is not supported; supported towers: {', '.join(VISION_TOWERS)}")
    if vision_type == "clip_vision_model" and config.vision_feature_select_strategy == "full":
        # The CLS position would be one feature more per tile than the anyres grid has places for.
        raise UnsupportedModelError(
            "vision_feature_select_strategy 'full' keeps the CLIP tower's CLS position, which LLaVA-NeXT's anyres grid "
            "cannot place (transformers' own model fails on such images too); CLIP checkpoints use 'default'"
        )
    return FAMILIES[text_type]


# --------------------------------------------------------------------------------------------------
# Default chat templates

# The registry's templates: the package's templates/ folder, installed with it (ORTLLAVA_TEMPLATES overrides it).
TEMPLATES_DIR = Path(os.environ.get("ORTLLAVA_TEMPLATES", Path(__file__).resolve().parent / "templates"))
# The template of each decoder when the vocabulary does not say otherwise.
DECODER_TEMPLATES = {"mistral": "mistral", "llama": "vicuna", "qwen2": "chatml", "granite": "granite"}


@dataclass(frozen=True)
class DefaultTemplate:
    name: str  # the registry's name: templates/<name>.jinja
    reason: str  # why this one, in words
    path: Path
    source: str | None  # the template text; None when the registry's folder is not there


def default_template_name(text_model_type: str, vocab) -> tuple[str, str]:
    """(template name, reason) for a checkpoint of this decoder whose tokenizer has `vocab` (tokens)."""
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3", "the tokenizer has Llama-3's <|start_header_id|> and <|eot_id|>"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml", "the tokenizer has ChatML's <|im_start|> and <|im_end|> (Yi-34B, Qwen)"
    name = DECODER_TEMPLATES.get(text_model_type)
    if name is None:
        raise UnsupportedModelError(f"no default chat template for decoder {text_model_type!r}")
    return name, f"the decoder is {text_model_type!r}"


def default_chat_template(text_model_type: str, vocab) -> DefaultTemplate:
    """The registry's default chat template for a checkpoint that ships none."""
    name, reason = default_template_name(text_model_type, vocab)
    path = TEMPLATES_DIR / f"{name}.jinja"
    return DefaultTemplate(name, reason, path, path.read_text() if path.is_file() else None)
