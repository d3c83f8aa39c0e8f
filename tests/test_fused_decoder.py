"""The fused ("gqa") decoder as the runtime drives it: buffers reused and preallocated, IO binding, the CUDA-graph
fallback, chunked CPU prefill, decode steps in standard ops, growing a cache past its capacity, and non-finite
logits. Greedy parity of every configuration against transformers is in test_generation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import ortllava

from conftest import PROMPT, one_prefill_and_grown_extend, random_image


def test_fused_decoder_reuses_its_buffers(mistral):
    pipe = ortllava.load(mistral.bundle, provider="cpu", max_length=4096)
    decoder = pipe.sessions.decoder
    first = pipe.generate(prompt=PROMPT, images=[random_image(400, 300, seed=1)], max_new_tokens=6, min_new_tokens=6)
    buffers = [id(value) for value in decoder._spare.state.kv]
    assert decoder._spare.capacity == 4096  # max_length: one static size for every generation
    again = pipe.generate(prompt=PROMPT, images=[random_image(400, 300, seed=1)], max_new_tokens=6, min_new_tokens=6)
    assert [id(value) for value in decoder._spare.state.kv] == buffers
    assert again.token_ids == first.token_ids
    # A different batch size needs other buffers; the answers stay the same.
    batch = pipe.generate(prompt=[PROMPT, PROMPT], images=[random_image(400, 300, seed=1)] * 2, max_new_tokens=6, min_new_tokens=6)
    assert [r.token_ids for r in batch] == [first.token_ids] * 2


def test_fixed_max_length_serves_every_request_that_fits(mistral, monkeypatch):
    """A `max_length` off the 256-position growth step still serves requests up to it, and refuses longer ones
    before any graph runs, naming the fixed length."""
    pipe = ortllava.load(mistral.bundle, provider="cpu", max_length=300)
    prompt = "hello " * 50
    length = pipe.prepare(prompt=prompt)[0]["input_ids"].shape[1]
    assert length < 256
    # The request fills exactly the 300 positions (more than one growth step of 256): the last new token is never
    # fed back, so it takes none (transformers, too, answers up to the last position).
    fits = 300 - length + 1
    result = pipe.generate(prompt=prompt, max_new_tokens=fits, min_new_tokens=fits)
    assert len(result.token_ids) == fits and pipe.sessions.decoder._spare.capacity == 300
    monkeypatch.setattr(pipe.sessions.decoder, "start", lambda *a, **k: pytest.fail("the decoder ran"))
    with pytest.raises(ValueError, match="max_length=300"):
        pipe.generate(prompt=prompt, max_new_tokens=fits + 1)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="max_length must be a positive"):
            ortllava.load(mistral.bundle, provider="cpu", max_length=bad)
    served = pipe.manifest.text.max_position_embeddings
    with pytest.warns(UserWarning, match=f"max_length={served + 1} is more than the {served} positions this decoder serves") as caught:
        ortllava.load(mistral.bundle, provider="cpu", verify=False, max_length=served + 1)
    assert caught[0].filename == __file__  # (pointing at the caller's load)


def test_max_length_given_for_a_concat_bundle_is_warned_of(tiny_store):
    """A concat decoder's cache grows as it needs: the buffers' length it cannot use is said to be ignored."""
    with pytest.warns(UserWarning, match="max_length=300 sizes a gqa decoder's key/value buffers; this bundle's decoder is concat") as caught:
        ortllava.load(tiny_store.get("mistral-concat").bundle, provider="cpu", verify=False, max_length=300)
    assert caught[0].filename == __file__


def test_fused_decoder_needs_io_binding(mistral):
    with pytest.raises(ValueError, match="IO binding"):
        ortllava.load(mistral.bundle, provider="cpu", io_binding=False)


def test_cuda_graph_request_falls_back_cleanly_on_cpu(mistral):
    image = random_image(300, 300, seed=2)
    plain = ortllava.load(mistral.bundle, provider="cpu").generate(prompt=PROMPT, images=[image], max_new_tokens=5, min_new_tokens=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = ortllava.load(mistral.bundle, provider="cpu", cuda_graph=True)
    (warning,) = [w for w in caught if "cuda_graph" in str(w.message)]
    assert warning.filename == __file__  # it points at the caller's load(), not inside ortllava
    assert pipe.generate(prompt=PROMPT, images=[image], max_new_tokens=5, min_new_tokens=5).token_ids == plain.token_ids


def _prompt_then_steps(decoder, embeds: np.ndarray, mask: np.ndarray, steps: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Logits of a prompt `embeds [B, T, D]`, then of each step's embeddings `steps [n, B, 1, D]` (copies)."""
    logits, cache = decoder.start(embeds, mask, capacity=capacity)
    out = [logits.copy()]
    for step in steps:
        cache.step_embeds[...] = step
        out.append(decoder.step(cache).copy())
    decoder.release(cache)
    return out


