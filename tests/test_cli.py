"""The `ortllava` CLI: generate, chat and info as a user runs them, their flags, messages and exits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import random_image, save_png


def test_cli_generate_prints_the_answer(mistral, pipe, tmp_path):
    path = save_png(random_image(320, 240, seed=10), tmp_path / "photo.png")
    out = subprocess.run(
        [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--image", str(path), "--prompt", "Describe", "--max-new-tokens", "5", "--provider", "cpu"],
        capture_output=True, text=True, check=True,
    )
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "Describe"}]}]
    expected = pipe.generate(messages=messages, max_new_tokens=5).text
    assert out.stdout.strip() == expected.strip()
    streamed = subprocess.run(
        [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--image", str(path), "--prompt", "Describe", "--max-new-tokens", "5", "--provider", "cpu", "--stream", "--timings"],
        capture_output=True, text=True, check=True,
    )
    assert streamed.stdout.strip() == expected.strip() and "time to first token" in streamed.stderr
    from_stdin = subprocess.run(  # --prompt -: the question from stdin
        [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--image", str(path), "--prompt", "-", "--max-new-tokens", "5", "--provider", "cpu"],
        input="Describe\n", capture_output=True, text=True, check=True,
    )
    assert from_stdin.stdout.strip() == expected.strip()
    # An empty prompt (say, from a failed command earlier in a pipe) is refused, not answered.
    for flags, stdin, message in ((["--prompt", "-", "--image", str(path)], "", "--prompt - read an empty prompt from stdin"),
                                  (["--prompt", " "], None, "the prompt is empty: give --prompt TEXT, an --image, or both")):
        refused = subprocess.run(
            [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), *flags, "--provider", "cpu"], input=stdin, capture_output=True, text=True,
        )
        assert refused.returncode != 0 and message in refused.stderr and not refused.stdout


def test_cli_takes_generate_arguments_as_flags(mistral, pipe):
    """`generate` (and `chat`) take the sampling arguments as flags: a seeded sampled answer is the API's for the same
    settings; a sampling flag without sampling, and a value out of range, are refused by name."""
    cli = [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--prompt", "Tell a story", "--provider", "cpu", "--max-new-tokens", "8"]
    flags = ["--do-sample", "--temperature", "1.5", "--top-k", "0", "--seed", "3", "--repetition-penalty", "1.2", "--min-p", "0.01",
             "--no-repeat-ngram-size", "2", "--typical-p", "0.95"]
    sampled = subprocess.run([*cli, *flags], capture_output=True, text=True, check=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell a story"}]}]
    settings = dict(do_sample=True, temperature=1.5, top_k=0, seed=3, repetition_penalty=1.2, min_p=0.01, no_repeat_ngram_size=2, typical_p=0.95)
    want = pipe.generate(messages=messages, max_new_tokens=8, **settings).text
    greedy = pipe.generate(messages=messages, max_new_tokens=8)
    assert sampled.stdout == want + "\n" and want != greedy.text
    # min_p reaches the sampler: at 1 only the most probable token may be drawn, so sampling gives the greedy answer.
    assert pipe.generate(messages=messages, max_new_tokens=8, do_sample=True, top_k=0, min_p=1.0, seed=5).token_ids == greedy.token_ids
    # So does epsilon_cutoff (here only the most probable token reaches 0.99, or is kept as the most probable).
    assert pipe.generate(messages=messages, max_new_tokens=8, do_sample=True, top_k=0, epsilon_cutoff=0.99, seed=5).token_ids == greedy.token_ids
    for extra, message in ((["--temperature", "0.7", "--seed", "1"], "--temperature, --seed only apply when sampling: add --do-sample"),
                           (["--top-k", "3"], "--top-k only applies when sampling: add --do-sample"),
                           (["--min-p", "0.1"], "--min-p only applies when sampling: add --do-sample"),
                           (["--do-sample", "--min-p", "1.5"], "error: --min-p must be a number in [0, 1] (0: off), got 1.5\n"),
                           (["--no-repeat-ngram-size", "-1"], "error: --no-repeat-ngram-size must be an integer >= 0, got -1\n"),
                           (["--do-sample", "--top-p", "2"], "error: --top-p must be a number in (0, 1], got 2.0\n"),
                           (["--do-sample", "--typical-p", "0"], "error: --typical-p must be a number in (0, 1] (1: off), got 0.0\n"),
                           # (the Python API's alternatives, None for a seed and a list of stop strings, are not said)
                           (["--do-sample", "--seed", "-1"], "error: --seed must be an integer >= 0, got -1\n"),
                           (["--stop", "a", "--stop="], "error: --stop must be a non-empty string, got ''\n")):
        for command in (cli, [sys.executable, "-m", "ortllava.cli", "chat", str(mistral.bundle), "--provider", "cpu"]):
            refused = subprocess.run([*command, *extra], capture_output=True, text=True, input="")
            assert refused.returncode == 1 and message in refused.stderr and "Traceback" not in refused.stderr


def test_cli_guides_away_from_a_negative_prompt(mistral, pipe):
    """`--guidance-scale G --negative-prompt TEXT` is the API's guidance_scale with the text's ids (tokenized as
    written) as negative_prompt_ids; a negative prompt without guidance is refused by name."""
    cli = [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--prompt", "Tell a story", "--provider", "cpu", "--max-new-tokens", "8"]
    out = subprocess.run([*cli, "--guidance-scale", "3", "--negative-prompt", "A sad ending"], capture_output=True, text=True, check=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell a story"}]}]
    negative = pipe.processor.tokenizer("A sad ending")["input_ids"]
    want = pipe.generate(messages=messages, max_new_tokens=8, guidance_scale=3.0, negative_prompt_ids=[negative])
    assert out.stdout == want.text + "\n" and want.text != pipe.generate(messages=messages, max_new_tokens=8).text
    for extra in (["--negative-prompt", "x"], ["--guidance-scale", "1", "--negative-prompt", "x"]):
        refused = subprocess.run([*cli, *extra], capture_output=True, text=True)
        assert refused.returncode == 1 and "--negative-prompt applies only with --guidance-scale (other than 1)" in refused.stderr


def test_cli_gives_several_sampled_answers(mistral, pipe):
    """`--num-return-sequences N` prints the API's N answers under numbered lines; without sampling, or with
    --stream, it is refused by name."""
    cli = [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--prompt", "Tell a story", "--provider", "cpu", "--max-new-tokens", "6"]
    out = subprocess.run([*cli, "--do-sample", "--seed", "5", "--num-return-sequences", "3", "--timings"], capture_output=True, text=True, check=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell a story"}]}]
    want = pipe.generate(messages=messages, max_new_tokens=6, do_sample=True, seed=5, num_return_sequences=3)
    assert out.stdout == "".join(f"--- answer {i} of 3 ---\n{result.text}\n" for i, result in enumerate(want, start=1))
    assert len({result.text for result in want}) > 1 and "finish:" in out.stderr
    # The best beams, with --num-beams.
    out = subprocess.run([*cli, "--num-beams", "3", "--num-return-sequences", "2"], capture_output=True, text=True, check=True)
    want = pipe.generate(messages=messages, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert out.stdout == "".join(f"--- answer {i} of 2 ---\n{result.text}\n" for i, result in enumerate(want, start=1))
    for extra, message in ((["--num-return-sequences", "2"], "--num-return-sequences gives several sampled answers, or the best beams: add --do-sample or --num-beams"),
                           (["--do-sample", "--num-return-sequences", "2", "--stream"], "--stream prints one answer"),
                           (["--num-beams", "2", "--stream"], "beam search (num_beams=2) gives its answers at the end"),
                           (["--do-sample", "--num-return-sequences", "0"], "argument --num-return-sequences: must be a whole number >= 1, got '0'")):
        refused = subprocess.run([*cli, *extra], capture_output=True, text=True)
        assert refused.returncode == (2 if "argument" in message else 1) and message in refused.stderr and "Traceback" not in refused.stderr


def test_cli_output_the_terminal_cannot_encode_is_replaced_not_lost(mistral, pipe):
    """An answer with characters stdout's encoding lacks (a Windows console, a C locale) prints with them replaced."""
    cli = [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--prompt", "Describe", "--provider", "cpu", "--max-new-tokens", "40"]
    text = pipe.generate(messages=[{"role": "user", "content": [{"type": "text", "text": "Describe"}]}], max_new_tokens=40).text
    assert not text.isascii()  # (this random model's answer has some)
    out = subprocess.run(cli, capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert out.returncode == 0 and out.stdout.decode("ascii") == text.encode("ascii", "replace").decode("ascii") + "\n"


def test_cli_says_what_a_long_load_does(mistral, monkeypatch, capsys):
    """A large bundle's load (sha256 checks, sessions: seconds to minutes) is announced, then timed, on stderr."""
    from ortllava import cli

    monkeypatch.setattr(cli, "LONG_LOAD_BYTES", 0)  # (the tiny bundle as if it were large)
    command = ["generate", str(mistral.bundle), "--prompt", "Hi", "--max-new-tokens", "2", "--provider", "cpu"]
    assert cli.main(command) == 0
    err = capsys.readouterr().err
    assert "GiB of bundle files: checking every file's sha256 (--no-verify skips it), then creating the sessions ..." in err
    assert "loaded in " in err and " s on CPUExecutionProvider" in err
    assert cli.main([*command, "--no-verify"]) == 0
    err = capsys.readouterr().err
    assert "creating the sessions" in err and "sha256" not in err
    monkeypatch.undo()
    assert cli.main(command) == 0 and "loading" not in capsys.readouterr().err  # a small bundle loads quietly
    from ortllava import api

    loaded, load = [], api.load
    monkeypatch.setattr(api, "load", lambda *args, **options: loaded.append(options) or load(*args, **options))
    assert cli.main([*command, "--threads", "1"]) == 0 and loaded[0]["threads"] == 1  # (--threads: onnxruntime's threads)


def test_cli_tells_what_to_do(mistral, tmp_path):
    path = save_png(random_image(120, 90, seed=12), tmp_path / "photo.png")
    cli = [sys.executable, "-m", "ortllava.cli"]
    out = subprocess.run([*cli, "generate", str(mistral.bundle), "--image", str(path), "--prompt", "<image> What is it?", "--provider", "cpu"], capture_output=True, text=True)
    assert out.returncode == 1 and "leave it out of --prompt" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([*cli, "info", str(mistral.bundle), "--json", "--no-verify"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["graphs"]["decoder"]["kind"] == "gqa"  # the manifest alone: JSON a tool can read
    out = subprocess.run([*cli, "chat", str(mistral.bundle), "--provider", "cpu", "--max-new-tokens", "9000"], input="/image\nhello\n", capture_output=True, text=True)
    assert "/image needs a path or URL" in out.stderr and "beyond the model's" in out.stderr
    out = subprocess.run([*cli, "generate", str(mistral.bundle), "--raw", "--image", str(path), "--prompt", "<image> <image> Same?", "--provider", "cpu"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "the prompt holds 2 <image> token(s) but 1 --image was given" in out.stderr
    out = subprocess.run([*cli, "chat", str(mistral.bundle), "--provider", "cpu"], input=f"/image {path}\n", capture_output=True, text=True)
    assert out.returncode == 0 and "[1 attached image(s) not sent: no message followed]" in out.stderr
    # --provider takes a GPU index (here refused by onnxruntime, which has no CUDA provider) and names a bad value.
    out = subprocess.run([*cli, "generate", str(mistral.bundle), "--prompt", "hi", "--provider", "cuda:1"], capture_output=True, text=True)
    assert out.returncode == 1 and "provider='cuda:1' asked for, but this onnxruntime has no CUDAExecutionProvider" in out.stderr
    out = subprocess.run([*cli, "generate", str(mistral.bundle), "--prompt", "hi", "--provider", "gpu"], capture_output=True, text=True)
    assert out.returncode == 2 and "--provider: 'gpu': give auto, cpu, cuda or cuda:N" in out.stderr


def test_info_describes_a_damaged_bundle_then_names_the_damage(mistral, tmp_path, capsys):
    from ortllava import cli

    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    (copy / "decoder.onnx").unlink()
    assert cli.main(["info", str(copy)]) == 1
    out, err = capsys.readouterr()
    assert "MistralForCausalLM" in out and "accuracy" in out and "load " not in out  # the report, but nothing loaded
    assert "is damaged: file decoder.onnx is missing" in err
    assert cli.main(["info", str(copy), "--json"]) == 1 and json.loads(capsys.readouterr().out)["schema_version"] == 1


def test_cli_leaves_unset_arguments_to_the_generation_config(mistral, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    config = copy / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_new_tokens": 3, "min_new_tokens": 3}))
    out = subprocess.run(
        [sys.executable, "-m", "ortllava.cli", "generate", str(copy), "--prompt", "Hi", "--provider", "cpu", "--no-verify", "--timings"],
        capture_output=True, text=True, check=True,
    )
    assert ", 3 new;" in out.stderr


def test_cli_interrupted_exits_quietly(mistral, monkeypatch, capsys):
    from ortllava import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupted)
    assert cli.main(["info", str(mistral.bundle)]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_in_the_chat_cli_stops_the_answer_not_the_chat(mistral, monkeypatch, capsys):
    import io

    from ortllava import cli
    from ortllava.decoders import FusedDecoder

    step, calls = FusedDecoder.step, []

    def interrupted_once(self, cache):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during the first answer
            raise KeyboardInterrupt
        return step(self, cache)

    monkeypatch.setattr(FusedDecoder, "step", interrupted_once)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nsecond question\n"))
    assert cli.main(["chat", str(mistral.bundle), "--provider", "cpu", "--max-new-tokens", "4", "--no-verify"]) == 0
    captured = capsys.readouterr()
    assert "[stopped]" in captured.err and "Traceback" not in captured.err
    assert len(calls) > 2  # the second question was answered
