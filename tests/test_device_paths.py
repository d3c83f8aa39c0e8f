"""The paths that keep keys/values where a device would hold them, run on the CPU provider for each kind of cache
(fp32, fp16, int8, concat): a prefilled cache's rows copied (`num_return_sequences`), beam search's rows reordered
by the bundle's `kv_reorder` graph, the prompt's embeddings gathered by its `feature_splice` graph, and every
session and buffer placed on a GPU index (`cuda:1`, simulated). The GPU check (scripts/gpu/check.py) runs the same
paths on CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ortllava
from ortllava.bundle.manifest import read_manifest

from conftest import PROMPT, random_image


@pytest.mark.parametrize("name", ["kv8", "fp16"])
def test_copied_rows_continue_as_the_one_they_copy(bundles, name):
    """`repeat_rows` (num_return_sequences: one prefill, its keys/values copied per answer) on an int8 and an fp16
    cache: each copy's steps give the logits the original's give (top_k=1 sampling is greedy)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fp16 bundle's "made for CUDA")
        pipe = ortllava.load(bundles[name], provider="cpu")
    image = random_image(400, 300, seed=8)
    alone = pipe.generate(prompt=PROMPT, images=[image], max_new_tokens=6, min_new_tokens=6, output_logits=True)
    copies = pipe.generate(prompt=PROMPT, images=[image], max_new_tokens=6, min_new_tokens=6, output_logits=True,
                           do_sample=True, top_k=1, num_return_sequences=3)
    for copy in copies:
        assert copy.token_ids == alone.token_ids
        # (one row or three through a step's MatMuls may round differently; a lost or misplaced copy moves them by units)
        np.testing.assert_allclose(copy.logits, alone.logits, rtol=1e-4, atol=1e-4 * np.abs(alone.logits).max())


@pytest.mark.parametrize("name", ["fp32", "fp32-concat", "fp16", "kv8", "int4-concat"])
def test_beam_search_reorders_rows_with_the_bundles_graph_as_on_a_device(bundles, tiny_store, name):
    """On a device, beam search reorders the cache's rows with the bundle's `kv_reorder` graph: a fused cache's rows
    are gathered into a second set of buffers, which then swap with the first (one run a reorder), or, where the
    buffers keep their addresses (CUDA graphs), are copied back (two runs); the concat decoder takes the gathered
    tensors. Run here on the CPU provider with IO binding: the answers are those of numpy's reorder, for each kind
    of cache, and the second set goes when the generation ends."""
    import warnings

    from ortllava.bundle.manifest import KV_REORDER_GRAPH
    from ortllava.bundle.sessions import create_session

    bundle = {"fp32": tiny_store.get("mistral").bundle, "fp32-concat": tiny_store.get("mistral-concat").bundle}.get(name) or bundles[name]
    spec = read_manifest(bundle).graphs[KV_REORDER_GRAPH]
    assert spec.inputs[0] == "rows" and len(spec.outputs) == 2 * read_manifest(bundle).text.num_layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fp16 bundle's "made for CUDA")
        pipe = ortllava.load(bundle, provider="cpu", io_binding=True)
    decoder = pipe.sessions.decoder
    assert decoder.reorder is None  # (on the host, numpy reorders)
    options = dict(prompt=PROMPT, images=[random_image(400, 300, seed=8)], max_new_tokens=8, min_new_tokens=8, num_beams=3, num_return_sequences=3)
    want = [r.token_ids for r in pipe.generate(**options)]
    assert len(set(map(tuple, want))) == 3  # (the check can fail: the beams differ)
    decoder.reorder = create_session(Path(bundle) / spec.file, ["CPUExecutionProvider"])
    runs, reorders = [], []
    run = decoder.reorder.run_with_iobinding
    decoder.reorder.run_with_iobinding = lambda binding, *args: runs.append(1) or run(binding, *args)
    fused = name not in ("fp32-concat", "int4-concat")
    for keep_addresses in (False, True) if fused else (False,):
        decoder.keep_buffer_addresses = keep_addresses
        runs.clear()
        if fused:
            gather = decoder._gather_on_device
            decoder._gather_on_device = lambda cache, rows: reorders.append(1) or gather(cache, rows)
        got = [r.token_ids for r in pipe.generate(**options)]
        assert got == want, keep_addresses
        if fused:
            assert len(reorders) >= 4 and len(runs) == (2 if keep_addresses else 1) * len(reorders)
            assert decoder._spare.state.scratch is None  # (released with the generation)
            del decoder._gather_on_device
            reorders.clear()
        else:
            assert len(runs) >= 4


