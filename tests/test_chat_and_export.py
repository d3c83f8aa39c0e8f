"""Chat templates against transformers' rendering, and the exporter's own behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoProcessor, LlavaNextConfig

import ortllava
from ortllava.chat_template import ChatTemplateError
from ortllava.manifest import read_manifest
from ortllava_export.families import UnsupportedModelError, check_supported
from ortllava_export.tiny import CHATML_TEMPLATE, MISTRAL_TEMPLATE, VICUNA_TEMPLATE

from conftest import random_image

IMAGE = random_image(64, 48)
CONVERSATIONS = {
    "single": [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is this?"}]}],
    "system and multi-turn with earlier image": [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "image", "url": "https://example.invalid/a.png"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
    ],
    "string content": [{"role": "user", "content": "Plain string content"}],
}
TEMPLATES = {"mistral": MISTRAL_TEMPLATE, "vicuna (generation block)": VICUNA_TEMPLATE, "chatml": CHATML_TEMPLATE}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_renders_as_transformers(mistral, template, conversation, add_generation_prompt):
    if template == "vicuna (generation block)" and conversation == "string content":
        pytest.skip("the vicuna template iterates content items")
    hf = AutoProcessor.from_pretrained(mistral.checkpoint)
    pipe = ortllava.load(mistral.bundle, provider="cpu", verify=False)
    messages = CONVERSATIONS[conversation]
    want = hf.apply_chat_template(messages, chat_template=TEMPLATES[template], add_generation_prompt=add_generation_prompt)
    got = pipe.processor.apply_chat_template(messages, chat_template=TEMPLATES[template], add_generation_prompt=add_generation_prompt)
    assert got == want


def test_template_globals(mistral):
    pipe = ortllava.load(mistral.bundle, provider="cpu", verify=False)
    with pytest.raises(ChatTemplateError, match="Only system, user and assistant"):
        pipe.processor.apply_chat_template([{"role": "tool", "content": [{"type": "text", "text": "x"}]}])
    template = "{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ strftime_now('%Y') | length }}|{{ messages | tojson }}"
    rendered = pipe.processor.apply_chat_template([{"role": "user", "content": "é"}], chat_template=template)
    assert rendered == '<s>1|4|[{"role": "user", "content": "é"}]'


@pytest.mark.parametrize("config, kind", [("mistral", "gqa"), ("mistral-concat", "concat")])
def test_manifest_records_contract_and_provenance(tiny_store, config, kind):
    manifest = read_manifest(tiny_store.get(config).bundle)
    assert manifest.graphs["decoder"].kind == kind
    assert manifest.vision.feature_layers == [-2] and manifest.vision.select_strategy == "default"
    assert manifest.provenance["versions"]["transformers"] and manifest.provenance["source"].endswith("checkpoint")
    cache_check = {"concat": {"decoder_present"}, "gqa": set()}[kind]
    assert set(manifest.validation) == {"vision_encoder", "projector", "decoder_logits"} | cache_check
    assert all(value < 1e-3 for value in manifest.validation.values())
    assert "decoder.onnx" in manifest.files and len(manifest.files["decoder.onnx"]) == 64
    # fp32 graphs are exact up to summation order: every teacher-forced next token agrees with PyTorch.
    assert manifest.accuracy["top1_agreement"] == 1.0 and manifest.accuracy["max_abs_logit_diff"] < 1e-3


def test_unknown_architecture_is_refused_with_the_supported_list():
    config = LlavaNextConfig(text_config={"model_type": "gemma", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 64, "vocab_size": 100})
    with pytest.raises(UnsupportedModelError, match="mistral.*llama.*qwen2"):
        check_supported(config)


def test_export_cli_tiny_end_to_end(tmp_path):
    bundle = tmp_path / "tiny"
    out = subprocess.run([sys.executable, "-m", "ortllava_export.cli", "--model", "tiny", "--output", str(bundle)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "[7/7] Measuring accuracy" in out.stderr and "Bundle written" in out.stderr
    assert json.loads((bundle / "manifest.json").read_text())["provenance"]["source"] == "tiny"
    info = subprocess.run([sys.executable, "-m", "ortllava.cli", "info", str(bundle)], capture_output=True, text=True, check=True)
    assert "MistralForCausalLM" in info.stdout
    result = ortllava.load(bundle, provider="cpu").generate(prompt="[INST] <image>\nHi [/INST]", images=[random_image(100, 80)], max_new_tokens=3)
    assert 1 <= len(result.token_ids) <= 3


@pytest.mark.parametrize("model", ["random:cpu-mid", "no-such-org/no-such-model"])
def test_export_cli_names_a_model_it_cannot_load(tmp_path, model):
    """A malformed hub id, or one that cannot be fetched offline, is one clear line and exit code 1, not a traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "ortllava_export.cli", "--model", model, "--output", str(tmp_path / "b")], capture_output=True, text=True, env=env,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"cannot load the model '{model}'" in out.stderr
    assert not (tmp_path / "b").exists()


def test_external_data_is_listed_hashed_and_loaded(tmp_path, monkeypatch):
    from ortllava_export import convert, fused_decoder
    from ortllava_export.cli import export_bundle

    for module in (convert, fused_decoder):  # as if every graph were over the limit
        monkeypatch.setattr(module, "EXTERNAL_DATA_THRESHOLD", 0)
    bundle = export_bundle("tiny", tmp_path / "external")
    manifest = read_manifest(bundle)
    for name in ("vision_encoder", "projector", "decoder"):
        data_file = manifest.graphs[name].external_data
        assert data_file == [f"{name}.onnx.data"] and data_file[0] in manifest.files
    result = ortllava.load(bundle, provider="cpu").generate(prompt="[INST] <image>\nHi [/INST]", images=[random_image(90, 60)], max_new_tokens=2)
    assert 1 <= len(result.token_ids) <= 2
    (bundle / "decoder.onnx.data").unlink()
    with pytest.raises(ortllava.BundleError, match="decoder.onnx.data"):
        ortllava.load(bundle, provider="cpu")
