"""Files on disk: atomic writes, CSV tables that keep any file name, and checks that a destination is writable.

Atomic: a temporary file in the same folder, fsync, rename; a kill leaves the old file or the new one.
Tables: UTF-8 with surrogate escapes, so a file name that is not valid UTF-8 round-trips byte for byte.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from finetune.errors import RunDirError

ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}  # lossless for os.fsdecode'd names
READABLE = {"encoding": "utf-8", "errors": "backslashreplace"}  # for people: invalid bytes shown as \xNN


def default_cache_dir() -> Path:
    """Where caches live: $FINETUNE_CACHE_DIR, else $XDG_CACHE_HOME/finetune/features, else ~/.cache/finetune/features."""
    if os.environ.get("FINETUNE_CACHE_DIR"):
        return Path(os.environ["FINETUNE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / "features"


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, durable: bool = True) -> None:
    """Call `write(handle)` on a temporary file, then rename it to `path` (new files get the user's umask).

    `durable=False` skips the fsync: for caches, whose readers check every entry and treat a bad one as missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # like open(): the umask decides the mode
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_table(
    frame: pd.DataFrame, path: Path, *, index: bool = False, float_format: str | None = None, append: bool = False
) -> None:
    """A CSV any file name survives (see ENCODING); `append` adds rows, with the header only for a new file."""
    header = not (append and Path(path).exists())
    frame.to_csv(path, index=index, float_format=float_format, mode="a" if append else "w", header=header, **ENCODING)


def read_table(path: Path, **kwargs: Any) -> pd.DataFrame:
    """A CSV written by `write_table` (extra arguments go to pandas.read_csv)."""
    return pd.read_csv(path, encoding="utf-8", encoding_errors="surrogateescape", **kwargs)


def read_text_table(path: Path, **kwargs: Any) -> pd.DataFrame:
    """A CSV of text: every cell a string, and 'NA', 'null', '1e3' stay the words they are."""
    return read_table(path, dtype=str, keep_default_na=False, **kwargs)


def write_text(path: Path, text: str) -> None:
    """Text for people (Markdown, HTML, JSON): UTF-8, with bytes of non-UTF-8 file names shown as \\xNN."""
    Path(path).write_text(text, **READABLE)


def disk_error(path: Path, exc: OSError, *, resume: Path | None = None) -> RunDirError:
    """A one-line error for a failed write: which file, why, and that nothing older was lost."""
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    keep = f"; the previous {Path(path).name} is intact" if Path(path).exists() else ""
    then = f" and continue with: finetune train --resume {resume}" if resume is not None else " and run the command again"
    return RunDirError(f"cannot write {path}: {reason}{keep}; free space or fix permissions{then}")


def check_writable_folder(folder: Path, *, what: str = "--out") -> None:
    """Refuse, before any work, a destination folder that is a file or cannot be created or written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{what} {folder} is a file, not a folder; choose a folder path")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"{what} {folder}: cannot write in {existing} (read-only or no permission); choose another place")


def check_writable_file(path: Path, *, what: str = "--out", example: str = "predictions.csv") -> None:
    """Refuse, before any work, an output file that is a folder or whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise RunDirError(f"{what} {path} is a folder; give a file name such as {path / example}")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RunDirError(f"{what} {path}: its folder {blocking} is a file; choose another place")
    check_writable_folder(path.parent, what=what)
    if path.exists() and not os.access(path, os.W_OK):
        raise RunDirError(f"{what} {path} is read-only; choose another file")


def recorded_path(path: str | Path) -> str:
    """How a run records an image's path: absolute, links kept as the user named them (eval from elsewhere finds it)."""
    return os.path.abspath(path)


def path_key(path: str | Path) -> str:
    """What makes two paths the same image: the real path, links and '..' resolved (leakage, folds, paired verdicts)."""
    return os.path.realpath(path)