def test_a_gpu_index_reaches_every_session_and_the_buffers(bundles, monkeypatch):
    """provider="cuda:1", simulated on the CPU (the CUDA provider listed, each session made on the CPU): every session
    is asked for GPU 1, the CUDA-graph decoder session, beam search's row gather and the prompt's embedding gather
    too, and the IO-bound buffers are placed there."""
    import onnxruntime as ort

    from ortllava.bundle import sessions as sessions_module
    from ortllava.decoders import Device

    asked = {}
    create = sessions_module.create_session

    def recording(path, providers, *args, **kwargs):
        asked[Path(path).name] = providers
        return create(path, ["CPUExecutionProvider"], *args, **kwargs)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(sessions_module, "create_session", recording)
    pipe = ortllava.load(bundles["fp16"], provider="cuda:1", verify=False, cuda_graph=True)
    assert pipe.sessions.decoder.device == Device("cuda", 1) and pipe.sessions.decoder.cuda_graph
    # (beam search's gather and the prompt's embeddings' too)
    assert sorted(asked) == ["decoder.onnx", "feature_splice.onnx", "kv_reorder.onnx", "projector.onnx", "vision_encoder.onnx"]
    assert pipe.sessions.decoder.reorder is not None and pipe.sessions.decoder.keep_buffer_addresses  # (a captured step's buffers stay)
    assert pipe.sessions.splice is not None and pipe.sessions.splice.device == Device("cuda", 1)
    for name, providers in asked.items():
        assert providers[0][0] == "CUDAExecutionProvider" and providers[0][1]["device_id"] == 1, name
    assert asked["decoder.onnx"][0][1] == {"device_id": 1, "enable_cuda_graph": "1"}