def test_chunked_cpu_prefill_equals_one_run(tiny_store, monkeypatch):
    """A long one-row prompt prefilled in CPU chunks (a partial last one included) gives the logits and the
    next steps of one run over the whole prompt."""
    import ortllava.decoders.fused as fused

    pipe = ortllava.load(tiny_store.get("mistral").bundle, provider="cpu")
    decoder = pipe.sessions.decoder
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((1, 1000, pipe.manifest.text.hidden_size)).astype(np.float32)
    steps = rng.standard_normal((3, 1, 1, pipe.manifest.text.hidden_size)).astype(np.float32)

    def run(chunk: int) -> list[np.ndarray]:
        monkeypatch.setattr(fused, "CPU_PREFILL_CHUNK", chunk)
        return _prompt_then_steps(decoder, embeds, np.ones((1, 1000), np.int64), steps, capacity=1010)

    extends = []  # the continuation runs
    extend = decoder._extend_once
    monkeypatch.setattr(decoder, "_extend_once", lambda *a, **k: extends.append(1) or extend(*a, **k))
    whole = run(0)  # 0: no chunking
    assert len(extends) == 0
    chunked = run(384)  # chunks of 384, 384 and 232: the first a prompt, the other two continuations
    assert len(extends) == 2
    for want, got in zip(whole, chunked):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    extends.clear()  # a chat turn's long continuation runs in chunks too: 990 tokens in 384, 384 and 222
    _, cache = decoder.start(embeds[:, :10], np.ones((1, 10), np.int64), 1010)
    np.testing.assert_allclose(decoder.extend(embeds[:, 10:], cache), whole[0], atol=1e-4, rtol=1e-4)
    assert len(extends) == 3


