"""Each LLaVA-NeXT family, on a tiny checkpoint with its distinguishing features, against transformers.

Families (export/tiny.py FAMILIES -> CONFIGS entry): Vicuna, Yi-34B, Llama-3, Qwen2 (152k vocabulary),
granite-vision (SigLIP, Granite decoder) and Mistral. For each: the checkpoint has the family's features,
the chat template renders as `processor.apply_chat_template`, input ids / image token expansion / pixel
values equal `LlavaNextProcessor`'s, and greedy tokens equal `model.generate`'s on a chat with a system
prompt and history (test_generation runs its own cases on every CONFIGS entry too). Also: the registry's
default templates (export/templates) for checkpoints that ship none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

import ortllava
from ortllava.bundle.manifest import read_manifest
from ortllava_export import families as registry
from ortllava_export import tiny
from ortllava_export.checkpoint import apply_default_template

from conftest import NEW_TOKENS, features_ours_and_transformers, hf_generate, random_image, user

# family -> the CONFIGS entry (tests/conftest.py) that builds it
FAMILY_CONFIGS = {"vicuna": "vicuna", "yi": "yi-34b", "llama3": "llama3", "qwen2": "qwen2-152k", "granite": "granite", "mistral": "mistral"}

GRANITE_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# What each family's checkpoint must show. `prompt`: the generation prompt of SINGLE (one image, one question).
EXPECTED = {
    "vicuna": dict(
        decoder="llama", vocab=None, kv_heads=4, eos=["</s>"], bos="<s>", tower="clip_vision_model",
        prompt="USER: <image>\nWhat is this? ASSISTANT:",
    ),
    "yi": dict(
        decoder="llama", vocab=64000, kv_heads=2, eos=["<|im_end|>"], bos=None, tower="clip_vision_model", rope_theta=5e6,
        prompt="<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama3": dict(
        decoder="llama", vocab=128256, kv_heads=1, eos=["<|eot_id|>", "<|end_of_text|>"], bos="<|begin_of_text|>",
        tower="clip_vision_model", rope_theta=5e5, rope_type="llama3",
        prompt="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "qwen2": dict(
        decoder="qwen2", vocab=152064, kv_heads=2, eos=["<|im_end|>"], bos=None, tower="clip_vision_model",
        prompt="<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "granite": dict(
        decoder="granite", vocab=49156, kv_heads=2, eos=["<|end_of_text|>"], bos=None, tower="siglip_vision_model",
        prompt=f"<|system|>\n{GRANITE_SYSTEM}\n<|user|>\n<image>\nWhat is this?\n<|assistant|>\n",
    ),
    "mistral": dict(
        decoder="mistral", vocab=None, kv_heads=2, eos=["</s>"], bos="<s>", tower="clip_vision_model",
        prompt="[INST] <image>\nWhat is this? [/INST]",
    ),
}

IMAGE = random_image(300, 200, seed=31)
SINGLE = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is this?"}]}]
CONVERSATIONS = {
    "single": SINGLE,
    "system and history": [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Describe the picture."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat on a red sofa."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the window?"}]},
    ],
    "two images": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image", "image": IMAGE}, {"type": "image", "image": random_image(200, 300, seed=32)},
    ]}],
}


class Family:
    def __init__(self, name, tiny_model):
        self.name = name
        self.tiny = tiny_model
        self.hf = AutoProcessor.from_pretrained(tiny_model.checkpoint)
        self.pipe = ortllava.load(tiny_model.bundle, provider="cpu")
        self.manifest = read_manifest(tiny_model.bundle)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = LlavaNextForConditionalGeneration.from_pretrained(self.tiny.checkpoint).eval()
        return self._model


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family(request, tiny_store) -> Family:
    return Family(request.param, tiny_store.get(FAMILY_CONFIGS[request.param]))


# --------------------------------------------------------------------------------------------------
# The checkpoints have the family's features


def test_family_features(family):
    want = EXPECTED[family.name]
    config = json.loads((family.tiny.checkpoint / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    tokenizer = family.hf.tokenizer
    assert text["model_type"] == want["decoder"] == family.manifest.text.model_type
    assert vision["model_type"] == want["tower"]
    vocab = want["vocab"] or len(tokenizer)
    assert text["vocab_size"] == vocab == family.manifest.text.vocab_size == family.pipe.embed_table.shape[0]
    assert text["num_attention_heads"] == 4 and text["num_key_value_heads"] == want["kv_heads"] == family.manifest.text.num_key_value_heads
    if "rope_theta" in want:
        assert text["rope_parameters"]["rope_theta"] == want["rope_theta"]
    if "rope_type" in want:
        assert text["rope_parameters"]["rope_type"] == want["rope_type"]
    # EOS: the generation config's ids are the family's tokens, and the runtime stops on all of them.
    eos_ids = [tokenizer.convert_tokens_to_ids(token) for token in want["eos"]]
    assert family.pipe._special_ids(family.pipe.settings())[0] == eos_ids == family.manifest.tokens.eos_token_ids
    assert tokenizer.eos_token == want["eos"][0]
    # The template and the BOS: exactly one BOS at the start when the family has one, else none.
    assert family.pipe.processor.apply_chat_template(SINGLE, add_generation_prompt=True) == want["prompt"]
    ids = family.pipe.processor.apply_chat_template(SINGLE, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0].tolist()
    bos_id = tokenizer.convert_tokens_to_ids(want["bos"]) if want["bos"] else None
    assert (ids[0] == bos_id) == (want["bos"] is not None) and ids[1] != bos_id
    if family.name == "yi":  # Yi has a BOS token, but its tokenizer does not add it
        assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.convert_tokens_to_ids("<|startoftext|>") not in ids


def test_qwen2_attention_biases_and_vicuna_full_attention(tiny_store):
    qwen2 = LlavaNextForConditionalGeneration.from_pretrained(tiny_store.get("qwen2-152k").checkpoint)
    attention = qwen2.model.language_model.layers[0].self_attn
    assert all(getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj"))
    assert attention.o_proj.bias is None
    vicuna = LlavaNextForConditionalGeneration.from_pretrained(tiny_store.get("vicuna").checkpoint)
    attention = vicuna.model.language_model.layers[0].self_attn
    assert attention.k_proj.out_features == attention.v_proj.out_features == attention.q_proj.out_features  # not grouped
    assert all(getattr(attention, name).bias is None for name in ("q_proj", "k_proj", "v_proj"))


def test_granite_vision_features(tiny_store):
    granite = tiny_store.get("granite")
    config = json.loads((granite.checkpoint / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    # SigLIP/384, no CLS, "full" features from several layers.
    assert (vision["image_size"], vision["patch_size"]) == (384, 14)
    assert config["vision_feature_select_strategy"] == "full" and config["vision_feature_layer"] == [-4, -3, -2, -1]
    processor_config = json.loads((granite.checkpoint / "processor_config.json").read_text())
    assert processor_config["num_additional_image_tokens"] == 0 and processor_config["vision_feature_select_strategy"] == "full"
    manifest = read_manifest(granite.bundle)
    assert manifest.vision.num_additional_image_tokens == 0 and manifest.vision.select_strategy == "full"
    assert manifest.vision.feature_layers == [-4, -3, -2, -1] and manifest.vision.image_size == 384
    # Granite decoder: every multiplier away from 1 (logits_scaling: see the export test below and conftest).
    assert text["embedding_multiplier"] == 12.0 and text["residual_multiplier"] == 0.22 and text["attention_multiplier"] == 1 / 16
    assert text["tie_word_embeddings"] is True
    preprocessor = json.loads((granite.bundle / "preprocessor_config.json").read_text())
    assert preprocessor["image_mean"] == [0.5] * 3 and preprocessor["image_std"] == [0.5] * 3
    assert preprocessor["size"] == {"height": 384, "width": 384}


def test_family_defaults_before_conftest_overrides():
    """The families' own positions (CONFIGS gives Vicuna and Yi 8192 for test_generation's long prompts)."""
    for name, positions in {"vicuna": 4096, "yi": 4096, "llama3": 8192, "granite": 131072}.items():
        spec = tiny.TinySpec(family=name).resolved()
        assert spec.max_position_embeddings == positions, name
    spec = tiny.TinySpec(family="granite").resolved()
    assert spec.select_strategy == "full" and spec.grid_pinpoints == tiny.SIGLIP_PINPOINTS
    assert tiny.FAMILIES["granite"].text_kwargs["logits_scaling"] == 8.0


# --------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_renders_as_transformers(family, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    want = family.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    got = family.pipe.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == want


@pytest.mark.parametrize("conversation", ["single", "two images"])
def test_inputs_identical(family, conversation):
    """input_ids (each <image> expanded to its feature count), mask, pixel values bit for bit, image sizes."""
    messages = CONVERSATIONS[conversation]
    want = family.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np")
    got = family.pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert got[key].shape == want[key].shape, key
        assert np.array_equal(got[key], want[key]), key
    image_tokens = int((got["input_ids"] == family.manifest.tokens.image_token_id).sum())
    assert image_tokens == sum(family.pipe.processor.num_image_tokens(*size) for size in got["image_sizes"].tolist())
    # transformers' defaults: tokenize=True alone gives the ids; decode keeps special tokens unless told.
    ids = family.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="np")
    assert np.array_equal(family.pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True), ids)
    row = got["input_ids"][0].tolist()
    assert family.pipe.processor.decode(row) == family.hf.decode(row)
    assert family.pipe.processor.batch_decode([row], skip_special_tokens=True) == family.hf.batch_decode([row], skip_special_tokens=True)


def test_batch_inputs_identical(family):
    batch = [CONVERSATIONS["single"], CONVERSATIONS["system and history"]]
    want = family.hf.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np", padding=True)
    got = family.pipe.processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert np.array_equal(got[key], want[key]), key


def test_greedy_tokens_with_system_and_history(family):
    conversations = [CONVERSATIONS["system and history"], user(random_image(240, 320, seed=33), "Describe.")]
    want = hf_generate(family.hf, family.model, conversations)
    got = family.pipe.generate(messages=conversations, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert [r.token_ids for r in got] == want
    for result in got:
        assert result.text == family.hf.decode(result.token_ids, skip_special_tokens=True)


def test_granite_packed_features_match_transformers(tiny_store):
    """SigLIP tiles (no CLS, "full", four layers), the 1x1 grid pinpoint included, against get_image_features."""
    granite = tiny_store.get("granite")
    pipe = ortllava.load(granite.bundle, provider="cpu")
    images = [random_image(400, 380, seed=41), random_image(900, 300, seed=42), random_image(300, 700, seed=43), random_image(150, 150, seed=44)]
    ours, ref, inputs = features_ours_and_transformers(pipe, granite.checkpoint, images)
    assert inputs["pixel_values"].shape[-2:] == (384, 384)
    assert ours.shape == ref.shape
    # Four concatenated layers through the projector give features up to ~15: float32 summation-order noise is
    # ~1e-6 of that (measured 1.9e-5); a wrong layer, tile order or CLS handling is O(1).
    np.testing.assert_allclose(ours, ref, atol=4e-6 * float(np.abs(ref).max()), rtol=0)
    # The square image takes the 1x1 grid: base 27x27 (no CLS dropped, none added) + 27 rows of 27 + newline.
    hf = AutoProcessor.from_pretrained(granite.checkpoint)
    ids = hf(text=hf.image_token, images=[images[3]], return_tensors="np")["input_ids"][0]
    assert pipe.processor.num_image_tokens(150, 150) == int((ids == hf.image_token_id).sum()) == 27 * 27 + 27 * 28


def test_granite_embeddings_are_raw_in_the_bundle(tiny_store):
    """The decoder graph applies embedding_multiplier (GraniteModel.forward does); the bundle's table must not."""
    granite = tiny_store.get("granite")
    model = LlavaNextForConditionalGeneration.from_pretrained(granite.checkpoint).eval()
    table = np.load(granite.bundle / "embed_tokens.npy")
    np.testing.assert_array_equal(table, model.get_input_embeddings().weight.detach().numpy())


