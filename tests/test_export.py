"""The exporter's own behaviour: the manifest, its CLI, what it refuses, and that a failed export leaves nothing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from transformers import LlavaNextConfig

import ortllava
from ortllava.bundle.manifest import read_manifest
from ortllava_export.families import UnsupportedModelError, check_supported
from ortllava_export.graphs.quantize import Int4Options

from conftest import random_image, transformers_greedy, without_packages


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
    clip_with_cls = LlavaNextConfig(vision_feature_select_strategy="full")  # (a CLIP tower and a llama decoder by default)
    with pytest.raises(UnsupportedModelError, match="'full' keeps the CLIP tower's CLS position"):
        check_supported(clip_with_cls)


def test_export_cli_tiny_end_to_end(tmp_path):
    bundle = tmp_path / "tiny"
    out = subprocess.run([sys.executable, "-m", "ortllava_export.cli", "--model", "tiny", "--output", str(bundle)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "[8/8] Measuring accuracy" in out.stderr and "Bundle written" in out.stderr
    assert json.loads((bundle / "manifest.json").read_text())["provenance"]["source"] == "tiny"
    info = subprocess.run([sys.executable, "-m", "ortllava.cli", "info", str(bundle)], capture_output=True, text=True, check=True)
    assert "MistralForCausalLM" in info.stdout and "; float32, fused attention over preallocated key/value buffers (gqa)\n" in info.stdout
    assert "features from layer -2 (class token dropped); anyres grids (height x width px) 336x672, 672x336, 672x672" in info.stdout
    assert "runs on     the CPU provider only (its fused decoder computes in fp32, which the CUDA provider's attention cannot)" in info.stdout
    accuracy = json.loads((bundle / "manifest.json").read_text())["accuracy"]
    assert f"top-1 agreement {accuracy['top1_agreement'] * 100:.1f}% over {accuracy['positions']} positions" in info.stdout
    assert "measured with the cpu execution provider, onnxruntime" in info.stdout  # (where: CUDA rounds otherwise)
    assert re.search(r"^load +[0-9.]+ s on CPUExecutionProvider", info.stdout, re.M) and "size        decoder" in info.stdout
    prompt, image = "[INST] <image>\nHi [/INST]", random_image(100, 80)
    result = ortllava.load(bundle, provider="cpu").generate(prompt=prompt, images=[image], max_new_tokens=3)
    assert result.token_ids == transformers_greedy("tiny", prompt, [image], 3)


def test_external_data_is_listed_hashed_and_loaded(tmp_path, monkeypatch):
    from ortllava_export.cli import export_bundle
    from ortllava_export.graphs import convert, fused_decoder

    for module in (convert, fused_decoder):  # as if every graph were over the limit
        monkeypatch.setattr(module, "EXTERNAL_DATA_THRESHOLD", 0)
    bundle = export_bundle("tiny", tmp_path / "external")
    manifest = read_manifest(bundle)
    for name in ("vision_encoder", "projector", "decoder"):
        data_file = manifest.graphs[name].external_data
        assert data_file == [f"{name}.onnx.data"] and data_file[0] in manifest.files
    prompt, image = "[INST] <image>\nHi [/INST]", random_image(90, 60)
    result = ortllava.load(bundle, provider="cpu").generate(prompt=prompt, images=[image], max_new_tokens=2)
    assert result.token_ids == transformers_greedy("tiny", prompt, [image], 2)
    (bundle / "decoder.onnx.data").unlink()
    with pytest.raises(ortllava.BundleError, match="decoder.onnx.data"):
        ortllava.load(bundle, provider="cpu")


# --------------------------------------------------------------------------------------------------
# The exporter refuses what it cannot do well, and a failed export leaves nothing behind


def test_non_finite_logits_fail_the_export_and_leave_nothing(tmp_path, monkeypatch):
    """The quantized decoder that ships is not the validated float graph: the accuracy report runs it and refuses
    it when its logits are not finite (here: int4 scales broken on purpose)."""
    from ortllava_export.checks.validate import ExportValidationError
    from ortllava_export.cli import export_bundle
    from ortllava_export.graphs import fused_decoder

    quantize = fused_decoder.quantize_weight

    def broken(weight, options, dtype):
        packed, scales, zero_points = quantize(weight, options, dtype)
        return packed, scales * np.nan, zero_points

    monkeypatch.setattr(fused_decoder, "quantize_weight", broken)
    with pytest.raises(ExportValidationError, match="not finite"):
        export_bundle("tiny", tmp_path / "int4", precision="int4", target="cpu")
    assert list(tmp_path.iterdir()) == []


def test_an_export_killed_before_it_finished_is_no_bundle(mistral, tmp_path, monkeypatch):
    """An export measures its accuracy through the runtime, on its scratch folder, whose manifest then already lists
    every file: a kill there (which nothing can catch) leaves a folder that looks whole. The runtime refuses a folder
    with the scratch mark, except to the export that writes it; an export still measures and ships its bundle."""
    from ortllava.bundle.manifest import EXPORT_SCRATCH_MARK, reading_export_scratch
    from ortllava_export import cli
    from ortllava_export.checks import accuracy

    scratch = tmp_path / "b.partial"
    shutil.copytree(mistral.bundle, scratch)
    (scratch / EXPORT_SCRATCH_MARK).touch()
    for load in (lambda: ortllava.load(scratch, provider="cpu"), lambda: read_manifest(scratch)):
        with pytest.raises(ortllava.BundleError, match="is an unfinished export .*: export the bundle again"):
            load()
    with reading_export_scratch():
        assert ortllava.load(scratch, provider="cpu", verify=False).manifest.text.vocab_size > 0
    measured = []
    report = accuracy.accuracy_report

    def measuring(references, work):  # (the stage a kill could interrupt: a manifest, and the mark)
        measured.append((work / "manifest.json").is_file() and (work / EXPORT_SCRATCH_MARK).is_file())
        return report(references, work)

    monkeypatch.setattr(accuracy, "accuracy_report", measuring)  # (the export imports it when it measures)
    bundle = cli.export_bundle("tiny", tmp_path / "b2")
    assert measured == [True] and not (bundle / EXPORT_SCRATCH_MARK).exists() and ortllava.load(bundle, provider="cpu")


def test_fp16_weights_past_its_range_are_refused():
    """A weight beyond ±65504 would become inf in an fp16 graph, which only validation would see."""
    from ortllava_export.graphs.fused_decoder import _Graph

    graph = _Graph(np.float16)
    assert graph.weight("fine", np.array([65504.0, -1.5], np.float32)) == "fine"
    with pytest.raises(ValueError, match=r"the weight too_large holds values beyond fp16's range \(±65504\)"):
        graph.weight("too_large", np.array([1.0, 7e4], np.float32))


def test_validated_int4_export_lets_the_weights_go_first_and_ships_no_float_graph(tmp_path, monkeypatch, capfd):
    """The float graph (validated) streams its weights to decoder.float.onnx.data, the int4 graph (small enough
    to stay inline) is decoder.onnx; only the latter ships. The PyTorch weights the export loaded are let go
    before any onnxruntime session loads a graph; the stages are numbered 1 to 10 in order."""
    from ortllava_export import cli
    from ortllava_export.checks import accuracy, validate
    from ortllava_export.graphs import fused_decoder
    from ortllava_export.tiny import TinySpec, build_model, build_tokenizer

    model = build_model(TinySpec(), build_tokenizer("mistral"))
    fp32, int4 = fused_decoder.initializer_bytes(model), fused_decoder.initializer_bytes(model, int4=Int4Options())
    monkeypatch.setattr(fused_decoder, "EXTERNAL_DATA_THRESHOLD", (fp32 + int4) / 2)  # fp32 (4 B a weight) external, int4 (~0.6 B) inline
    loaded = []
    load = cli.load_checkpoint
    monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    released = []  # at each onnxruntime half: are all of the model's weights gone?
    for module, name in ((validate, "check"), (accuracy, "accuracy_report")):
        real = getattr(module, name)

        def spy(*args, real=real, **kwargs):
            released.append(all(p.is_meta for p in loaded[0].model.parameters()))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    bundle = cli.export_bundle("tiny", tmp_path / "int4", precision="int4", target="cpu")
    assert sorted(p.name for p in bundle.glob("decoder*")) == ["decoder.onnx"]
    manifest = read_manifest(bundle)
    assert manifest.graphs["decoder"].external_data == [] and not [name for name in manifest.files if "float" in name]
    assert released == [True, True]
    stages = re.findall(r"^\[(\d+)/(\d+)\] .*: done in", capfd.readouterr().err, flags=re.M)
    assert stages == [(str(i), "10") for i in range(1, 11)]


@pytest.mark.parametrize("overrides, named", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": True}, "MLP biases"),
    ({"attention_bias": True}, "a bias on o_proj"),
])
def test_fused_decoder_refuses_what_it_does_not_implement(tmp_path, overrides, named):
    from ortllava_export.cli import export_bundle
    from ortllava_export.tiny import TinySpec, build_checkpoint

    checkpoint = build_checkpoint(tmp_path / "checkpoint", TinySpec(family="llama", text_overrides=overrides))
    with pytest.raises(UnsupportedModelError, match=f"{named}.*--decoder concat"):
        export_bundle(str(checkpoint), tmp_path / "gqa")
    assert not (tmp_path / "gqa").exists()


def test_rotary_scalings_the_fused_decoder_serves():
    """Scalings whose tables depend on the position only are built; longrope (two tables, switched by the
    sequence length) is refused."""
    from ortllava_export.graphs.fused_decoder import unsupported_features

    def config(rope):
        return LlavaNextConfig(text_config={"model_type": "llama", "max_position_embeddings": 4096, "rope_scaling": rope})

    for rope in (None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0},
                 {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}):
        assert unsupported_features(config(rope)) == [], rope
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 64, "long_factor": [2.0] * 64, "original_max_position_embeddings": 2048}
    assert "longrope" in " ".join(unsupported_features(config(longrope)))


def test_concat_export_without_validation_of_an_fp16_checkpoint_loads(tmp_path):
    """llava-hf checkpoints are stored in fp16: the traced concat graph must still have fp32 weights."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from ortllava_export.cli import export_bundle
    from ortllava_export.tiny import build_checkpoint

    import onnx

    checkpoint = build_checkpoint(tmp_path / "checkpoint")
    LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float16).save_pretrained(checkpoint)
    prompt, image = "[INST] <image>\nHi [/INST]", random_image(90, 60)
    for precision in ("fp32", "int4"):
        bundle = export_bundle(str(checkpoint), tmp_path / precision, precision=precision, decoder="concat", validate=False)
        graph = onnx.load(str(bundle / "decoder.onnx"))
        float_types = {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT}
        assert {t.data_type for t in graph.graph.initializer} & float_types == {onnx.TensorProto.FLOAT}  # no fp16 weight
        result = ortllava.load(bundle, provider="cpu").generate(prompt=prompt, images=[image], max_new_tokens=2)
        if precision == "fp32":  # the fp16-stored weights, upcast, as transformers upcasts them
            assert result.token_ids == transformers_greedy(checkpoint, prompt, [image], 2)
        else:  # 4-bit weights from the upcast fp16 ones (their accuracy is the accuracy report's business)
            assert [n.op_type for n in graph.graph.node].count("MatMulNBits") == 7 * read_manifest(bundle).text.num_layers
            assert len(result.token_ids) in (1, 2) and result.finish_reason in ("stop", "length")


