"""`ortllava bench`: it runs end to end on the tiny model and reports, and refuses what it cannot measure."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest


def test_bench_runs_and_reports(tmp_path):
    """Two precisions from the same weights, alternating in the same runs (int4 on the CPU: an int8 cache by
    default); fp32 must match transformers."""
    out, plot = tmp_path / "bench.json", tmp_path / "bench.svg"
    run = subprocess.run(
        [sys.executable, "-m", "ortllava.cli", "bench", "tiny", "--precision", "fp32,int4", "--new-tokens", "8",
         "--repeats", "2", "--threads", "2", "--json", str(out), "--plot", str(plot)],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["precision"] == "fp32" and report["tokens_identical"] is True  # the first precision at the top level
    assert list(report["precisions"]) == ["fp32", "int4"]
    assert [r["kv_dtype"] for r in report["precisions"].values()] == ["float32", "int8"]  # --kv-cache auto: int8 for int4 only
    assert report["precisions"]["int4"]["decoder_file_bytes"] < report["precisions"]["fp32"]["decoder_file_bytes"]
    assert report["bandwidth_gb_s"] > 0
    for name, result in report["precisions"].items():
        assert result["decode_floor_ms"] > 0 and result["ratios"]["decode_speedup_vs_first"] > 0
        for key in ("preprocess_s", "time_to_first_token_s", "decode_ms_per_token", "total_s"):
            assert result["ortllava"][key] > 0 and report["transformers"][key] > 0
            # Every run is kept beside the medians, in the order they ran.
            for median, runs in ((result["ortllava"], result["ortllava_runs"]), (report["transformers"], report["transformers_runs"])):
                assert len(runs) == 2 and median[key] == pytest.approx(statistics.median(run[key] for run in runs))
    fp32, int4 = report["precisions"]["fp32"], report["precisions"]["int4"]
    assert fp32["token_agreement"] == 1.0 and fp32["tokens_identical"] is True and fp32["same_prefix_tokens"] == 8
    assert "fp32 True (the first 8 of 8 the same)" in run.stdout
    # The ratios are the report's own figures put together, as the table prints them.
    assert int4["ratios"]["decode_speedup_vs_first"] == pytest.approx(fp32["ortllava"]["decode_ms_per_token"] / int4["ortllava"]["decode_ms_per_token"])
    assert fp32["fraction_of_floor"] == pytest.approx(fp32["decode_floor_ms"] / fp32["ortllava"]["decode_ms_per_token"])
    assert "decode floor" in run.stdout and "time to first token" in run.stdout and "decode speed vs fp32: int4" in run.stdout
    # The plot: an SVG document with a stacked bar per contender and a floor line per ortllava precision.
    import xml.etree.ElementTree as ElementTree

    svg = ElementTree.parse(plot).getroot()
    texts = [node.text for node in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert texts.count("ortllava fp32") == texts.count("ortllava int4 + int8 cache") == texts.count("transformers") == 2  # both panels
    assert len(list(svg.iter("{http://www.w3.org/2000/svg}line"))) == 2


def test_bench_refuses_unknown_precisions():
    run = subprocess.run([sys.executable, "-m", "ortllava.cli", "bench", "tiny", "--precision", "fp32,int8"], capture_output=True, text=True)
    assert run.returncode == 2 and "int8" in run.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--repeats", "0"], "argument --repeats: must be a whole number >= 1"),
    (["--threads", "-1"], "argument --threads: must be a whole number >= 1"),
    (["--block-size", "1024", "--precision", "int4"], "argument --block-size: invalid choice"),
])
def test_bench_refuses_bad_arguments_up_front(arguments, message):
    run = subprocess.run([sys.executable, "-m", "ortllava.cli", "bench", "tiny", *arguments], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr


def test_bench_refuses_what_it_would_only_find_out_at_the_end(tmp_path):
    """int4 options without int4, and a report file in a folder that does not exist: refused before any export."""
    for arguments, message in (
        (["--quantize-lm-head"], "--quantize-lm-head only apply to int4 bundles"),
        (["--json", str(tmp_path / "missing" / "r.json")], "its folder does not exist"),
    ):
        run = subprocess.run([sys.executable, "-m", "ortllava.cli", "bench", "tiny", *arguments], capture_output=True, text=True)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr


def test_bench_reuses_only_its_own_bundle(tiny_store):
    """`--bundle` reuses the bundle it finds only when it is the one the run would export."""
    from ortllava_export.bench.run import bundle_mismatch
    from ortllava_export.checkpoint import load_checkpoint
    from ortllava_export.graphs.quantize import Int4Options
    from ortllava_export.plan import plan_export

    tiny = tiny_store.get("mistral")
    checkpoint = load_checkpoint(str(tiny.checkpoint))

    def plan(precision, target="cpu", kv_cache="float"):
        return plan_export(precision, "gqa", target, False, Int4Options(), kv_cache)

    assert bundle_mismatch(tiny.bundle, checkpoint, plan("fp32")) is None
    assert bundle_mismatch(tiny.bundle, checkpoint, plan("int4", kv_cache="auto")) == (
        "precision 'fp32', not 'int4'; key/value cache 'float', not 'int8'; block size None, not 32; symmetric None, not True; "
        "quantize lm head None, not False; accuracy level None, not 4"  # (auto: int8 and level 4 for a CPU int4 bundle)
    )
    assert bundle_mismatch(tiny.bundle, checkpoint, plan("fp16")) == "precision 'fp32', not 'fp16'; activations 'float32', not 'float16'"
    assert "activations 'float32', not 'float16'" in bundle_mismatch(tiny.bundle, checkpoint, plan("int4", target="cuda"))
    checkpoint.source = "elsewhere"
    assert bundle_mismatch(tiny.bundle, checkpoint, plan("fp32")).startswith(f"source {str(tiny.checkpoint)!r}, not 'elsewhere'")


def test_bench_needs_two_new_tokens():
    """The decode figure is the time from the first new token to the last: one token has none (it divided by zero)."""
    run = subprocess.run([sys.executable, "-m", "ortllava.cli", "bench", "tiny", "--new-tokens", "1"], capture_output=True, text=True)
    assert run.returncode == 2 and "argument --new-tokens: must be a whole number >= 2" in run.stderr  # (argparse, before any work)
    from ortllava_export.bench.run import bench

    with pytest.raises(ValueError, match=">= 2"):  # (the Python entry point checks it too)
        bench("tiny", new_tokens=1)


def test_bench_removes_its_temporary_bundles_when_it_fails(monkeypatch):
    import tempfile

    from ortllava_export import cli
    from ortllava_export.bench import run as bench

    made = []  # (held here, so only an explicit cleanup removes the folder, not the object's finalizer)

    class Recorded(tempfile.TemporaryDirectory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench.tempfile, "TemporaryDirectory", Recorded)
    monkeypatch.setattr(cli, "export_bundle", fail)
    with pytest.raises(OSError, match="No space left"):
        bench.bench("tiny", new_tokens=2, repeats=1, threads=1)
    assert len(made) == 1 and not os.path.exists(made[0].name)


def test_bench_ratio_lines_say_what_they_compare(capsys):
    from ortllava_export.bench.run import print_report

    timings = {"preprocess_s": 0.01, "vision_s": 0.02, "time_to_first_token_s": 0.1, "decode_ms_per_token": 5.0, "tokens_per_s": 200.0, "total_s": 0.5}
    ratios = {"end_to_end": 0.05, "time_to_first_token": 0.3, "decode": 0.4, "preprocess": 0.2, "decode_vs_floor": 1.2, "decode_speedup_vs_first": 1.0}
    run = {"ortllava": timings, "ratios": ratios, "decoder_file_bytes": 1e6, "decode_floor_ms": 4.0, "decode_step_bytes": 2**20,
           "fraction_of_floor": 0.8, "tokens_identical": True, "same_prefix_tokens": 8, "kv_dtype": "float32"}
    report = {"model": "tiny", "layers": 2, "provider": "cpu", "threads": 2, "prompt_tokens": 100, "new_tokens": 8, "repeats": 1,
              "precisions": {"fp32": run, "int4": {**run, "ratios": {**ratios, "decode_speedup_vs_first": 3.0}}},
              "transformers": {**timings, "vision_s": None}, "bandwidth_gb_s": 20.0, "peak_host_rss_mb": 100.0}
    print_report(report)
    out = capsys.readouterr().out
    assert "fp32: end to end 0.05x transformers' time, time to first token 0.30x transformers', decode 0.40x transformers' ms/token" in out
    assert "decode speed vs fp32: int4 3.00x as fast" in out