@pytest.mark.parametrize("decoder", ["concat", "gqa"])
def test_granite_logits_scaling_exports(tmp_path, decoder):
    """granite-vision's logits_scaling (8.0) is not applied by LlavaNextForConditionalGeneration; the bundle's logits
    must be transformers' (the accuracy report compares them with `generate`'s raw logits; 1/8 of them would
    differ by far more than 1e-3)."""
    from ortllava_export.cli import export_bundle

    checkpoint = tiny.build_checkpoint(tmp_path / "granite", tiny.TinySpec(family="granite"))
    assert json.loads((checkpoint / "config.json").read_text())["text_config"]["logits_scaling"] == 8.0
    bundle = export_bundle(str(checkpoint), tmp_path / "bundle", decoder=decoder)
    accuracy = read_manifest(bundle).accuracy
    assert accuracy["max_abs_logit_diff"] < 1e-3 and accuracy["top1_agreement"] == 1.0


# --------------------------------------------------------------------------------------------------
# Registry default templates


def test_registry_templates_are_the_families_templates():
    files = {path.stem: path.read_text() for path in registry.TEMPLATES_DIR.glob("*.jinja")}
    assert files == {
        "mistral": tiny.MISTRAL_TEMPLATE, "vicuna": tiny.VICUNA_TEMPLATE, "chatml": tiny.CHATML_TEMPLATE,
        "llama3": tiny.LLAMA3_TEMPLATE, "granite": tiny.GRANITE_TEMPLATE,
    }
    assert set(registry.DECODER_TEMPLATES) == set(registry.FAMILIES)