def test_a_cuda_provider_that_falls_back_to_the_cpu(bundles, monkeypatch):
    """onnxruntime answers a CUDA provider it cannot start (its libraries missing, no such GPU) with a CPU session and
    a logged line. Where CUDA was asked for, ortllava stops there with an error naming the GPU, rather than failing
    later in onnxruntime's words at the first device buffer or running on the CPU under CUDA's name; "auto" runs
    on the CPU and warns why."""
    import onnxruntime as ort

    from ortllava.bundle import sessions as sessions_module

    made = ort.InferenceSession

    def fell_back(path, sess_options=None, providers=None):
        return made(path, sess_options=sess_options, providers=["CPUExecutionProvider"])  # (what the fallback gives)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(sessions_module.ort, "InferenceSession", fell_back)
    with pytest.raises(RuntimeError, match=r"could not start its CUDA execution provider on GPU 1 for vision_encoder\.onnx .*fell back to CPUExecutionProvider"):
        ortllava.load(bundles["fp16"], provider="cuda:1", verify=False)
    with pytest.warns(UserWarning, match="fp16 activations"):  # (the CPU provider asked for is no fallback)
        ortllava.load(bundles["fp16"], provider="cpu", verify=False)
    # provider="auto" (CUDA where onnxruntime lists it) runs on the CPU instead, saying why, where the caller is.
    with pytest.warns(UserWarning) as caught:
        pipe = ortllava.load(bundles["fp16"], verify=False)
    assert pipe.provider == "CPUExecutionProvider" and pipe.sessions.device.type == "cpu"
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("provider 'auto' runs this bundle on the CPU: onnxruntime could not start its CUDA execution provider on GPU 0") for m in messages), messages
    assert {Path(w.filename).name for w in caught} == {Path(__file__).name}
    assert pipe.generate(PROMPT, images=[random_image(64, 48)], max_new_tokens=2).token_ids


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_prompt_embeddings_gathered_where_the_decoder_runs(bundles, tiny_store, monkeypatch, name):
    """On a device, the projector's features stay there: the bundle's `feature_splice` gathers the prompt's
    embeddings from them and the text's (run here on the CPU provider with IO binding). The answers and their
    logits are the host path's exactly (the same embeddings, bit for bit), for one image, two, a batch of two, and a
    long prompt the CPU cuts into chunks; a padded batch takes the host path, and so does a prompt without images."""
    import warnings

    from ortllava.bundle.manifest import FEATURE_SPLICE_GRAPH
    from ortllava.bundle.sessions import FeatureSplice, VisionPath, create_session
    from ortllava.decoders import fused

    bundle = tiny_store.get("mistral").bundle if name == "fp32" else bundles[name]
    spec = read_manifest(bundle).graphs[FEATURE_SPLICE_GRAPH]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fp16 bundle's "made for CUDA")
        pipe = ortllava.load(bundle, provider="cpu", io_binding=True)
    assert pipe.sessions.splice is None  # (on the host, numpy packs and splices)
    first, second = random_image(400, 300, seed=8), random_image(300, 500, seed=9)
    cases = [
        dict(prompt=PROMPT, images=[first]),
        dict(prompt="[INST] <image>\n<image>\nCompare them. [/INST]", images=[first, second]),
        dict(prompt=[PROMPT, PROMPT], images=[[first], [random_image(400, 300, seed=10)]]),  # a batch without padding
        dict(prompt=[PROMPT, "[INST] <image>\nAnd this one, described at more length? [/INST]"], images=[[first], [second]]),  # padded
        dict(prompt="[INST] No image here. [/INST]"),
    ]
    options = dict(max_new_tokens=5, min_new_tokens=5, output_logits=True)
    want = [pipe.generate(**case, **options) for case in cases]
    splice = FeatureSplice(create_session(Path(bundle) / spec.file, ["CPUExecutionProvider"]), pipe.sessions.device)
    runs, downloads = [], []
    pipe.sessions.splice = splice
    run = splice.session.run_with_iobinding
    splice.session.run_with_iobinding = lambda binding, *args: runs.append(1) or run(binding, *args)
    to_host = VisionPath.__call__
    monkeypatch.setattr(VisionPath, "__call__", lambda self, tiles: downloads.append(len(tiles)) or to_host(self, tiles))
    for case, expected in zip(cases, want):
        runs.clear(), downloads.clear()
        got = pipe.generate(**case, **options)
        batch = isinstance(case["prompt"], list)
        for ours, theirs in zip(got if batch else [got], expected if batch else [expected]):
            assert ours.token_ids == theirs.token_ids
            np.testing.assert_array_equal(ours.logits, theirs.logits)
        on_device = "images" in case and not (batch and case["prompt"][0] != case["prompt"][1])  # (padded: on the host)
        assert (runs, bool(downloads)) == (([1], False) if on_device else ([], "images" in case)), case
    # A prompt longer than the CPU's prefill chunk: its embeddings come back to the host to be cut (exactly).
    monkeypatch.setattr(fused, "CPU_PREFILL_CHUNK", 16)
    runs.clear()
    got = pipe.generate(**cases[0], **options)
    assert runs == [1] and got.token_ids == want[0].token_ids
    np.testing.assert_allclose(got.logits, want[0].logits, rtol=1e-4, atol=1e-4 * np.abs(want[0].logits).max())  # (other runs: other rounding)
