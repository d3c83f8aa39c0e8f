"""What `--model` names, checked before anything loads: a hub id (fetched, or read from the cache offline), a
checkpoint folder, the built-in `tiny`; and what is refused, in one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest


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


def test_offline_a_hub_id_is_read_from_the_cache_without_retries(tiny_store, tmp_path, monkeypatch):
    """Where the hub's host does not resolve, a cached hub id loads from the cache, and one not cached fails at once
    saying so: neither asks the network again (huggingface_hub would retry each file for ~30 s)."""
    import shutil
    import socket

    from huggingface_hub import constants

    from ortllava_export.checkpoint import hub_unreachable, load_checkpoint

    COMMIT = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--someorg--tiny-llava" / "snapshots" / COMMIT  # the Hugging Face cache's layout
    shutil.copytree(tiny_store.get("mistral").checkpoint, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # (whatever the environment says: here the host does not resolve)
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    def no_network(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    retries = []  # huggingface_hub's backoff sleeps between tries of an unreachable host
    monkeypatch.setattr(time, "sleep", retries.append)
    checkpoint = load_checkpoint("someorg/tiny-llava")
    assert checkpoint.source == "someorg/tiny-llava" and checkpoint.revision == COMMIT  # (the bundle's provenance)
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache, and the hub cannot be reached \(huggingface.co does not resolve"):
        load_checkpoint("someorg/not-cached")
    assert retries == []
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # behind a proxy, the proxy resolves the host
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert hub_unreachable() is None


def test_a_missing_folder_is_named_before_torch_loads(tmp_path, monkeypatch):
    """A name that can only be a path (or a one-word name: LLaVA-NeXT hub ids are owner/name) is refused by the CLI
    before it imports torch; a two-part name whose first part is a folder here gets the hint it may be a mistyped path."""
    from ortllava_export.checkpoint import model_source

    with pytest.raises(FileNotFoundError, match=r"cannot load the model 'llava-ckpt': there is no such folder \(a hub id is owner/name"):
        model_source("llava-ckpt")
    assert model_source("llava-hf/llava-v1.6-mistral-7b-hf") == ("llava-hf/llava-v1.6-mistral-7b-hf", False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = f"import sys; from ortllava_export.cli import main; rc = main({['--model', str(tmp_path / 'nope')]!r}); print('torch' in sys.modules); sys.exit(rc)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and out.stdout.strip() == "False"
    assert out.stderr.strip() == f"ortllava-export: error: cannot load the model '{tmp_path / 'nope'}': there is no such folder"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    out = subprocess.run([sys.executable, "-m", "ortllava_export.cli", "--model", "models/llava"], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "offline mode is set (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)" in out.stderr
    assert "if you meant a path: models is a folder here, but it has no llava" in out.stderr


def test_export_cli_names_bad_checkpoint_folders(tmp_path):
    from ortllava_export.tiny import build_checkpoint

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    no_processor = build_checkpoint(tmp_path / "no-processor")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        (no_processor / name).unlink(missing_ok=True)
    for folder, message in ((unknown, "cannot read the configuration"), (no_processor, "cannot load the processor")):
        out = subprocess.run(
            [sys.executable, "-m", "ortllava_export.cli", "--model", str(folder), "--output", str(tmp_path / "b")],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert out.returncode == 1 and "Traceback" not in out.stderr and message in out.stderr, out.stderr[-1500:]
        assert not (tmp_path / "b").exists()


def test_export_names_a_file_given_as_the_model_and_warns_of_a_folder_named_tiny(tmp_path, monkeypatch, capsys):
    from ortllava_export.checkpoint import load_checkpoint

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model.safetensors is a file, not a checkpoint folder: pass the checkpoint's folder"):
        load_checkpoint(str(weights))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert load_checkpoint("tiny").source == "tiny"
    err = capsys.readouterr().err
    assert "--model tiny is the built-in tiny random model, not the folder" in err and "pass --model ./tiny" in err
