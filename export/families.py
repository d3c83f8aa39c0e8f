"""The registry of checkpoint families the exporter supports (see models/README.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' text_config.model_type
    examples: str  # checkpoints of this family


FAMILIES = {
    "mistral": Family("mistral", "llava-hf/llava-v1.6-mistral-7b-hf"),
    "llama": Family("llama", "llava-hf/llava-v1.6-vicuna-7b-hf, -13b, llava-hf/llava-v1.6-34b-hf, llava-hf/llama3-llava-next-8b-hf"),
    "qwen2": Family("qwen2", "llava-hf/llava-next-72b-hf, llava-hf/llava-next-110b-hf"),
}
VISION_TOWERS = ("clip_vision_model",)


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
    return FAMILIES[text_type]
