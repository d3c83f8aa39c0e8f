"""Runtime behaviour that needs no reference: IO binding, sampling, providers, threads, torch-free import, streaming."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ortllava
from ortllava import BundleError

from conftest import at_once, random_image, save_png, session_config, without_packages

PROMPT = "[INST] <image>\nWhat is this? [/INST]"


def test_concat_decoder_io_binding_gives_the_same_tokens(tiny_store):
    concat = tiny_store.get("mistral-concat").bundle
    plain = ortllava.load(concat, provider="cpu")
    bound = ortllava.load(concat, provider="cpu", io_binding=True)
    assert bound.sessions.device is not None and plain.sessions.device is None
    image = random_image(500, 300, seed=5)
    plain_results = plain.generate(prompt=[PROMPT, "[INST] hi [/INST]"], images=[image], max_new_tokens=12, min_new_tokens=12)
    bound_results = bound.generate(prompt=[PROMPT, "[INST] hi [/INST]"], images=[image], max_new_tokens=12, min_new_tokens=12)
    assert [r.token_ids for r in bound_results] == [r.token_ids for r in plain_results]
    # The cache between steps is device OrtValues, not numpy arrays.
    embeds = np.zeros((1, 3, bound.manifest.text.hidden_size), np.float32)
    _, cache = bound.sessions.decoder.start(embeds, np.ones((1, 3), np.int64), capacity=8)
    assert all(type(value).__name__ == "OrtValue" for value in cache.state.kv)


def test_only_the_decoder_spins_its_idle_threads(pipe):
    """The vision encoder and projector run once per image and hand over to another session: their idle worker
    threads block instead of spinning on the cores the next session needs (`stop_idle_threads_spinning`); the
    decoder's keep spinning between its steps. The time this saves is in DESIGN.md ("Decisions worth knowing")."""
    vision = pipe.sessions.vision
    sessions = (vision.encoder, vision.projector, pipe.sessions.decoder.session)
    # (no entry: onnxruntime's default, spinning)
    assert [session_config(s, "session.intra_op.allow_spinning") != "0" for s in sessions] == [False, False, True]


def test_seeded_sampling_repeats_and_differs_from_greedy(pipe):
    image = random_image(400, 400, seed=6)
    kwargs = dict(prompt=PROMPT, images=[image], max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    first = pipe.generate(seed=7, **kwargs)
    again = pipe.generate(seed=7, **kwargs)
    other = pipe.generate(seed=8, **kwargs)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    assert first.token_ids != pipe.generate(**{**kwargs, "do_sample": False}).token_ids


def test_module_level_generate_and_path_images(mistral, tmp_path):
    path = save_png(random_image(320, 240, seed=9), tmp_path / "photo.png")
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "Describe"}]}]
    result = ortllava.generate(mistral.bundle, messages, max_new_tokens=4)
    assert isinstance(result, ortllava.GenerationResult) and 1 <= len(result.token_ids) <= 4


def test_auto_runs_a_cpu_bundle_on_the_cpu_where_cuda_is_present(mistral, monkeypatch):
    """provider="auto" picks CUDA only for a bundle made for it: an fp32 fused decoder or an int8 cache, which the
    CUDA provider cannot run (or has not been verified on), load on the CPU; provider="cuda" names the reason."""
    import dataclasses

    from ortllava.bundle import sessions
    from ortllava.bundle.manifest import read_manifest

    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="provider 'auto' runs this bundle on the CPU: this bundle is made for the CPU: its fused decoder computes in fp32") as caught:
        assert ortllava.load(mistral.bundle).provider == "CPUExecutionProvider"
    assert caught[0].filename == __file__  # it points at the caller's load()
    with pytest.raises(BundleError, match="fused decoder computes in fp32, which the CUDA provider's attention cannot. Load it with provider='cpu'"):
        ortllava.load(mistral.bundle, provider="cuda")
    decoder = read_manifest(mistral.bundle).graphs["decoder"]
    assert sessions.cuda_refusal(dataclasses.replace(decoder, dtype="float16")) is None
    assert "int8" in sessions.cuda_refusal(dataclasses.replace(decoder, dtype="float16", kv_dtype="int8"))
    assert sessions.cuda_refusal(dataclasses.replace(decoder, kind="concat")) is None


