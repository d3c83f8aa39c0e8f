"""The output folder's lifecycle: where a bundle goes by default, which `--output` may be written (never someone's
folder, never files put beside a bundle), and the scratch folder the export writes into, moved into place whole.

Names beside `--output DIR`, each only while an export runs: `DIR.partial` (the scratch folder, marked by
`SCRATCH_MARK` until it is complete), `DIR.lock` (one export at a time per DIR), `DIR.earlier` (an earlier bundle,
set aside while the new one moves in).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ortllava.bundle.manifest import MANIFEST_FILE

from .bundle import SCRATCH_MARK

DEFAULT_HOME = Path("models") / "bundles"
# What file browsers leave in any folder they show: not someone's work, so no reason to keep a bundle in place.
OS_CLUTTER = {".DS_Store", "Thumbs.db", "desktop.ini"}


def default_output(model: str) -> Path:
    """`models/bundles/<name>`: a local folder's own name (resolved, so `.`, `..` and `~/ckpt` name the folder),
    else the hub id with its `/` made `--`."""
    name = model
    if model != "tiny":  # (the built-in model, even where a folder of that name exists: see load_checkpoint)
        local = Path(os.path.expanduser(model))
        if local.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model:
            name = local.resolve().name or "bundle"
    return DEFAULT_HOME / re.sub(r"[^A-Za-z0-9._-]+", "--", name)


def check_output(output: Path) -> None:
    """Refuses an `--output` (absolute) that is neither new, nor an empty folder, nor an earlier bundle with nothing
    else in it (which is replaced): a mistyped path must not delete someone's folder, nor a bundle folder the files
    someone put beside the bundle."""
    if output.is_symlink():
        raise SystemExit(f"--output {output} is a symbolic link; name the folder itself")
    if output == Path.cwd() or output in Path.cwd().parents:
        raise SystemExit(f"--output {output} holds the current folder; name a new folder")
    if not output.exists():
        return
    if not output.is_dir():
        raise SystemExit(f"--output {output} is a file, not a folder")
    if any(output.iterdir()):
        own = _bundle_entries(output)
        if own is None:
            raise SystemExit(f"--output {output} is a folder that holds other things than a bundle; name a new or empty folder")
        if foreign := _foreign_entries(output, own):
            raise SystemExit(
                f"--output {output} holds an earlier bundle, and also {_list(foreign)}, which the bundle does not list: replacing "
                "the bundle would delete them; move them away, or name a new or empty folder"
            )
    earlier = output.with_name(output.name + ".earlier")  # where the earlier bundle is set aside while the new one moves in
    if earlier.exists():
        own = _bundle_entries(earlier) if earlier.is_dir() and not earlier.is_symlink() else None
        if own is None or _foreign_entries(earlier, own):
            raise SystemExit(f"{earlier} exists and is not a bundle set aside by an export; move it away (the export uses that name)")


@contextmanager
def scratch_folder(output: Path) -> Iterator[Path]:
    """Yields the empty scratch folder `DIR.partial` beside `output` (absolute, checked by `check_output`) to write
    the bundle into. When the block ends, the finished bundle moves to `output`, replacing an earlier one; when it
    raises, the scratch folder goes, and so do the parent folders made for it: a failed export leaves nothing.

    Made before the checkpoint loads, so an output that cannot be written is found first. A second export to the
    same `output` is refused while this one runs (SystemExit), rather than deleting this one's scratch folder."""
    work = output.with_name(output.name + ".partial")
    created = [parent for parent in output.parents if not parent.exists()]  # nearest first
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with _export_lock(output):
            check_output(output)  # again, now that no other export can change it
            _clear_scratch(work)
            work.mkdir()
            (work / SCRATCH_MARK).touch()
            try:
                yield work
                (work / SCRATCH_MARK).unlink()
                _move_into_place(work, output)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
    except BaseException:
        for parent in created:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


