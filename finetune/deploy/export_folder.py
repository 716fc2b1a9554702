"""The folder `finetune export` writes: checked and locked before any work, written in a hidden staging folder inside
it and moved in only when the export is complete, and listed in its manifest, the one thing `--overwrite` trusts to
say what may be deleted. A folder holding anything else (a run, your files, a parent folder) is refused untouched."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from finetune.errors import ParityError, RunDirError
from finetune.files import atomic_write
from finetune.run_dir import check_destination, folder_lock

MANIFEST = "export_manifest.json"
STAGING = ".export-partial-"  # + pid and a random tail: a killed export's leftover, removed by the next one
KIND = "finetune-export-manifest/1"


def read_manifest(folder: Path, *, names: Collection[str]) -> list[str] | None:
    """The files an earlier export wrote into `folder` (None: no manifest). Only names an export writes are trusted:
    a manifest that lists anything else (recipe.yaml, ../x) is refused, so no edit of it can make --overwrite delete
    another file."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"] if isinstance(manifest, dict) and manifest.get("kind") == KIND else None
    except (OSError, ValueError, KeyError):
        files = None
    if not isinstance(files, list) or not all(isinstance(name, str) and name in names for name in files):
        raise RunDirError(
            f"{path} is damaged or lists files no export writes; nothing was deleted: remove the folder yourself "
            "or choose another --out"
        )
    return list(files)


def _write_manifest(folder: Path, files: Sequence[str]) -> None:
    text = json.dumps({"kind": KIND, "files": sorted(set(files))}, indent=1)
    atomic_write(folder / MANIFEST, lambda handle: handle.write(text.encode("utf-8")))


def _check_contents(folder: Path, *, overwrite: bool, names: Collection[str]) -> None:
    """An empty folder, or an earlier export's (with --overwrite) holding nothing its manifest does not list."""
    for leftover in folder.glob(STAGING + "*"):  # a killed export's; we hold the folder's lock
        shutil.rmtree(leftover, ignore_errors=True)
    present = sorted(p.name for p in folder.iterdir())
    if not present:
        return
    listed = read_manifest(folder, names=names)
    shown = ", ".join(present[:4]) + (f" and {len(present) - 4} more" if len(present) > 4 else "")
    if listed is None:
        raise RunDirError(
            f"--out {folder} holds files no finetune export wrote ({shown}); nothing was deleted: choose a new or empty folder"
        )
    foreign = [name for name in present if name not in listed and name != MANIFEST]
    if foreign:
        raise RunDirError(
            f"--out {folder} holds an earlier export and files it did not write ({', '.join(foreign[:4])}); nothing was "
            "deleted: move them away or choose another --out"
        )
    if not overwrite:
        raise RunDirError(f"{folder} exists and is not empty; pass --overwrite to replace it, or --out another folder")


def _publish(work: Path, folder: Path, *, names: Collection[str]) -> list[str]:
    """Move the finished files in; the manifest lists every file present at each step, so a kill in between leaves a
    folder the next --overwrite can still clear."""
    new = sorted(p.name for p in work.iterdir())
    old = read_manifest(folder, names=names) or []
    _write_manifest(folder, [*old, *new])
    for name in new:
        os.replace(work / name, folder / name)
    for name in set(old) - set(new):
        (folder / name).unlink(missing_ok=True)
    _write_manifest(folder, new)
    work.rmdir()
    return new


@contextlib.contextmanager
def claimed(folder: Path, *, overwrite: bool, names: Collection[str], reads: Sequence[Path] = ()) -> Iterator[Path]:
    """Lock `folder`, check it, and yield a staging folder to write into. On success (or a ParityError, whose files
    are kept for inspection) the staged files replace the earlier export's; on any other failure they are removed
    and the folder is as it was (a folder this call created is removed again)."""
    check_destination(folder, reads=reads)
    existed = folder.exists()
    try:
        with folder_lock(folder):
            _check_contents(folder, overwrite=overwrite, names=names)
            work = folder / f"{STAGING}{os.getpid()}-{secrets.token_hex(4)}"
            work.mkdir()
            try:
                yield work
            except ParityError:
                _publish(work, folder, names=names)
                raise
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            _publish(work, folder, names=names)
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