def test_cpu_decode_steps_in_standard_ops_equal_the_op(tiny_store):
    """fp32 bundles decode in standard ops while the buffer is mostly filled, with GroupQueryAttention otherwise;
    both give the same logits, past the tiny Mistral's 1024-token sliding window, for a batch of two rows."""
    import onnxruntime as ort

    bundle = tiny_store.get("mistral").bundle
    pipe = ortllava.load(bundle, provider="cpu")
    decoder = pipe.sessions.decoder
    options = ort.SessionOptions()
    options.enable_profiling = True
    decoder.session = ort.InferenceSession(str(bundle / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    embeds = rng.standard_normal((2, 1100, pipe.manifest.text.hidden_size)).astype(np.float32)
    mask = np.ones((2, 1100), np.int64)
    mask[1, :60] = 0  # a left-padded second row: 1040 tokens
    steps = rng.standard_normal((3, 2, 1, pipe.manifest.text.hidden_size)).astype(np.float32)

    def run(capacity: int) -> list[np.ndarray]:
        out = _prompt_then_steps(decoder, embeds, mask, steps, capacity)
        decoder._spare = None  # the next run allocates its own capacity
        return out

    full = run(1103)  # 1280 positions for 1101-1103 held: standard ops
    sparse = run(3000)  # 3072 positions: more than 1.5x the context, the op
    for want, got in zip(sparse, full):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    profile = Path(decoder.session.end_profiling())
    ran = [e["name"] for e in json.loads(profile.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    profile.unlink()
    assert ran.count("layers.0/step/scores_kernel_time") == 3  # the 3 steps of the full buffer
    assert ran.count("layers.0/op_attention_kernel_time") == 2 + 3  # the 2 prompts and the sparse buffer's 3 steps


@pytest.mark.parametrize("config", ["mistral", "mistral-concat"])
def test_extend_past_the_capacity_equals_one_prefill(tiny_store, config):
    """A one-row cache continued by `extend` (and grown past its capacity) gives the logits of one prefill."""
    want, got, cache = one_prefill_and_grown_extend(tiny_store.get(config).bundle)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert int(cache.lengths[0]) == 300


def test_non_finite_logits_are_an_error_not_an_answer(mistral, monkeypatch):
    pipe = ortllava.load(mistral.bundle, provider="cpu")
    decoder = pipe.sessions.decoder
    real_step = decoder.step

    def overflowing_step(cache):
        logits = real_step(cache)
        logits[:, 7] = np.inf  # what an fp16 overflow turns into
        return logits

    monkeypatch.setattr(decoder, "step", overflowing_step)
    with pytest.raises(FloatingPointError, match="non-finite logits at new token 2: an fp32 decoder .* sha256 checks on"):
        pipe.generate(prompt="[INST] Hi [/INST]", max_new_tokens=4, min_new_tokens=4)
    from types import SimpleNamespace

    from ortllava.generation.generate import non_finite_hint

    assert non_finite_hint(SimpleNamespace(dtype=np.float16)).startswith("in fp16, an activation overflowed")  # an fp16 bundle's


def test_a_failed_cuda_graph_capture_falls_back_to_plain_steps(mistral, monkeypatch):
    """Simulated on the CPU: onnxruntime's CUDA provider runs a graph id's first step plainly and captures at a
    later one, so a capture that fails raises from the second step. That step and the cache's later ones run
    uncaptured, with a warning, and the answer is the plain one."""
    want = ortllava.load(mistral.bundle, provider="cpu").generate(prompt="[INST] Hi [/INST]", max_new_tokens=6, min_new_tokens=6).token_ids
    pipe = ortllava.load(mistral.bundle, provider="cpu", max_length=2048)
    decoder = pipe.sessions.decoder
    monkeypatch.setattr(decoder, "cuda_graph", True)  # (before its first cache: each cache gets a graph id)
    inner, runs = decoder.session.run_with_iobinding, {}

    def run(binding, options=None):
        if options is not None and options is not decoder._uncaptured:
            runs[id(options)] = runs.get(id(options), 0) + 1
            if runs[id(options)] == 2:
                raise RuntimeError("simulated: the capture failed")
        return inner(binding, options)

    monkeypatch.setattr(decoder.session, "run_with_iobinding", run)
    with pytest.warns(UserWarning, match="a decode step under CUDA graphs failed .simulated: the capture failed.; continuing without CUDA graphs"):
        got = pipe.generate(prompt="[INST] Hi [/INST]", max_new_tokens=6, min_new_tokens=6).token_ids
    assert got == want and list(runs.values()) == [2]  # (after the failure, only uncaptured runs)


def test_cuda_graph_caches_are_kept_by_batch_size(mistral, monkeypatch):
    """Simulated on the CPU. onnxruntime keeps a captured graph until the session ends, so a cache's buffers (which
    its graph id reads) are reused rather than let go: by batch size, and a chat collected with its cache gives it
    back (its finalizer). Generations of alternating sizes, a dropped chat and two streams at once make graph ids
    only for the caches of each size in use at once, and give the plain answers; an unfinished stream collected in a
    reference cycle with its chat never leaves one cache with two holders (two streams at once after it differ)."""
    import gc

    plain = ortllava.load(mistral.bundle, provider="cpu", max_length=1024)
    pipe = ortllava.load(mistral.bundle, provider="cpu", max_length=1024)
    decoder = pipe.sessions.decoder
    monkeypatch.setattr(decoder, "cuda_graph", True)  # (before its first cache: each cache gets a graph id)
    prompt, sampled = "[INST] Hi [/INST]", dict(do_sample=True, seed=3, num_return_sequences=2)

    def answers(p, **options):
        results = p.generate(prompt=prompt, max_new_tokens=5, **options)
        return [r.token_ids for r in results] if isinstance(results, list) else results.token_ids

    def two_streams_at_once(p, prompts):
        streams = [p.stream(prompt=text, max_new_tokens=5) for text in prompts]
        texts = [next(stream).text for stream in streams]  # both caches taken before either finishes
        return [text + "".join(chunk.text for chunk in stream) for text, stream in zip(texts, streams)]

    for options in ({}, sampled, {}, sampled, {}):  # one row, then two, alternating
        assert answers(pipe, **options) == answers(plain, **options)
    assert decoder._graph_ids == 2  # one cache of each size, reused
    chat = pipe.chat(max_new_tokens=4)
    assert chat.send("Hello").token_ids == plain.chat(max_new_tokens=4).send("Hello").token_ids
    del chat  # its cache, never released, comes back when it is collected
    gc.collect()
    assert answers(pipe) == answers(plain) and decoder._graph_ids == 2
    prompts = [prompt, "[INST] Tell a story [/INST]"]
    assert two_streams_at_once(pipe, prompts) == two_streams_at_once(plain, prompts) and decoder._graph_ids == 3
    for _ in range(2):
        assert answers(pipe) == answers(plain) and answers(pipe, **sampled) == answers(plain, **sampled)
    assert decoder._graph_ids == 3 and sorted(len(kept) for kept in decoder._graph_caches.values()) == [1, 2]

    chat = pipe.chat(max_new_tokens=6)
    chat.send("Hello")
    stream = chat.stream("More")
    next(stream)  # unfinished: the turn holds the cache
    chat.cycle, stream = (chat, stream), None  # the chat, its open stream and itself: collected only by gc
    del chat
    gc.collect()  # the chat's finalizer runs before the stream's own cleanup hands its cache back
    assert two_streams_at_once(pipe, prompts) == two_streams_at_once(plain, prompts)
    kept = [c for caches in decoder._graph_caches.values() for c in caches]
    assert len({id(c.state) for c in kept}) == len(kept)  # no buffers kept twice


def test_a_non_finite_padding_position_leaves_the_real_rows_alone(mistral):
    """A batched prompt's padding positions (right of each row's real tokens) may hold anything, an fp16 overflow
    say: the row's logits come from its last real token only (picked by Where, where a one-hot MatMul would spread
    0 × NaN = NaN), and equal the row run alone."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(Path(mistral.bundle) / "decoder.onnx"), providers=["CPUExecutionProvider"])
    embeds_input, _, *kv_inputs = session.get_inputs()
    width, (_, kv_heads, _, head_dim) = embeds_input.shape[2], kv_inputs[0].shape
    embeds = np.random.default_rng(0).standard_normal((2, 5, width)).astype(np.float32)
    embeds[1, 2:] = np.nan  # row 1 has 2 real tokens

    def run(embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"inputs_embeds": embeds, "attention_mask": mask}
        feed.update({i.name: np.zeros((len(embeds), kv_heads, 16, head_dim), np.float32) for i in kv_inputs})
        return session.run(["logits"], feed)[0]

    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], np.int64)
    batched = run(embeds, mask)
    alone = run(embeds[1:, :2], np.ones((1, 2), np.int64))
    assert np.isfinite(batched).all()
    np.testing.assert_allclose(batched[1], alone[0], rtol=1e-5, atol=1e-5)
    # A real token's NaN does reach its row's logits (as non-finite logits, which the runtime refuses; not as
    # some finite answer), and that row's only.
    embeds[0, 4] = np.nan
    batched = run(embeds, mask)
    assert not np.isfinite(batched[0]).any()
    np.testing.assert_allclose(batched[1], alone[0], rtol=1e-5, atol=1e-5)
