"""Writing a bundle: arrays, tokenizer, configs, and the manifest with a sha256 per file."""

from __future__ import annotations

import datetime
import json
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from ortllava.bundle import manifest as m
from ortllava.bundle.manifest import GraphSpec, Manifest, TextSpec, TokenSpec, VisionSpec, sha256_file

from .checkpoint import Checkpoint

SCRATCH_MARK = m.EXPORT_SCRATCH_MARK  # in the scratch folder while an export writes it (not a bundle file)


def write_assets(checkpoint: Checkpoint, out: Path, dtype=np.float32) -> None:
    """Embedding table and image newline (in the decoder's activation `dtype`), tokenizer, chat template and
    configs, in Hugging Face formats."""
    model, processor = checkpoint.model, checkpoint.processor
    np.save(out / m.EMBED_TOKENS_FILE, model.get_input_embeddings().weight.detach().float().numpy().astype(dtype, copy=False))
    np.save(out / m.IMAGE_NEWLINE_FILE, model.model.image_newline.detach().float().numpy().astype(dtype, copy=False))
    with tempfile.TemporaryDirectory() as scratch:
        # save_pretrained writes the tokenizer pipeline transformers actually runs, whatever the source files were.
        processor.tokenizer.save_pretrained(scratch)
        for name in (m.TOKENIZER_FILE, m.TOKENIZER_CONFIG_FILE):
            (out / name).write_bytes((Path(scratch) / name).read_bytes())
    # The tokenizer's own chat template, as transformers loaded it for this checkpoint (it saves it apart from the
    # config, in a chat_template.jinja that the bundle's, the processor's, takes the place of): kept in the config,
    # where the runtime's tokenizer reads it for `tokenizer.apply_chat_template`.
    tokenizer_template = processor.tokenizer.chat_template
    if isinstance(tokenizer_template, dict):
        tokenizer_template = tokenizer_template.get("default")
    if tokenizer_template:
        tokenizer_config = json.loads((out / m.TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
        tokenizer_config["chat_template"] = tokenizer_template
        (out / m.TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8")
    template = processor.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        (out / m.CHAT_TEMPLATE_FILE).write_text(template)
    image_config = processor.image_processor.to_dict()
    (out / m.PREPROCESSOR_CONFIG_FILE).write_text(json.dumps(image_config, indent=2, default=list))
    processor_config = {
        "processor_class": "LlavaNextProcessor",
        "image_token": processor.image_token,
        "patch_size": processor.patch_size,
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        "num_additional_image_tokens": processor.num_additional_image_tokens,
    }
    (out / m.PROCESSOR_CONFIG_FILE).write_text(json.dumps(processor_config, indent=2))
    (out / m.GENERATION_CONFIG_FILE).write_text(json.dumps(model.generation_config.to_diff_dict(), indent=2))
    (out / m.MODEL_CONFIG_FILE).write_text(model.config.to_json_string())


def _eos_ids(checkpoint: Checkpoint) -> list[int]:
    eos = checkpoint.model.generation_config.eos_token_id
    if eos is None:
        eos = checkpoint.processor.tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def build_manifest(checkpoint: Checkpoint, graphs: dict[str, GraphSpec], out: Path, precision: str, validation: dict) -> Manifest:
    from .graphs.wrappers import feature_layers, text_geometry  # (torch: imported when used, so the CLI starts without it)

    model, processor = checkpoint.model, checkpoint.processor
    config, tokenizer = model.config, processor.tokenizer
    vision_config, text_config = config.vision_config, config.text_config
    layers, kv_heads, head_dim = text_geometry(config)
    backend_model = type(tokenizer.backend_tokenizer.model).__name__
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.generation_config.pad_token_id
    files = {
        path.name: sha256_file(path) for path in sorted(out.iterdir()) if path.is_file() and path.name not in (m.MANIFEST_FILE, SCRATCH_MARK)
    }
    return Manifest(
        schema_version=m.SCHEMA_VERSION,
        vision=VisionSpec(
            image_size=vision_config.image_size,
            patch_size=vision_config.patch_size,
            hidden_size=vision_config.hidden_size,
            feature_layers=feature_layers(config),
            select_strategy=config.vision_feature_select_strategy,
            grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            num_additional_image_tokens=processor.num_additional_image_tokens,
        ),
        text=TextSpec(
            architecture=type(model.model.language_model).__name__.replace("Model", "ForCausalLM"),
            model_type=text_config.model_type,
            hidden_size=text_config.hidden_size,
            num_layers=layers,
            num_attention_heads=text_config.num_attention_heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=model.lm_head.out_features,
            max_position_embeddings=text_config.max_position_embeddings,
        ),
        tokens=TokenSpec(
            image_token=processor.image_token,
            image_token_id=config.image_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_ids=_eos_ids(checkpoint),
            pad_token_id=pad_id,
            bos_token=tokenizer.bos_token,
            padding_side=tokenizer.padding_side,
            # transformers skips the clean-up for BPE models (it would strip real spaces before punctuation).
            clean_up_tokenization_spaces=bool(tokenizer.clean_up_tokenization_spaces) and backend_model != "BPE",
        ),
        graphs=graphs,
        special_tokens_map=dict(tokenizer.special_tokens_map),
        precision=precision,
        provenance=_provenance(checkpoint),
        files=files,
        validation=validation,
    )


def _provenance(checkpoint: Checkpoint) -> dict:
    versions = {}
    for package in ("ortllava", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "source": checkpoint.source,
        "revision": checkpoint.revision,
        "family": checkpoint.family.model_type,
        "chat_template": checkpoint.chat_template_origin,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
    }


def write_manifest(manifest: Manifest, out: Path) -> Path:
    path = out / m.MANIFEST_FILE
    path.write_text(manifest.to_json())
    return path
