"""What every stage that reads an image needs to know of shard folders, without WebDataset (which imports torch):
the folder's marker (`shards.json`) and the path of an image inside a shard, `DIR/val-000000.tar::val000000012.jpg`,
read by random access through the tar's headers (`finetune.data.decode.load_image` reads such paths)."""

from __future__ import annotations

import functools
import os
import tarfile
from pathlib import Path

from finetune.errors import DataError

MANIFEST = "shards.json"
MEMBER_SEPARATOR = "::"


def is_shard_folder(path: str | Path | None) -> bool:
    """Whether `path` is a folder holding shards.json (what `finetune shard` writes last)."""
    return path is not None and (Path(path) / MANIFEST).is_file()


def member_path(tar: str | Path, member: str) -> str:
    """The path of one image inside a shard, as load_image reads it."""
    return f"{tar}{MEMBER_SEPARATOR}{member}"


def split_member_path(path: str | Path) -> tuple[str, str] | None:
    """(tar file, member name) of a member path, or None for an ordinary file path."""
    text = str(path)
    tar, sep, member = text.rpartition(MEMBER_SEPARATOR)
    if not sep or not tar.endswith(".tar") or "/" in member:
        return None
    return tar, member


@functools.lru_cache(maxsize=16)
def _offsets(tar: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of one tar, read from its headers once per file version (size, mtime)."""
    with tarfile.open(tar, "r:") as archive:
        return {info.name: (info.offset_data, info.size) for info in archive.getmembers() if info.isfile()}


def read_member(path: str | Path) -> bytes:
    """The bytes of one image inside a shard (random access through the tar's header offsets)."""
    found = split_member_path(path)
    if found is None:
        raise DataError(f"{path} is no shard member path (expected DIR/name.tar{MEMBER_SEPARATOR}member)")
    tar, member = found
    try:
        stat = os.stat(tar)
        offset, size = _offsets(tar, stat.st_size, stat.st_mtime_ns).get(member, (-1, 0))
        if offset < 0:
            raise DataError(f"shard {tar} holds no {member}; the shard folder was changed after it was written: shard it again")
        with open(tar, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"cannot read {member} from shard {tar}: {exc}; shard the images again") from None
