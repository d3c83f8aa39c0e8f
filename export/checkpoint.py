"""Loading what an export reads: the PyTorch model and its processor, from a hub id, a folder or `tiny`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .families import Family, UnsupportedModelError, check_supported, default_chat_template


@dataclass
class Checkpoint:
    model: object  # LlavaNextForConditionalGeneration, fp32, eval mode
    processor: object  # LlavaNextProcessor
    family: Family
    source: str  # what the user named
    revision: str | None  # the hub commit, where known
    chat_template_origin: str = "checkpoint"  # "checkpoint", "registry:<name>" (models/templates/<name>.jinja) or "none"


def load_checkpoint(name: str, revision: str | None = None, stored_dtype: bool = False, check_config: Callable[[Any], None] | None = None) -> Checkpoint:
    """`name`: a hub id, a local checkpoint folder (llava-hf or transformers-5 layout), or "tiny". `check_config`
    sees the model's config before any weight loads (and may raise).

    The model is fp32 (the validation reference), unless `stored_dtype`: then the decoder keeps the dtype the
    weights are stored in (fp16 for the llava-hf checkpoints), memory-mapped, and only the small vision tower,
    projector and image newline are brought to fp32. The exporter converts decoder weights one at a time, so
    an unvalidated export never holds a converted copy of the decoder.
    """
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

    if name == "tiny":
        from .tiny import TinySpec, build_model, build_processor, build_tokenizer

        spec = TinySpec()
        tokenizer = build_tokenizer(spec.family)
        model = build_model(spec, tokenizer)
        if check_config is not None:
            check_config(model.config)
        return Checkpoint(model, build_processor(spec, tokenizer), check_supported(model.config), "tiny", None)

    if Path(name).exists() and not Path(name, "config.json").is_file():
        raise FileNotFoundError(f"{name} is a folder without config.json: not a Hugging Face checkpoint")
    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except OSError as error:  # not a folder, and not a hub id that can be fetched (or is cached) here
        raise FileNotFoundError(
            f"cannot load the model '{name}': it is not a local checkpoint folder, and as a hub id it failed ({error})"
        ) from error
    except ValueError as error:  # e.g. a model type this transformers does not know
        raise UnsupportedModelError(f"cannot read the configuration of '{name}': {error}") from error
    family = check_supported(config)
    if check_config is not None:
        check_config(config)
    try:
        processor = AutoProcessor.from_pretrained(name, revision=revision)
    except OSError as error:
        raise FileNotFoundError(f"cannot load the processor of '{name}' (tokenizer and preprocessor files): {error}") from error
    try:
        model = LlavaNextForConditionalGeneration.from_pretrained(name, revision=revision, dtype="auto" if stored_dtype else torch.float32).eval()
    except OSError as error:
        raise FileNotFoundError(f"cannot load the weights of '{name}': {error}") from error
    if stored_dtype:
        model.model.vision_tower.float()
        model.model.multi_modal_projector.float()
        model.model.image_newline.data = model.model.image_newline.data.float()
    commit = getattr(config, "_commit_hash", None) or revision
    origin = "checkpoint" if processor.chat_template else apply_default_template(processor, config.text_config.model_type, name)
    return Checkpoint(model, processor, family, name, commit, origin)


def apply_default_template(processor, text_model_type: str, name: str) -> str:
    """Gives a processor without a chat template its family's default from the registry; says so on stderr.

    Returns the origin recorded in the bundle's provenance: "registry:<name>", or "none" when the registry's
    folder is missing (the bundle then has no template, and the runtime asks for prompt strings).
    """
    default = default_chat_template(text_model_type, processor.tokenizer.get_vocab())
    if default.source is None:
        print(
            f"ortllava-export: note: {name} ships no chat template, and the registry's default ({default.name}) is "
            f"not available here ({default.path} is missing); the bundle will have no chat template",
            file=sys.stderr,
        )
        return "none"
    processor.chat_template = default.source
    print(
        f"ortllava-export: note: {name} ships no chat template; using the registry's default '{default.name}' "
        f"template ({default.path}) because {default.reason}",
        file=sys.stderr,
    )
    return f"registry:{default.name}"