def test_a_released_cache_goes_to_one_generation(mistral, monkeypatch):
    """Two generations starting at once never share the buffers the last one left: the hand-off is atomic (the
    window between reading and clearing the spare is widened here, so that without the lock both would take it)."""
    import threading
    import time

    from ortllava.decoders import FusedDecoder

    decoder = ortllava.load(mistral.bundle, provider="cpu").sessions.decoder
    held = {"spare": None}

    def slow_read(self):
        spare = held["spare"]
        time.sleep(0.05)
        return spare

    monkeypatch.setattr(FusedDecoder, "_spare", property(slow_read, lambda self, value: held.update(spare=value)), raising=False)
    decoder.release(decoder._new_cache(1, 256))
    start, taken = threading.Barrier(2), []

    def take() -> None:
        start.wait()
        taken.append(decoder._new_cache(1, 256))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 2 and taken[0] is not taken[1]


@pytest.mark.parametrize("config", ["mistral", "mistral-concat"])
def test_generations_in_several_threads_are_those_run_one_by_one(tiny_store, config):
    """A Pipeline shared by threads (a server's workers): each generation keeps its own keys/values, so answers
    that run at the same time are the ones they give alone; a finished cache is reused by one generation only."""
    pipe = ortllava.load(tiny_store.get(config).bundle, provider="cpu")
    images = [random_image(300, 200, seed=61), random_image(250, 500, seed=62)]
    chats = [
        [{"role": "user", "content": ([{"type": "image", "image": images[i % 2]}] if i % 2 == 0 else []) + [{"type": "text", "text": "Why? " * (1 + i)}]}]
        for i in range(6)
    ]
    alone = [pipe.generate(messages=chat, max_new_tokens=8, min_new_tokens=8).token_ids for chat in chats]
    for _ in range(2):
        together = at_once([lambda chat=chat: pipe.generate(messages=chat, max_new_tokens=8, min_new_tokens=8).token_ids for chat in chats])
        assert together == alone


