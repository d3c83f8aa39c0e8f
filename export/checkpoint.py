"""Loading what an export reads: the PyTorch model and its processor, from a hub id, a folder or `tiny`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .families import Family, check_supported


@dataclass
class Checkpoint:
    model: object  # LlavaNextForConditionalGeneration, fp32, eval mode
    processor: object  # LlavaNextProcessor
    family: Family
    source: str  # what the user named
    revision: str | None  # the hub commit, where known


def load_checkpoint(name: str, revision: str | None = None) -> Checkpoint:
    """`name`: a hub id, a local checkpoint folder (llava-hf or transformers-5 layout), or "tiny"."""
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

    if name == "tiny":
        from .tiny import TinySpec, build_model, build_processor, build_tokenizer

        spec = TinySpec()
        tokenizer = build_tokenizer(spec.family)
        model = build_model(spec, tokenizer)
        return Checkpoint(model, build_processor(spec, tokenizer), check_supported(model.config), "tiny", None)

    if Path(name).exists() and not Path(name, "config.json").is_file():
        raise FileNotFoundError(f"{name} is a folder without config.json: not a Hugging Face checkpoint")
    config = AutoConfig.from_pretrained(name, revision=revision)
    family = check_supported(config)
    processor = AutoProcessor.from_pretrained(name, revision=revision)
    model = LlavaNextForConditionalGeneration.from_pretrained(name, revision=revision, dtype=torch.float32).eval()
    commit = getattr(config, "_commit_hash", None) or revision
    return Checkpoint(model, processor, family, name, commit)
