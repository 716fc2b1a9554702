"""Files on disk: atomic writes, CSV tables that keep any file name, and checks that a destination is writable.

Atomic: a temporary file in the same folder, fsync, rename; a kill leaves the old file or the new one.
Tables: UTF-8 with surrogate escapes, so a file name that is not valid UTF-8 round-trips byte for byte.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
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
    """A CSV any file name survives (see ENCODING); `append` adds rows, with the header only for a new file. A new
    table replaces the old one atomically (a failed write keeps the previous file)."""
    if append:
        header = not Path(path).exists()
        frame.to_csv(path, index=index, float_format=float_format, mode="a", header=header, **ENCODING)
        return
    data = frame.to_csv(None, index=index, float_format=float_format).encode(**ENCODING)
    atomic_write(Path(path), lambda handle: handle.write(data), durable=False)


def read_table(path: Path, **kwargs: Any) -> pd.DataFrame:
    """A CSV written by `write_table` (extra arguments go to pandas.read_csv)."""
    return pd.read_csv(path, encoding="utf-8", encoding_errors="surrogateescape", **kwargs)


def read_text_table(path: Path, **kwargs: Any) -> pd.DataFrame:
    """A CSV of text: every cell a string, and 'NA', 'null', '1e3' stay the words they are."""
    return read_table(path, dtype=str, keep_default_na=False, **kwargs)


def write_text(path: Path, text: str) -> None:
    """Text for people (Markdown, HTML, JSON): UTF-8, with bytes of non-UTF-8 file names shown as \\xNN; replaced
    atomically (a failed write keeps the previous file)."""
    data = text.encode(**READABLE)
    atomic_write(Path(path), lambda handle: handle.write(data), durable=False)


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
# torch's zip writer reports a failed write as a RuntimeError that does not say why
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "inline_container", "unexpected pos", "file write failed")


def is_write_failure(exc: BaseException) -> bool:
    """A full disk, a file-size or quota limit, a read-only place or no permission: the OS's refusal to write (and
    torch.save's RuntimeError for the same), as opposed to a bug."""
    seen: BaseException | None = exc
    for _ in range(8):  # an exporter may wrap the OS's error in its own (`raise ... from`)
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return True
        if isinstance(seen, RuntimeError) and any(mark in str(seen) for mark in TORCH_WRITE_FAILURES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(exc: BaseException) -> str:
    while not isinstance(exc, OSError) and isinstance(exc.__cause__ or exc.__context__, BaseException):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "the disk is full"
        if exc.errno == errno.EFBIG:
            return "the file is larger than the file-size limit (ulimit -f)"
        return exc.strerror or str(exc)
    return "the write failed (a full disk or a file-size limit)"


def disk_error(path: Path, exc: BaseException, *, resume: Path | None = None, atomic: bool = False) -> RunDirError:
    """A one-line error for a failed write: which file, why, and (for an `atomic` write) that the older one is whole."""
    keep = f"; the previous {Path(path).name} is intact" if atomic and Path(path).is_file() else ""
    then = f" and continue with: finetune train --resume {resume}" if resume is not None else " and run the command again"
    return RunDirError(f"cannot write {path}: {_reason(exc)}{keep}; free space or fix permissions{then}")


@contextlib.contextmanager
def guarded(path: Path, *, resume: Path | None = None, atomic: bool = False) -> Iterator[None]:
    """Writes inside the block that the OS refuses (full disk, size limit, read-only) become `disk_error`'s one line;
    `atomic`: the block replaces `path` atomically, so the message can say the previous file is whole."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not is_write_failure(exc):
            raise
        where = written(Path(getattr(exc, "filename", None) or path))
        raise disk_error(where, exc, resume=resume, atomic=atomic and where == Path(path)) from None


def written(path: Path) -> Path:
    """The file a write was for: `atomic_write`'s temporary `.NAME.PID.HEX.tmp` names NAME."""
    parts = path.name.rsplit(".", 3)
    if path.name.startswith(".") and len(parts) == 4 and parts[3] == "tmp" and parts[1].isdigit():
        return path.with_name(parts[0][1:])
    return path


def _staging(folder: Path, tag: str) -> Path:
    return folder.with_name(f".{folder.name}.{tag}.{os.getpid()}.{secrets.token_hex(4)}")


def _remove_stale_staging(folder: Path) -> None:
    """Staging folders left by a process that was killed (kill -9) while writing: its PID is gone."""
    for left in folder.parent.glob(f".{glob.escape(folder.name)}.*.*.*"):
        pid = left.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(left, ignore_errors=True)


def check_replaceable(folder: Path, *, marker: str, what: str = "--out") -> None:
    """Refuse a destination that is neither missing, empty, nor a previous output of the same kind (it holds
    `marker`): replacing it whole must never delete files finetune did not write."""
    check_writable_folder(Path(folder), what=what)
    _refuse_foreign(Path(folder), marker=marker, what=what)


def _refuse_foreign(folder: Path, *, marker: str, what: str) -> None:
    try:
        names = os.listdir(folder)  # one look: another writer may swap the folder meanwhile
    except FileNotFoundError:
        names = []
    except NotADirectoryError:
        raise RunDirError(f"{what} {folder} is a file, not a folder; choose a folder path") from None
    if names and marker not in names:
        raise RunDirError(
            f"{what} {folder} holds files that are not a finetune output (no {marker}); choose an empty or new folder"
        )


@contextlib.contextmanager
def replaced_folder(folder: Path, *, marker: str) -> Iterator[Path]:
    """Write a whole output folder aside (a hidden sibling), then swap it in by renaming: a kill or a failed write
    leaves the previous folder or none, never files of two runs mixed. Yields the folder to write into."""
    folder = Path(folder)
    _refuse_foreign(folder, marker=marker, what="--out")  # writability was checked before the work began
    if folder.is_symlink():  # the folder it points to is replaced, the link stays
        folder = folder.resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(folder)
    staging = _staging(folder, "new")
    try:
        with guarded(folder):
            staging.mkdir()
            yield staging
            _swap(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap(staging: Path, folder: Path) -> None:
    """`staging` becomes `folder`, the previous `folder` is removed; two writers at once: the last one wins, whole."""
    for _ in range(10):
        old = _staging(folder, "old")
        with contextlib.suppress(FileNotFoundError):
            os.rename(folder, old)
        try:
            os.rename(staging, folder)
            return
        except OSError as exc:  # another writer's folder took the place in between: set it aside too
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    raise RunDirError(f"{folder} is being written by other processes; run the command again when they are done")


@contextlib.contextmanager
def published_together(folder: Path, names: tuple[str, ...]) -> Iterator[Path]:
    """Files `names` of `folder` written aside, then renamed in one after another (the files of the previous set that
    the new one lacks are removed): a failed or killed write leaves the previous set whole. A name may be a folder,
    replaced whole."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(folder / "files")
    staging = _staging(folder / "files", "new")
    try:
        with guarded(folder):
            staging.mkdir()
            yield staging
            written = {p.name for p in staging.iterdir()}
            for name in names:
                if name not in written:
                    _remove_entry(folder / name)
            for name in sorted(written):
                _swap_in(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_entry(path: Path) -> None:
    """A file, or a folder (of a set `published_together` writes) with its contents; nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _swap_in(new: Path, target: Path) -> None:
    """Rename `new` onto `target`; a folder already there is renamed aside first and removed after (a rename cannot
    replace a folder that holds files)."""
    if target.is_dir() and not target.is_symlink():
        old = _staging(target.parent / "files", "old")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


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
