"""The output folder: which `--output` an export may write (never someone's folder, never files beside a bundle),
its scratch folder and lock, and what a failed or interrupted export leaves (nothing)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ortllava.bundle.manifest import read_manifest


def test_output_folder_is_replaced_only_when_it_holds_a_bundle(tmp_path, monkeypatch):
    from ortllava_export.cli import export_bundle

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="holds other things than a bundle"):
        export_bundle("tiny", folder)
    assert (folder / "precious.txt").read_text() == "keep me"
    with pytest.raises(SystemExit, match="is a file"):
        export_bundle("tiny", folder / "precious.txt")
    (folder / "manifest.json").write_text('{"name": "some web app"}')  # a manifest.json, but not a bundle's
    with pytest.raises(SystemExit, match="holds other things than a bundle"):
        export_bundle("tiny", folder)
    bundle = export_bundle("tiny", tmp_path / "bundle")
    (bundle / "notes.txt").write_text("mine")  # beside an earlier bundle: it is not the bundle's, so not deleted
    with pytest.raises(SystemExit, match="holds an earlier bundle, and also notes.txt, which the bundle does not list"):
        export_bundle("tiny", bundle)
    (bundle / "notes.txt").unlink()
    assert export_bundle("tiny", bundle) == bundle  # an earlier bundle alone is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "mine"]  # no .partial or set-aside bundle left
    (tmp_path / "link").symlink_to(bundle)
    with pytest.raises(SystemExit, match="symbolic link"):
        export_bundle("tiny", tmp_path / "link")
    monkeypatch.chdir(bundle)
    with pytest.raises(SystemExit, match="holds the current folder"):
        export_bundle("tiny", ".")
    assert (bundle / "manifest.json").is_file()


def test_an_earlier_bundle_that_cannot_all_be_deleted_leaves_the_new_one_in_place(tmp_path, monkeypatch, capfd):
    """Once the new bundle is in place, the earlier one is deleted manifest last: a file that will not go is a warning,
    not a failed export, and what is left still holds its manifest, so the next export clears it."""
    from pathlib import Path

    from ortllava_export.cli import export_bundle

    bundle = export_bundle("tiny", tmp_path / "b", validate=False)
    unlink = Path.unlink

    def stubborn(path, *args, **kwargs):
        if path.parent.name == "b.earlier" and path.name == "tokenizer.json":
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", stubborn)
        assert export_bundle("tiny", bundle, validate=False) == bundle
    assert "the bundle is in place, but the one it replaced, set aside in" in capfd.readouterr().err
    assert read_manifest(bundle) and (tmp_path / "b.earlier" / "manifest.json").is_file()
    assert export_bundle("tiny", bundle, validate=False) == bundle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failed_export_removes_the_folders_it_created_and_keeps_an_earlier_bundle(tmp_path, monkeypatch):
    import hashlib

    from ortllava_export import cli

    earlier = cli.export_bundle("tiny", tmp_path / "earlier" / "bundle", validate=False)
    info = subprocess.run([sys.executable, "-m", "ortllava.cli", "info", str(earlier), "--no-load"], capture_output=True, text=True, check=True)
    assert "validation  none: exported with --no-validate" in info.stdout
    digests = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in earlier.iterdir()}  # noqa: E731
    before = digests()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_export_into", fail)
    assert cli.main(["--model", "tiny", "--output", str(tmp_path / "new" / "deeper" / "bundle")]) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "earlier"]
    assert cli.main(["--model", "tiny", "--output", str(earlier)]) == 1  # over an earlier bundle: it stays as it was
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main's own SIGTERM handling ends with it
    assert digests() == before and list((tmp_path / "earlier").iterdir()) == [earlier]  # and no .partial beside it


def test_export_scratch_folder_is_ours_alone(tmp_path):
    """The export writes into `<output>.partial` first: a folder of that name that an export did not leave is
    refused and kept; one that an interrupted export left is cleared; a termination signal leaves nothing."""
    from ortllava_export.cli import export_bundle

    foreign = tmp_path / "b.partial"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not left over from an ortllava export"):
        export_bundle("tiny", tmp_path / "b", validate=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    (foreign / "notes.txt").unlink()
    (foreign / ".ortllava-export-partial").touch()  # what an interrupted export leaves
    (foreign / "decoder.onnx").write_bytes(b"half")
    export_bundle("tiny", tmp_path / "b", validate=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and ".ortllava-export-partial" not in read_manifest(tmp_path / "b").files
    (tmp_path / "b.earlier").mkdir()  # the name an earlier bundle is set aside under: someone else's folder here
    (tmp_path / "b.earlier" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="b.earlier exists and is not a bundle set aside by an export"):
        export_bundle("tiny", tmp_path / "b", validate=False)
    shutil.rmtree(tmp_path / "b.earlier")
    # SIGTERM (a timeout, a scheduler) once the export has begun writing: it unwinds and removes its folder.
    process = subprocess.Popen(
        [sys.executable, "-m", "ortllava_export.cli", "--model", "tiny", "--output", str(tmp_path / "c")], stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "c.partial").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def _fake_bundle(folder, *extra):
    """A folder that holds a bundle as far as the output checks look (a manifest and the files it lists), plus `extra`
    entries (names ending in / are folders)."""
    folder.mkdir(parents=True)
    manifest = {"schema_version": 1, "files": {"decoder.onnx": "0" * 64, "embed_tokens.npy": "0" * 64},
                "graphs": {"decoder": {"file": "decoder.onnx", "external_data": ["decoder.onnx.data"]}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for name in ("decoder.onnx", "decoder.onnx.data", "embed_tokens.npy", *extra):
        (folder / name.rstrip("/")).mkdir() if name.endswith("/") else (folder / name).write_bytes(b"x")
    return folder


def test_an_earlier_bundle_is_replaced_only_without_other_files_beside_it(tmp_path):
    """Replacing an earlier bundle deletes its folder: refused while the folder holds anything the manifest does not
    list (someone's notes beside the bundle), naming those entries; the same for a bundle set aside as DIR.earlier."""
    from ortllava_export.output import check_output

    bundle = _fake_bundle(tmp_path / "b", "my-notes/", "finetune.py")
    with pytest.raises(SystemExit, match=r"holds an earlier bundle, and also finetune.py and my-notes/, which the bundle does not list"):
        check_output(bundle)
    shutil.rmtree(bundle / "my-notes")
    (bundle / "finetune.py").unlink()
    (bundle / ".DS_Store").write_bytes(b"x")  # (a file browser's: no reason to refuse)
    check_output(bundle)  # the bundle's own files only: it may be replaced
    _fake_bundle(tmp_path / "b.earlier", "finetune.py")
    with pytest.raises(SystemExit, match="b.earlier exists and is not a bundle set aside by an export"):
        check_output(bundle)
    assert (tmp_path / "b.earlier" / "finetune.py").is_file() and (bundle / "manifest.json").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="exports lock their output with fcntl (not on Windows)")