@pytest.mark.parametrize("name", sorted(tiny.FAMILIES))
def test_default_template_is_the_familys(name):
    spec = tiny.FAMILIES[name]
    default = registry.default_chat_template(spec.decoder, tiny.build_tokenizer(name).get_vocab())
    assert default.source == spec.template, (name, default.name)


def test_checkpoint_without_template_gets_the_registry_default(tmp_path, capfd):
    from ortllava_export.cli import export_bundle

    checkpoint = tiny.build_checkpoint(tmp_path / "yi", tiny.TinySpec(family="yi"), layout="llava-hf")
    (checkpoint / "chat_template.json").unlink()
    assert AutoProcessor.from_pretrained(checkpoint).chat_template is None
    capfd.readouterr()
    bundle = export_bundle(str(checkpoint), tmp_path / "bundle")
    err = capfd.readouterr().err
    expected_path = registry.TEMPLATES_DIR / "chatml.jinja"
    assert "ships no chat template" in err and "'chatml'" in err and str(expected_path) in err and "<|im_start|>" in err
    manifest = read_manifest(bundle)
    assert manifest.provenance["chat_template"] == "registry:chatml"
    assert (bundle / "chat_template.jinja").read_text() == expected_path.read_text()
    # The bundle renders the registry template as transformers would with it, and chats work.
    pipe = ortllava.load(bundle, provider="cpu")
    hf = AutoProcessor.from_pretrained(checkpoint)
    for messages in CONVERSATIONS.values():
        assert pipe.processor.apply_chat_template(messages, add_generation_prompt=True) == hf.apply_chat_template(
            messages, chat_template=expected_path.read_text(), add_generation_prompt=True
        )
    assert len(pipe.generate(messages=SINGLE, max_new_tokens=2).token_ids) >= 1