# granite: a SigLIP tower and an lm_head tied to the embedding table; llama3: a rope scaling
@pytest.mark.parametrize("family, stored", [("mistral", "float16"), ("qwen2", "bfloat16"), ("granite", "bfloat16"), ("llama3", "float16")])
def test_a_narrow_checkpoint_computes_as_its_fp32_copy(tmp_path, family, stored):
    """llava-hf checkpoints are stored in fp16 or bf16. A fused export keeps the decoder so, and computes its
    references under `computing_in_fp32`: they must be bit for bit those of the model loaded in fp32."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from ortllava_export.checkpoint import computing_in_fp32, load_checkpoint
    from ortllava_export.checks.accuracy import accuracy_references
    from ortllava_export.checks.validate import references
    from ortllava_export.graphs.kv_cache import calibrate_kv_scales
    from ortllava_export.tiny import TinySpec, build_checkpoint

    checkpoint = build_checkpoint(tmp_path / "checkpoint", TinySpec(family=family))
    LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=getattr(torch, stored)).save_pretrained(checkpoint)
    wide, narrow = load_checkpoint(str(checkpoint)), load_checkpoint(str(checkpoint), stored_dtype=True)
    decoder = narrow.model.model.language_model
    assert {p.dtype for p in decoder.parameters()} == {getattr(torch, stored)}

    def outputs(checkpoint) -> list[np.ndarray]:
        found = [a for case in accuracy_references(checkpoint) for a in (case.logits, case.continuation)]
        refs = references(checkpoint.model, "gqa")
        found += [w for sequence in refs.decoder for run in sequence.runs for w in run.want]
        scales = calibrate_kv_scales(checkpoint)
        return found + scales.keys + scales.values

    want = outputs(wide)
    with computing_in_fp32(narrow.model):
        got = outputs(narrow)
        with pytest.raises(RuntimeError, match="size of tensor"):  # in the first norm, once its weight is widened
            decoder(inputs_embeds=torch.zeros(1, 2, 3))
        assert {p.dtype for p in decoder.parameters()} == {getattr(torch, stored)}  # given back all the same
    assert len(got) == len(want) and all(g.dtype == w.dtype and np.array_equal(g, w) for g, w in zip(got, want))
    assert {p.dtype for p in decoder.parameters()} == {getattr(torch, stored)}


def test_validated_fused_export_of_an_fp16_checkpoint_keeps_it_fp16(tmp_path, monkeypatch):
    """The validated export's PyTorch side runs on the fp16-stored decoder (no fp32 copy of it), and the
    bundle still answers as transformers' fp32 model does."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from ortllava_export import cli
    from ortllava_export.tiny import build_checkpoint

    checkpoint = build_checkpoint(tmp_path / "checkpoint")
    LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float16).save_pretrained(checkpoint)
    loaded = []
    load = cli.load_checkpoint
    monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    bundle = cli.export_bundle(str(checkpoint), tmp_path / "fp32")
    assert {p.dtype for p in loaded[0].model.model.language_model.parameters()} == {torch.float16}
    assert read_manifest(bundle).accuracy["top1_agreement"] == 1.0
    prompt, image = "[INST] <image>\nHi [/INST]", random_image(90, 60)
    result = ortllava.load(bundle, provider="cpu").generate(prompt=prompt, images=[image], max_new_tokens=4)
    assert result.token_ids == transformers_greedy(checkpoint, prompt, [image], 4)