def test_a_second_export_to_the_same_output_is_refused_while_the_first_writes(tmp_path):
    """An export holds `DIR.lock`; another to the same DIR stops at once, leaving the first one's scratch folder."""
    import fcntl

    from ortllava_export.bundle import SCRATCH_MARK
    from ortllava_export.cli import export_bundle

    scratch = tmp_path / "b.partial"  # what the first export is writing
    scratch.mkdir()
    (scratch / SCRATCH_MARK).touch()
    (scratch / "decoder.onnx").write_bytes(b"being written")
    with open(tmp_path / "b.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match=f"another export is writing {re.escape(str(tmp_path / 'b'))}"):
            export_bundle("tiny", tmp_path / "b", validate=False)
    assert (scratch / "decoder.onnx").read_bytes() == b"being written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.lock", "b.partial"]  # (the lock file is the first export's)
    # A lock file a killed export left (empty, no one holding it) is taken over; anything else by that name is refused.
    (tmp_path / "c.lock").touch()
    bundle = export_bundle("tiny", tmp_path / "c", validate=False)
    assert (bundle / "manifest.json").is_file() and not (tmp_path / "c.lock").exists()
    (tmp_path / "d.lock").write_text("mine")
    with pytest.raises(SystemExit, match="d.lock exists and is not an export's lock"):
        export_bundle("tiny", tmp_path / "d", validate=False)
    assert (tmp_path / "d.lock").read_text() == "mine"


def test_default_output_is_named_after_the_local_folder(tmp_path, monkeypatch):
    from ortllava_export.output import DEFAULT_HOME, default_output

    (tmp_path / "work" / "ckpt").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "ckpt")
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    assert default_output(".") == DEFAULT_HOME / "ckpt"
    assert default_output("..") == DEFAULT_HOME / "work"
    assert default_output("~/ckpt") == DEFAULT_HOME / "ckpt"
    assert default_output(str(tmp_path / "work" / "ckpt") + "/") == DEFAULT_HOME / "ckpt"
    assert default_output("llava-hf/llava-v1.6-mistral-7b-hf") == DEFAULT_HOME / "llava-hf--llava-v1.6-mistral-7b-hf"
    assert default_output("tiny") == DEFAULT_HOME / "tiny"