def test_shipped_template_is_kept(mistral):
    assert read_manifest(mistral.bundle).provenance["chat_template"] == "checkpoint"


def test_missing_registry_is_reported(tmp_path, monkeypatch, capsys):
    processor = tiny.build_processor(tiny.TinySpec(family="llama"), tiny.build_tokenizer("llama"))
    processor.chat_template = None
    monkeypatch.setattr(registry, "TEMPLATES_DIR", tmp_path / "nowhere")
    assert apply_default_template(processor, "llama", "some/checkpoint") == "none"
    err = capsys.readouterr().err
    assert "some/checkpoint ships no chat template" in err and "vicuna" in err and "missing" in err
    assert processor.chat_template is None
    # With the registry present, the Vicuna template is chosen for a Llama decoder with a plain vocabulary.
    monkeypatch.undo()
    assert apply_default_template(processor, "llama", "some/checkpoint") == "registry:vicuna"
    assert processor.chat_template == tiny.VICUNA_TEMPLATE
    assert "'vicuna'" in capsys.readouterr().err


def test_registry_templates_are_installed_with_the_exporter(tmp_path):
    """A non-editable install (`pip install ".[export]"`) ships the templates: the wheel holds each one beside
    `families.py`, where the exporter looks for them."""
    pytest.importorskip("setuptools")
    import zipfile

    # Built from a copy of the sources: a build leaves build/ and *.egg-info behind, whose files a later build
    # would reuse (and the checkout stays clean).
    root = Path(__file__).resolve().parent.parent
    skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "bundles", "tests", "docs")
    source = tmp_path / "source"
    shutil.copytree(root, source, ignore=skip)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel")],
        check=True, capture_output=True, text=True,
    )
    assert "would be ignored" not in built.stdout + built.stderr  # (setuptools' warning for undeclared data folders)
    (wheel,) = (tmp_path / "wheel").glob("ortllava-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = sorted(path.name for path in registry.TEMPLATES_DIR.glob("*.jinja"))
    assert templates and all(f"ortllava_export/templates/{name}" in names for name in templates)
    assert registry.TEMPLATES_DIR == Path(registry.__file__).resolve().parent / "templates"


def test_registry_folder_can_be_moved(tmp_path):
    """ORTLLAVA_TEMPLATES points the exporter at another registry folder (e.g. for an installed exporter)."""
    shutil.copytree(registry.TEMPLATES_DIR, tmp_path / "templates")
    (tmp_path / "templates" / "granite.jinja").write_text("{{ 'custom' }}")
    code = "from ortllava_export import families; print(families.default_chat_template('granite', {}).source)"
    env = {**os.environ, "ORTLLAVA_TEMPLATES": str(tmp_path / "templates")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "{{ 'custom' }}"