def test_export_cli_without_its_dependencies_says_what_to_install(tmp_path):
    """A runtime-only install (no torch, transformers, onnx, onnxscript) has the ortllava-export command and
    `ortllava bench` too: they say what to install instead of failing in an import."""
    script = without_packages("torch", "transformers", "onnx", "onnxscript") + textwrap.dedent(f"""
        from ortllava.cli import main as runtime_main
        from ortllava_export.cli import main
        code = main(["--model", "tiny", "--output", {str(tmp_path / "b")!r}])
        print("bench:", file=sys.stderr)
        sys.exit(code * 10 + runtime_main(["bench", "tiny"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 11 and "Traceback" not in out.stderr, out.stderr  # both exit 1
    export, bench = out.stderr.split("bench:")
    assert "ortllava-export: error: needs torch and transformers and onnx and onnxscript: pip install 'ortllava[export]'" in export
    assert "ortllava: error: ortllava bench needs torch and transformers and onnx and onnxscript: pip install 'ortllava[export]'" in bench
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("fault", ["rotary one position off", "layer 0 q/k/v weights 2% too large"])
def test_validation_catches_a_subtly_wrong_graph(tmp_path, monkeypatch, fault):
    """The fp32 tolerance leaves room for summation order only: small wiring faults fail the export, and no bundle
    is written."""
    from ortllava_export.checks.validate import ExportValidationError
    from ortllava_export.cli import export_bundle
    from ortllava_export.graphs import fused_decoder

    if fault.startswith("rotary"):
        tables = fused_decoder._rotary_tables
        monkeypatch.setattr(fused_decoder, "_rotary_tables", lambda *a: tuple(np.roll(t, 1, axis=0) for t in tables(*a)))
    else:
        weight, calls = fused_decoder._linear_weight, []

        def skewed(*linears):
            calls.append(linears)
            return weight(*linears) * (1.02 if len(calls) == 1 else 1.0)  # the first call: layer 0's packed q/k/v

        monkeypatch.setattr(fused_decoder, "_linear_weight", skewed)
    with pytest.raises(ExportValidationError, match="decoder"):
        export_bundle("tiny", tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, named", [
    (["--target", "cpu", "--block-size", "64"], "--target, --block-size: these options apply"),
    (["--asymmetric", "--quantize-lm-head", "--accuracy-level", "4"], "--asymmetric, --quantize-lm-head, --accuracy-level: these options apply"),
    (["--precision", "fp16", "--accuracy-level", "0"], "--accuracy-level: this option applies"),
])
def test_export_cli_refuses_int4_options_without_int4(tmp_path, options, named):
    out = subprocess.run(
        [sys.executable, "-m", "ortllava_export.cli", "--model", "tiny", "--output", str(tmp_path / "b"), *options],
        capture_output=True, text=True,
    )
    assert out.returncode == 2 and f"{named} to --precision int4 only" in out.stderr
    assert not (tmp_path / "b").exists()


def test_export_refuses_bad_options_before_loading(tmp_path):
    from ortllava_export.cli import export_bundle

    with pytest.raises(SystemExit, match="--block-size 1024: onnxruntime's MatMulNBits takes 16, 32, 64, 128 or 256"):
        export_bundle("tiny", tmp_path / "b", precision="int4", int4=Int4Options(block_size=1024))
    with pytest.raises(SystemExit, match="--accuracy-level 4 .* is for fp32 activations: use --target cpu"):
        export_bundle("tiny", tmp_path / "b", precision="int4", target="cuda", int4=Int4Options(accuracy_level=4))
    out = subprocess.run(
        [sys.executable, "-m", "ortllava_export.cli", "--model", "tiny", "--output", str(tmp_path / "b"), "--precision", "int4", "--block-size", "1024"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2 and out.stderr.startswith("ortllava-export: error: --block-size 1024")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="--revision v2 names a hub revision, but .* is a local folder"):
        export_bundle(str(checkpoint), tmp_path / "b", revision="v2")
    with pytest.raises(FileNotFoundError, match="--revision main names a hub revision, but 'tiny' is built here"):
        export_bundle("tiny", tmp_path / "b", revision="main")
    with pytest.raises(FileNotFoundError, match="there is no such folder"):  # a path, not tried as a hub id
        export_bundle(str(tmp_path / "no" / "such" / "checkpoint"), tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_checkpoint_without_any_chat_template_is_measured_on_plain_prompts(tmp_path, monkeypatch):
    """No chat template of its own and the registry's missing (ORTLLAVA_TEMPLATES elsewhere): the bundle has no
    template, and the int8 cache's calibration and the accuracy report ask plain `<image>` prompts instead of failing
    (on the same token ids on both sides: an fp32 bundle agrees with PyTorch everywhere)."""
    from ortllava_export import families
    from ortllava_export.checkpoint import load_checkpoint
    from ortllava_export.checks.accuracy import accuracy_references, accuracy_report
    from ortllava_export.cli import export_bundle
    from ortllava_export.graphs.kv_cache import calibrate_kv_scales
    from ortllava_export.tiny import build_checkpoint

    folder = build_checkpoint(tmp_path / "checkpoint")
    (folder / "chat_template.jinja").unlink()
    monkeypatch.setattr(families, "TEMPLATES_DIR", tmp_path / "no-templates")
    checkpoint = load_checkpoint(str(folder))
    assert checkpoint.chat_template_origin == "none"
    scales = calibrate_kv_scales(checkpoint)
    references = accuracy_references(checkpoint)
    assert all(np.isfinite(k).all() and (k > 0).all() for k in scales.keys + scales.values)
    bundle = export_bundle(checkpoint, tmp_path / "bundle", validate=False)
    assert not (bundle / "chat_template.jinja").exists()
    report = accuracy_report(references, bundle)
    assert report["reference"].endswith("(plain prompts: the checkpoint has no chat template)")
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] < 1e-3


def test_the_accuracy_report_refuses_prompts_the_two_sides_tokenised_differently(mistral):
    from ortllava_export.checks.accuracy import NEW_TOKENS, AccuracyCase, accuracy_report, prompt_request
    from ortllava_export.checks.validate import ExportValidationError
    from ortllava_export.photos import photo

    pipe = ortllava.load(mistral.bundle, provider="cpu")
    request = prompt_request(pipe.processor, photo(300, 200, 1), "What is it?")
    ids = pipe.prepare(**request)[0]["input_ids"][0]
    vocab = pipe.manifest.text.vocab_size
    shifted = ids.copy()
    shifted[-2] += 1  # as if transformers had read one token differently
    case = AccuracyCase("What is it?", request, shifted, np.zeros(NEW_TOKENS, np.int64), np.zeros((NEW_TOKENS, vocab), np.float32))
    with pytest.raises(ExportValidationError, match=rf"tokenises the accuracy prompt 'What is it\?' differently .* position {len(ids) - 2}"):
        accuracy_report([case], mistral.bundle)


def test_export_errors_name_the_stage_that_failed(tmp_path, monkeypatch, capsys):
    from ortllava_export import cli

    def too_large(*args, **kwargs):
        raise OSError(27, "File too large")

    monkeypatch.setattr(cli, "load_checkpoint", too_large)
    assert cli.main(["--model", "tiny", "--output", str(tmp_path / "b")]) == 1
    assert "ortllava-export: error: [1/8] Loading checkpoint tiny failed: [Errno 27] File too large" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_reading_the_cache_of_a_model_output_does_not_warn():
    """transformers 5.24 warns that `past_key_values` is deprecated (now `cache`); the calibration and the validation
    references read the field this version has."""
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    from ortllava_export.checkpoint import load_checkpoint
    from ortllava_export.checks.validate import _fused_decoder_cases
    from ortllava_export.graphs.kv_cache import calibrate_kv_scales

    class Collected(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    checkpoint = load_checkpoint("tiny")
    collected = Collected()
    transformers_logger = hf_logging.get_logger("transformers")  # (it does not propagate to the root logger)
    transformers_logger.addHandler(collected)
    hf_logging.warning_once.cache_clear()  # (the warning shows once per process: an earlier test may have shown it)
    try:
        scales = calibrate_kv_scales(checkpoint)
        with torch.no_grad():
            _fused_decoder_cases(checkpoint.model)
    finally:
        transformers_logger.removeHandler(collected)
    assert len(scales.keys) == checkpoint.model.config.text_config.num_hidden_layers
    assert not [message for message in collected.messages if "deprecated" in message]


def test_the_lm_head_counts_toward_external_data(tmp_path, monkeypatch):
    """A few layers and a large vocabulary: the lm_head (and the rotary tables) can push the graph past protobuf's
    2 GiB on their own, so they count in the external-data decision."""
    from ortllava_export.graphs import fused_decoder
    from ortllava_export.tiny import TinySpec, build_model, build_tokenizer

    model = build_model(TinySpec(), build_tokenizer("mistral"))
    layers = sum(p.numel() for p in model.model.language_model.layers.parameters()) * 4
    monkeypatch.setattr(fused_decoder, "EXTERNAL_DATA_THRESHOLD", layers + 1)  # over the layers' fp32 bytes alone
    spec = fused_decoder.build_fused_decoder(model, tmp_path / "decoder.onnx")
    assert spec.external_data == ["decoder.onnx.data"]
    assert (tmp_path / "decoder.onnx.data").stat().st_size >= model.lm_head.weight.numel() * 4


def test_the_tokenizer_keeps_its_own_chat_template_beside_the_processors(tiny_store, tmp_path):
    """A checkpoint whose tokenizer has a chat template of its own, unlike its processor's: the bundle's tokenizer
    renders with it (`tokenizer.apply_chat_template`, as transformers' tokenizer of the checkpoint does), its
    processor with the processor's."""
    import shutil

    from transformers import AutoProcessor, AutoTokenizer

    from ortllava_export.cli import export_bundle

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_store.get("llama3").checkpoint, checkpoint)  # (the llava-hf layout: no template file for the tokenizer)
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    config_file.write_text(json.dumps(config))
    theirs, their_processor = AutoTokenizer.from_pretrained(checkpoint), AutoProcessor.from_pretrained(checkpoint)
    assert theirs.chat_template == config["chat_template"] != their_processor.chat_template  # (the case, as transformers loads it)
    ours = ortllava.load(export_bundle(str(checkpoint), tmp_path / "bundle", validate=False), provider="cpu").processor
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    assert ours.tokenizer.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False) == "<<user>> Hi there\n<<assistant>> Hello\n"
    assert ours.tokenizer.apply_chat_template(chat)["input_ids"] == theirs.apply_chat_template(chat)["input_ids"]
    listed = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert ours.apply_chat_template(listed, add_generation_prompt=True) == their_processor.apply_chat_template(listed, add_generation_prompt=True)
