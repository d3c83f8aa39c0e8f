"""Shared fixtures: tiny random checkpoints (built in code, offline) and their exported bundles.

Each checkpoint configuration is built and exported once per test session.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest
from PIL import Image

import ortllava
from ortllava.generation.sampling import draw_without_replacement

# Configurations covering the three decoders, a single feature layer and a list of them, and both layouts.
# Bundles get the fused ("gqa") decoder unless `decoder` says otherwise.
CONFIGS = {
    "mistral": dict(family="mistral", feature_layer=-2, layout="transformers"),
    "mistral-concat": dict(family="mistral", feature_layer=-2, layout="transformers", decoder="concat"),
    "llama-layers": dict(family="llama", feature_layer=[-3, -1], layout="llava-hf"),
    "qwen2": dict(family="qwen2", feature_layer=-2, layout="llava-hf"),
    "qwen2-layers": dict(family="qwen2", feature_layer=[-3, -1], layout="transformers"),
    # Family configs (export/tiny.py FAMILIES; tests/test_families.py). Vicuna and Yi have 4096 positions, but
    # test_generation's two-image prompts are ~4.7k tokens, so these two are given 8192. Vicuna's tokenizer is
    # SentencePiece-style with byte-fallback tokens, as llava-v1.6-vicuna's and -mistral's are.
    "vicuna": dict(family="vicuna", max_position_embeddings=8192, layout="transformers", byte_fallback=True),
    "yi-34b": dict(family="yi", max_position_embeddings=8192, layout="transformers"),
    "llama3": dict(family="llama3", layout="llava-hf"),
    "qwen2-152k": dict(family="qwen2", vocab_size=152064, layout="llava-hf"),
    "granite": dict(family="granite", layout="llava-hf"),
}


PROMPT = "[INST] <image>\nWhat is shown in this image? [/INST]"  # Mistral's format, one image


@dataclass
class TinyModel:
    name: str
    checkpoint: Path
    bundle: Path


class _Store:
    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, TinyModel] = {}

    def get(self, name: str) -> TinyModel:
        if name not in self.built:
            from ortllava_export.cli import export_bundle
            from ortllava_export.tiny import TinySpec, build_checkpoint

            options = dict(CONFIGS[name])
            layout = options.pop("layout")
            decoder = options.pop("decoder", "gqa")
            checkpoint = build_checkpoint(self.root / f"{name}-checkpoint", TinySpec(**options), layout=layout)
            bundle = export_bundle(str(checkpoint), self.root / f"{name}-bundle", decoder=decoder)
            self.built[name] = TinyModel(name, checkpoint, bundle)
        return self.built[name]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> _Store:
    return _Store(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def mistral(tiny_store) -> TinyModel:
    return tiny_store.get("mistral")


@pytest.fixture(scope="session")
def bundles(tiny_store, tmp_path_factory):
    """fp16, int4 (CPU target: fp32 activations and, by default, an int8 key/value cache), int4 on the concat
    decoder (float cache), and fp32 with an int8 key/value cache, from the tiny Mistral checkpoint (built once, for
    test_precisions and test_device_paths)."""
    from ortllava_export.cli import export_bundle
    from ortllava_export.graphs.quantize import Int4Options

    checkpoint = str(tiny_store.get("mistral").checkpoint)
    root = tmp_path_factory.mktemp("fast")
    return {
        "fp16": export_bundle(checkpoint, root / "fp16", precision="fp16"),
        "int4": export_bundle(checkpoint, root / "int4", precision="int4", target="cpu", int4=Int4Options(block_size=32)),
        "int4-concat": export_bundle(checkpoint, root / "int4-concat", precision="int4", target="cpu", decoder="concat"),
        "kv8": export_bundle(checkpoint, root / "kv8", precision="fp32", kv_cache="int8"),
    }


@pytest.fixture(scope="module")
def pipe(mistral):
    """The tiny Mistral bundle loaded on the CPU, one per test module (a module's tests may patch it)."""
    import ortllava

    return ortllava.load(mistral.bundle, provider="cpu")


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A noise image with smooth structure, so resampling and tiling differences would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), ((xx + yy) * 3) % 256], -1)
    noise = rng.integers(0, 64, (height, width, 3))
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "RGB":
        return image
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "LA":
        gray = np.asarray(image.convert("L"))
        return Image.fromarray(np.dstack([gray, rng.integers(0, 256, (height, width), dtype=np.uint8)]), "LA")
    if mode == "P-transparent":
        palette = image.quantize(colors=16)
        palette.info["transparency"] = 3
        return palette
    return image.convert(mode)


