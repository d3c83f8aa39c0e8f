"""Loading what an export reads: the PyTorch model and its processor, from a hub id, a folder or `tiny`."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .families import Family, UnsupportedModelError, check_supported, default_chat_template


@dataclass
class Checkpoint:
    model: object  # LlavaNextForConditionalGeneration in eval mode: fp32, or its decoder as stored (`load_checkpoint`)
    processor: object  # LlavaNextProcessor
    family: Family
    source: str  # what the user named
    revision: str | None  # the hub commit, where known
    chat_template_origin: str = "checkpoint"  # "checkpoint", "registry:<name>" (export/templates/<name>.jinja) or "none"


def load_checkpoint(name: str, revision: str | None = None, stored_dtype: bool = False, check_config: Callable[[Any], None] | None = None) -> Checkpoint:
    """`name`: a hub id, a local checkpoint folder (llava-hf or transformers-5 layout), or "tiny". `check_config`
    sees the model's config before any weight loads (and may raise).

    The model is fp32, unless `stored_dtype`: then the decoder keeps the dtype the weights are stored in (fp16
    or bf16 for the llava-hf checkpoints), memory-mapped, and only the small vision tower, projector and image
    newline are brought to fp32. The fused exporter converts decoder weights one at a time, and PyTorch runs
    such a model in fp32 under `computing_in_fp32`, so PyTorch never holds a converted copy of the decoder.
    """
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

    name, local = model_source(name, revision)
    if name == "tiny":
        if Path("tiny").is_dir():  # "tiny" always names the built-in model: say so where it could mean that folder
            print(
                f"ortllava-export: warning: --model tiny is the built-in tiny random model, not the folder {Path('tiny').resolve()}; "
                "to export that folder, pass --model ./tiny",
                file=sys.stderr,
            )
        from .tiny import TinySpec, build_model, build_processor, build_tokenizer

        spec = TinySpec()
        tokenizer = build_tokenizer(spec.family, byte_fallback=spec.byte_fallback)
        model = build_model(spec, tokenizer)
        if check_config is not None:
            check_config(model.config)
        return Checkpoint(model, build_processor(spec, tokenizer), check_supported(model.config), "tiny", None)

    # Offline (no network, or HF_HUB_OFFLINE), a hub id is read from the local cache only: huggingface_hub would
    # otherwise retry every file for ~30 s before falling back to the cache or failing.
    offline = None if local else hub_unreachable()
    hub = dict(revision=revision, local_files_only=offline is not None)
    try:
        config = AutoConfig.from_pretrained(name, **hub)
    except OSError as error:  # not a folder, and not a hub id that can be fetched (or is cached) here
        if local:
            where = "its config.json is unreadable"
        elif offline:
            where = f"there is no such folder here, it is not in the Hugging Face cache, and the hub cannot be reached ({offline})"
        else:
            where = "there is no such folder here, and as a hub id it failed"
        if not local and Path(name.split("/")[0]).is_dir():  # perhaps a mistyped path rather than a hub id
            where += f"; if you meant a path: {name.split('/')[0]} is a folder here, but it has no {name.split('/', 1)[1]}"
        raise FileNotFoundError(f"cannot load the model '{name}': {where} ({error})") from error
    except ValueError as error:  # e.g. a model type this transformers does not know, or config.json is not JSON
        raise UnsupportedModelError(f"cannot read the configuration of '{name}': {error}") from error
    family = check_supported(config)
    if check_config is not None:
        check_config(config)
    # Damaged files (a half-downloaded safetensors, a missing tokenizer) raise many types: each is named as the
    # part of the checkpoint it broke.
    try:
        processor = AutoProcessor.from_pretrained(name, **hub)
    except (ImportError, MemoryError):  # a missing package or memory is not a damaged file
        raise
    except Exception as error:  # noqa: BLE001
        raise FileNotFoundError(f"cannot load the processor of '{name}' (tokenizer and preprocessor files): {error}") from error
    try:
        model = LlavaNextForConditionalGeneration.from_pretrained(name, **hub, dtype="auto" if stored_dtype else torch.float32).eval()
    except (ImportError, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001
        raise FileNotFoundError(f"cannot load the weights of '{name}': {error}") from error
    if stored_dtype:
        model.model.vision_tower.float()
        model.model.multi_modal_projector.float()
        model.model.image_newline.data = model.model.image_newline.data.float()
    commit = None if local else (_cached_commit(name, revision) or revision)
    origin = "checkpoint" if processor.chat_template else apply_default_template(processor, config.text_config.model_type, name)
    return Checkpoint(model, processor, family, name, commit, origin)


def model_source(name: str, revision: str | None = None) -> tuple[str, bool]:
    """`--model` checked without loading anything (the CLI calls it before importing torch): `(name, local)`, the
    name with `~` expanded and whether it is a local folder. Raises FileNotFoundError for a file, a folder that is
    not a checkpoint, a `--revision` given with a folder, and a name that can only be a path to a missing folder
    (rather than spend the hub's retries on it as a hub id)."""
    if name == "tiny":
        if revision:
            raise FileNotFoundError(f"--revision {revision} names a hub revision, but 'tiny' is built here: leave it out")
        return name, False
    name = os.path.expanduser(name)
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{name} is a file, not a checkpoint folder: pass the checkpoint's folder (the one with config.json)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name} is a folder without config.json: not a Hugging Face checkpoint")
        if revision:
            raise FileNotFoundError(f"--revision {revision} names a hub revision, but {name} is a local folder: leave it out")
        return name, True
    # A LLaVA-NeXT hub id is `owner/name`; anything else that is not here is a path to a folder that does not exist.
    parts = name.split("/")
    if name.startswith(("/", ".", "~")) or "\\" in name or len(parts) != 2 or not all(parts):
        hint = " (a hub id is owner/name, such as llava-hf/llava-v1.6-mistral-7b-hf)" if len(parts) == 1 or "://" in name else ""
        raise FileNotFoundError(f"cannot load the model '{name}': there is no such folder{hint}")
    return name, False


def _cached_commit(name: str, revision: str | None) -> str | None:
    """The hub commit a hub id's files were just read at: the snapshot folder of its cached config.json
    (transformers 5 no longer keeps it on the config), or None."""
    import re

    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(name, "config.json", revision=revision)
    found = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]", path) if isinstance(path, str) else None
    return found.group(1) if found else None


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here (offline mode, or its host, huggingface.co or
    HF_ENDPOINT's, does not resolve), or None. Behind an HTTPS proxy the proxy resolves the host, so there is no
    probe; a host that resolves but is blocked is left to huggingface_hub's own timeouts."""
    import socket
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "offline mode is set (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    proxies = urllib.request.getproxies()
    if (proxies.get("https") or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as error:
        return f"{host} does not resolve: {error}"
    return None


@contextmanager
def computing_in_fp32(model):
    """Within the block, `model` computes exactly as its fp32 copy would (what transformers loads with
    `dtype=torch.float32`), while its weights stay stored as they are.

    Each module with fp16 or bf16 weights of its own gets them as fp32 copies for the length of its forward, then
    its stored tensors back (still memory-mapped), so the converted weights held at any time are one module's own
    (a linear layer's, the embedding table's). Widening fp16 or bf16 to fp32 is exact, and the embedding's fp32
    output makes every activation fp32 from there on, so the outputs are bit for bit those of the fp32 model (a
    test compares them), at the cost of converting each weight once per forward. A model that is all fp32 runs
    unchanged.
    """
    import torch

    if odd := [name for name, b in model.named_buffers() if b.is_floating_point() and b.dtype != torch.float32]:
        raise UnsupportedModelError(
            f"cannot compute as the fp32 model would: this transformers loads buffers {', '.join(odd)} in a narrower dtype "
            "(their fp32 values are lost); export with --decoder concat, which loads the model in fp32"
        )
    # module -> its own (not its children's) parameters stored in another float dtype
    narrow = {m: ps for m in model.modules() if (ps := [p for p in m.parameters(recurse=False) if p.is_floating_point() and p.dtype != torch.float32])}
    stored: dict = {}  # module -> its stored tensors, while its forward runs

    def widen(module, args) -> None:
        stored[module] = [p.data for p in narrow[module]]
        for p in narrow[module]:
            p.data = p.data.float()

    def restore(module, args, output) -> None:
        for p, data in zip(narrow[module], stored.pop(module)):
            p.data = data

    handles = [hook for m in narrow for hook in (m.register_forward_pre_hook(widen), m.register_forward_hook(restore, always_call=True))]
    try:
        yield model
    finally:
        for hook in handles:
            hook.remove()


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