def test_runtime_imports_and_generates_without_torch_or_transformers(mistral, tmp_path):
    path = save_png(random_image(300, 200, seed=11), tmp_path / "photo.png")
    script = without_packages("torch", "transformers", "optimum", "ortllava_export") + textwrap.dedent(f"""
        import json
        import ortllava
        pipe = ortllava.load({str(mistral.bundle)!r}, provider="cpu")
        result = pipe.generate(prompt={PROMPT!r}, images=[{str(path)!r}], max_new_tokens=6, min_new_tokens=6)
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print(json.dumps(result.token_ids))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = ortllava.load(mistral.bundle, provider="cpu").generate(prompt=PROMPT, images=[str(path)], max_new_tokens=6, min_new_tokens=6)
    assert json.loads(out.stdout) == expected.token_ids


# --------------------------------------------------------------------------------------------------
# Streaming and stopping


@pytest.mark.parametrize("seed", range(4))
def test_stream_pieces_join_to_the_generated_text(pipe, seed):
    kwargs = dict(prompt=PROMPT, images=[random_image(300, 300, seed=seed)], max_new_tokens=40, do_sample=True, temperature=1.3, seed=seed)
    chunks = list(pipe.stream(**kwargs))
    result = pipe.generate(**kwargs)
    assert "".join(chunk.text for chunk in chunks) == result.text
    assert chunks[-1].finish_reason == result.finish_reason and chunks[-1].metrics is not None
    # Each chunk carries the tokens since the last one, `token` the last of them: joined, the answer's tokens.
    assert [t for chunk in chunks for t in chunk.token_ids] == result.token_ids
    assert all(chunk.token == (chunk.token_ids[-1] if chunk.token_ids else None) for chunk in chunks)


def test_stop_strings_cut_the_answer(pipe):
    kwargs = dict(prompt=PROMPT, images=[random_image(300, 300, seed=3)], max_new_tokens=30, min_new_tokens=30)
    full = pipe.generate(**kwargs)
    assert len(full.text) > 6
    stop = full.text[4:7]
    cut = pipe.generate(stop=[stop], **kwargs)
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(full.token_ids)
    streamed = list(pipe.stream(stop=[stop], **kwargs))
    assert "".join(c.text for c in streamed) == cut.text and streamed[-1].finish_reason == "stop"


@pytest.mark.parametrize("config", ["mistral", "vicuna"])
def test_a_stop_string_ending_inside_a_token_stops_at_that_token_as_transformers(tiny_store, config):
    """A stop string stops the answer at the token where it ends, as transformers' `stop_strings` does, although the
    streamed text holds that token back: a byte-level BPE token (Mistral's tiny vocabulary) that holds whole
    characters and the first bytes of the next one ("ив" and half of a letter), or a byte-fallback token (Vicuna's
    `<0x0A>`, "\n"), whose byte group the next token could still change."""
    import torch
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration

    model = tiny_store.get(config)
    pipe = ortllava.load(model.bundle, provider="cpu")
    theirs = AutoTokenizer.from_pretrained(model.checkpoint)
    tokenizer = pipe.processor.tokenizer
    if config == "vicuna":
        token, stop = tokenizer.convert_tokens_to_ids("<0x0A>"), "\n"
    else:
        split = [  # tokens whose text alone is whole characters, then a character cut short (U+FFFD)
            index for index in range(len(tokenizer))
            if (text := tokenizer.decode([index])).endswith("\ufffd") and len(text.rstrip("\ufffd")) >= 2 and "\ufffd" not in text.rstrip("\ufffd")
        ]
        assert split, "the tiny vocabulary has no token that ends inside a character: the case is not exercised"
        token = split[0]
        stop = tokenizer.decode([token]).rstrip("\ufffd")[-2:]
    prompt = "[INST] Say something. [/INST]" if config == "mistral" else "USER: Say something. ASSISTANT:"
    kwargs = dict(prompt=prompt, max_new_tokens=6, sequence_bias={(token,): 100.0})  # (every new token is that one)
    ours = pipe.generate(stop=[stop], **kwargs)
    reference = LlavaNextForConditionalGeneration.from_pretrained(model.checkpoint).eval()
    inputs = theirs(prompt, return_tensors="pt")
    with torch.no_grad():
        out = reference.generate(
            **inputs, do_sample=False, max_new_tokens=6, sequence_bias={(token,): 100.0}, stop_strings=[stop], tokenizer=theirs
        )
    assert ours.token_ids == out[0, inputs["input_ids"].shape[1] :].tolist() == [token], (stop, ours.token_ids)
    assert ours.finish_reason == "stop" and ours.text == pipe._answer_text([token])[: pipe._answer_text([token]).find(stop)]
    chunks = list(pipe.stream(stop=[stop], **kwargs))
    assert "".join(chunk.text for chunk in chunks) == ours.text and chunks[-1].finish_reason == "stop"
    assert [t for chunk in chunks for t in chunk.token_ids] == [token]


def test_max_time_ends_the_answers_as_transformers(pipe, mistral):
    """`max_time` (transformers' MaxTimeCriteria): the step that crosses it gives the last token, for greedy
    generation and beam search (whose candidates all end there); a stream ends alike; a generous one changes nothing."""
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(mistral.checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(mistral.checkpoint).eval()
    prompt, image = PROMPT, random_image(300, 200, seed=4)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    for options in (dict(), dict(num_beams=2, num_return_sequences=2)):
        with torch.no_grad():  # (1 ns: over before the first token is out)
            out = model.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8, max_time=1e-9, **options)
        want = [row[inputs["input_ids"].shape[1] :].tolist() for row in out]
        got = pipe.generate(prompt=prompt, images=[image], max_new_tokens=8, min_new_tokens=8, max_time=1e-9, **options)
        got = got if isinstance(got, list) else [got]
        assert [result.token_ids for result in got] == want and len(want[0]) == 1, options
        assert all(result.finish_reason == "length" for result in got)
    chunks = list(pipe.stream(prompt=prompt, images=[image], max_new_tokens=8, min_new_tokens=8, max_time=1e-9))
    assert len([t for chunk in chunks for t in chunk.token_ids]) == 1 and chunks[-1].finish_reason == "length"
    free = dict(prompt=prompt, images=[image], max_new_tokens=8, min_new_tokens=8)
    assert pipe.generate(**free, max_time=600).token_ids == pipe.generate(**free).token_ids
    # A stream's clock starts at its first chunk, not at the call that checked it: a wait in between counts for neither
    # max_time nor the timings.
    import time

    stream = pipe.stream(**free, max_time=0.5)
    time.sleep(0.8)
    chunks = list(stream)
    assert len([t for chunk in chunks for t in chunk.token_ids]) == 8 and chunks[-1].metrics.total_s < 0.7
    with pytest.raises(ValueError, match="max_time must be a number of seconds > 0"):
        pipe.generate(**free, max_time=0)


def test_each_result_counts_its_own_prompt_tokens(pipe):
    """`result.prompt_tokens` is the answer's own prompt (images included, no padding), for a batch, several answers
    per prompt and beam search alike; with `len(token_ids)`, a server's usage count."""
    image = random_image(300, 200, seed=5)
    prompts = [PROMPT, "[INST] A text-only question, a little longer than the other one, to be padded against. [/INST]"]
    alone = [pipe.processor(text=prompts[0], images=[image])["input_ids"].shape[1], pipe.processor(text=prompts[1])["input_ids"].shape[1]]
    assert alone[0] != alone[1]
    batch = pipe.generate(prompt=prompts, images=[image], max_new_tokens=3)
    assert [result.prompt_tokens for result in batch] == alone and batch[0].metrics.prompt_tokens == max(alone)
    several = pipe.generate(prompt=prompts, images=[image], max_new_tokens=3, do_sample=True, seed=0, num_return_sequences=2)
    assert [[result.prompt_tokens for result in answers] for answers in several] == [[alone[0]] * 2, [alone[1]] * 2]
    beams = pipe.generate(prompt=prompts, images=[image], max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert [[result.prompt_tokens for result in answers] for answers in beams] == [[alone[0]] * 2, [alone[1]] * 2]
    assert pipe.generate(prompt=prompts[1], max_new_tokens=3).prompt_tokens == alone[1]


def test_stop_finder_searches_a_growing_text_as_a_whole_search_would():
    """`StopFinder` looks only where a new match can lie (a text that grows by pieces, then a tail that may change from
    call to call); it finds what searching the whole of text + tail finds, matches across pieces and into the tail
    included."""
    from ortllava.generation.runs import StopFinder, _find_stop

    rng = np.random.default_rng(0)
    for _ in range(600):
        stop = ["".join(rng.choice(list("ab"), size=rng.integers(1, 5))) for _ in range(rng.integers(1, 3))]
        finder, text = StopFinder(stop), ""
        for _ in range(12):
            text += "".join(rng.choice(list("abc"), size=rng.integers(0, 4)))
            tail = "".join(rng.choice(list("abc"), size=rng.integers(0, 3))) if rng.random() < 0.5 else ""
            found, want = finder(text, tail), _find_stop(text + tail, stop)
            assert found == want, (stop, text, tail)
            if want is not None:
                break


def test_streaming_detokenizer_never_splits_a_character(pipe):
    from ortllava.generation.detokenizer import StreamingDetokenizer

    text = "café 東京 😀 naïve → ∑"
    ids = pipe.processor.tokenizer.encode(text, add_special_tokens=False)
    detokenizer = StreamingDetokenizer(pipe.processor.decode)
    pieces = [detokenizer.add(token) for token in ids] + [detokenizer.finalize()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)




def test_a_gpu_index_reaches_the_cuda_provider(monkeypatch):
    """"cuda:N" (and transformers' device forms: "cuda:N", an index) select GPU N; "cuda" is GPU 0, as there."""
    import onnxruntime as ort

    from ortllava.bundle.sessions import resolve_providers
    from ortllava.hf_pipeline import _provider_for

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert resolve_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert resolve_providers("cuda")[0] == resolve_providers("auto")[0] == ("CUDAExecutionProvider", {"device_id": 0})
    with pytest.raises(ValueError, match="'cuda:N'"):
        resolve_providers("cuda:one")
    assert [_provider_for(device) for device in ("cuda:1", 2, -1, "cpu", "cuda", None)] == ["cuda:1", "cuda:2", "cpu", "cpu", "cuda", "auto"]
    with pytest.raises(ValueError, match="device must be"):
        _provider_for("gpu")


def test_byte_fallback_tokens_stream_and_stop_as_the_whole_answer_decodes(tiny_store):
    """A SentencePiece-style tokenizer decodes its byte-fallback tokens (`<0x0A>`) as a group: a group that is not
    valid UTF-8 as a whole becomes one U+FFFD per byte, also bytes that had formed a character, so streamed text waits
    after such a token. Sampled answers of the tiny Vicuna (whose small vocabulary makes byte tokens common): the
    streamed pieces join to `generate`'s text, which is transformers' decode of the ids (and so for chosen sequences,
    a special token among the bytes included); a stop string after a broken byte group stops the answer there."""
    from transformers import AutoTokenizer

    from ortllava.generation.detokenizer import StreamingDetokenizer, held_token_ids

    model = tiny_store.get("vicuna")
    pipe = ortllava.load(model.bundle, provider="cpu")
    theirs = AutoTokenizer.from_pretrained(model.checkpoint)
    held = held_token_ids(pipe.processor.tokenizer)
    byte_ids = {theirs.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    assert held == byte_ids | set(theirs.all_special_ids) and len(byte_ids) == 256
    assert held_token_ids(ortllava.load(tiny_store.get("mistral").bundle, provider="cpu").processor.tokenizer) == set()  # (byte-level BPE)
    # Deterministic cases: a byte group broken by the next byte, or by one on the far side of a special token that the
    # answer's text drops (the two bytes then join one group); a valid character from two bytes; bytes at the end.
    space_word, word = theirs.encode("A photo of a street at night", add_special_tokens=False)  # ("▁A▁photo▁...", "night")
    newline, stray, c3, a9 = (theirs.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0x0A, 0xBB, 0xC3, 0xA9))
    for special in theirs.all_special_ids:
        for ids in ([word, newline, stray, space_word, word], [word, newline, special, stray, space_word], [word, c3, a9, space_word],
                    [space_word, c3, special, a9, word, newline], [word, newline]):
            detokenizer = StreamingDetokenizer(pipe._answer_text, held)
            pieces = [detokenizer.add(token) for token in ids] + [detokenizer.finalize()]
            assert "".join(pieces) == pipe._answer_text(ids) == theirs.decode(ids, skip_special_tokens=True), ids
    broken = []  # answers with a byte group decoded as replacement characters, and text after it
    for seed in range(8):
        kwargs = dict(prompt="USER: Tell me something. ASSISTANT:", max_new_tokens=40, min_new_tokens=40, do_sample=True, temperature=1.5, seed=seed)
        result = pipe.generate(**kwargs)
        assert result.text == theirs.decode(result.token_ids, skip_special_tokens=True)
        chunks = list(pipe.stream(**kwargs))
        assert "".join(chunk.text for chunk in chunks) == result.text
        assert [t for chunk in chunks for t in chunk.token_ids] == result.token_ids  # (a held byte's id comes with its text)
        after = result.text.rstrip("\ufffd").rfind("\ufffd")
        if after >= 0 and len(result.text) - after > 4:
            broken.append((kwargs, result, after + 1))
    assert broken, "no sampled answer had a broken byte group followed by text: the check above tested nothing new"
    kwargs, full, start = broken[0]
    stop = full.text[start : start + 3]
    cut = pipe.generate(stop=[stop], **kwargs)
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop" and len(cut.token_ids) < len(full.token_ids)
    assert "".join(chunk.text for chunk in pipe.stream(stop=[stop], **kwargs)) == cut.text