def image_cases() -> dict[str, Image.Image]:
    """The image shapes and modes preprocessing must get right."""
    return {
        "square": random_image(500, 500, seed=1),
        "wide": random_image(900, 300, seed=2),
        "tall": random_image(300, 800, seed=3),
        "small": random_image(120, 90, seed=4),
        "huge": random_image(2500, 1700, seed=5),
        "strip-wide": random_image(600, 18, seed=6),
        "strip-tall": random_image(16, 400, seed=7),
        "gray": random_image(400, 300, "L", seed=8),
        "rgba": random_image(350, 420, "RGBA", seed=9),
        "la": random_image(300, 200, "LA", seed=10),
        "palette-transparent": random_image(256, 256, "P-transparent", seed=11),
    }


def save_png(image: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def features_ours_and_transformers(pipe, checkpoint: Path, images) -> tuple[np.ndarray, np.ndarray, dict]:
    """Packed image features of `images`: ortllava's `encode_images` and transformers' `get_image_features`
    (`pooler_output`, concatenated), on the same processor outputs; also returns those inputs."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    inputs = pipe.processor.image_processor(images)
    with torch.no_grad():
        ref = model.model.get_image_features(
            torch.from_numpy(inputs["pixel_values"]), torch.from_numpy(inputs["image_sizes"]), return_dict=True
        ).pooler_output
    return pipe.encode_images(inputs["pixel_values"], inputs["image_sizes"]), torch.cat(list(ref), dim=0).numpy(), inputs


def transformers_greedy(model: str | Path, prompt: str, images, max_new_tokens: int) -> list[int]:
    """transformers' greedy new tokens for a prompt string with images: `model` is a checkpoint folder or
    "tiny" (the exporter's built-in random model); an EOS token ends them, as it ends ours."""
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    if str(model) == "tiny":
        from ortllava_export.checkpoint import load_checkpoint

        checkpoint = load_checkpoint("tiny")
        model, processor = checkpoint.model, checkpoint.processor
    else:
        model, processor = LlavaNextForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(model)
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


# Greedy parity: tokens per answer, and transformers' side of it for chats.
NEW_TOKENS = 16


def hf_generate(processor, model, conversations, **options) -> list[list[int]]:
    """New tokens of transformers' greedy generation for a list of chats: `NEW_TOKENS` of them (no EOS can end
    an answer) unless `options` say otherwise; rows that ended early are padded, as transformers returns them."""
    import torch

    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    options = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, **options}
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, **options)
    return [row.tolist() for row in out[:, inputs["input_ids"].shape[1] :]]


def at_once(calls: Sequence[Callable[[], Any]]) -> list:
    """Runs each of `calls` in its own thread, all started together; their results in order (None where one raised)."""
    results: list = [None] * len(calls)

    def run(index: int) -> None:
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class SameDraws:
    """torch.multinomial (without replacement) as ortllava draws: `draw_without_replacement` over each row's nonzero
    probabilities, from a numpy generator seeded as ortllava's; fewer of them than draws is torch's error."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def __call__(self, probs, num_samples: int, replacement: bool = False, **kwargs):
        import torch

        assert not replacement
        self.calls += 1
        rows = []
        for row in probs.numpy():
            live = np.flatnonzero(row)
            if len(live) < num_samples:
                raise RuntimeError("invalid multinomial distribution (with replacement=False, not enough non-negative category to sample)")
            rows.append(live[draw_without_replacement(row[live], num_samples, self.rng)])
        return torch.tensor(np.stack(rows))


def user(*content) -> list[dict]:
    """A one-message chat: a user turn of images and strings, in order."""
    items = [{"type": "image", "image": c} if not isinstance(c, str) else {"type": "text", "text": c} for c in content]
    return [{"role": "user", "content": items}]


def session_config(session, key: str) -> str | None:
    """An onnxruntime session's config entry (`add_session_config_entry`), None where it is not set."""
    try:
        return session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # onnxruntime: no such entry
        return None


def one_prefill_and_grown_extend(bundle):
    """Logits of one 300-token prefill, and of 100 tokens prefilled into a 100-position cache, grown by `reserve`
    to 300 (past the 256 positions the first prefill asked for) and continued by `extend`; and that cache."""
    pipe = ortllava.load(bundle, provider="cpu")
    decoder = pipe.sessions.decoder
    embeds = np.random.default_rng(0).standard_normal((1, 300, pipe.manifest.text.hidden_size)).astype(np.float32)
    want, whole = decoder.start(embeds, np.ones((1, 300), np.int64), capacity=300)
    want = want.copy()
    decoder.release(whole)
    _, cache = decoder.start(embeds[:, :100], np.ones((1, 100), np.int64), capacity=100)
    cache = decoder.reserve(cache, 300)
    return want, decoder.extend(embeds[:, 100:], cache), cache


def without_packages(*packages: str) -> str:
    """Python source that makes `packages` unimportable in the process that runs it (as if not installed): the
    first lines of a script run in a subprocess."""
    return (
        "import sys\n"
        "class _Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {packages!r}:\n"
        "            raise ImportError('not installed in this test: ' + name)\n"
        "sys.meta_path.insert(0, _Missing())\n"
    )