@contextmanager
def _export_lock(output: Path):
    """Holds an exclusive lock on `DIR.lock` beside `output` for the block, and removes the file after; a second
    export to the same `output` is refused (SystemExit).

    `fcntl.flock` (Linux, macOS): the lock goes with the process, so a killed export leaves no stale lock, only the
    empty file, which the next export takes over. Where there is no fcntl (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = output.with_name(output.name + ".lock")
    if lock.is_symlink() or lock.exists() and not (lock.is_file() and lock.stat().st_size == 0):
        raise SystemExit(f"{lock} exists and is not an export's lock (an empty file); move it away (the export uses that name)")
    for _ in range(3):
        handle = open(lock, "a")  # (never truncated: a file another export holds stays as it is)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SystemExit(f"another export is writing {output} (it holds {lock}); wait for it to finish, or choose another --output") from None
        # The export that held it may have removed the file between our open and our lock: then this lock is on a
        # file no one else will see, and a third export could lock a new one. Only a lock on the file at `lock` counts.
        try:
            held = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock))
        except FileNotFoundError:
            held = False
        if held:
            break
        handle.close()
    else:
        raise SystemExit(f"another export is writing {output} (its lock {lock} keeps changing); try again")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the lock is released: a waiting export then finds no file, or its own
        handle.close()


def _clear_scratch(work: Path) -> None:
    """Removes what an interrupted export left at `work` (the scratch folder's name); a folder of that name
    that is not such a leftover is refused, not deleted."""
    if not work.exists():
        return
    if work.is_dir() and not work.is_symlink() and ((work / SCRATCH_MARK).is_file() or not any(work.iterdir())):
        shutil.rmtree(work)
        return
    raise SystemExit(f"{work} exists and is not left over from an ortllava export; move it away (the export writes there first)")


def _move_into_place(work: Path, output: Path) -> None:
    """Puts the finished bundle `work` at `output`; an earlier bundle there is set aside first and restored if the
    move fails, then deleted (`_delete_earlier`)."""
    earlier = None
    if output.exists():
        earlier = output.with_name(output.name + ".earlier")
        shutil.rmtree(earlier, ignore_errors=True)
        output.rename(earlier)
    try:
        work.rename(output)
    except BaseException:
        if earlier is not None:
            earlier.rename(output)
        raise
    if earlier is not None:
        _delete_earlier(earlier)


def _delete_earlier(earlier: Path) -> None:
    """Deletes the earlier bundle set aside at `earlier`, its manifest last, so that one left half-deleted still
    holds a bundle's manifest (the next export then clears it, as it clears any `DIR.earlier` that holds a bundle).
    The new bundle is already in place: a file that cannot be deleted is said, not a failed export."""
    try:
        for entry in sorted(earlier.iterdir(), key=lambda entry: entry.name == MANIFEST_FILE):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        earlier.rmdir()
    except OSError as error:
        print(f"warning: the bundle is in place, but the one it replaced, set aside in {earlier}, could not be deleted: {error}", file=sys.stderr)


def _bundle_entries(folder: Path) -> set[str] | None:
    """The names in `folder` that belong to the ortllava bundle it holds (of any schema version: an older bundle
    may be replaced): manifest.json and the files its manifest lists (every hashed file, each graph and its
    external data). None when `folder` holds no bundle's manifest."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and {"schema_version", "graphs", "files"} <= set(data)):
        return None
    listed = list(data["files"]) if isinstance(data["files"], (dict, list)) else []
    for graph in data["graphs"].values() if isinstance(data["graphs"], dict) else []:
        if isinstance(graph, dict):
            listed += [graph.get("file"), *(graph.get("external_data") or [])]
    # A listed file's first path part is the entry in `folder` (the manifest lists plain names; a path is kept whole).
    return {MANIFEST_FILE} | {Path(name).parts[0] for name in listed if isinstance(name, str) and name and Path(name).parts}


def _foreign_entries(folder: Path, own: set[str]) -> list[str]:
    """The entries of `folder` that are not in `own` (its bundle's) nor OS clutter, sorted; folders with a trailing
    slash."""
    return sorted(entry.name + "/" * entry.is_dir() for entry in folder.iterdir() if entry.name not in own | OS_CLUTTER)


def _list(names: list[str], most: int = 5) -> str:
    """`a, b/ and c`: the first `most` of `names`, and how many more."""
    shown = names[:most] + ([f"{len(names) - most} more"] if len(names) > most else [])
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
