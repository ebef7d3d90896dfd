"""Reading and durably replacing the metadata file (the format is resync/metadata.py)."""

from __future__ import annotations

import os

from resync.metadata import Metadata, MetadataError, decode, encode, fresh


class MetadataFileError(Exception):
    """The metadata file cannot be read or written; the message names it."""


def load(path: str, size: int, node: str) -> tuple[Metadata, bool]:
    """The record at `path`, or a fresh one when the file does not exist.

    Returns (record, created).  A record for another size or node is refused: it
    belongs to another disk, and guessing would risk the data.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        meta = fresh(size, node)
        save(path, meta)
        return meta, True
    except OSError as exc:
        raise MetadataFileError(f"metadata {path}: {exc.strerror}") from None
    try:
        meta = decode(data)
    except MetadataError as exc:
        raise MetadataFileError(f"metadata {path}: {exc}") from None
    if meta.size != size:
        raise MetadataFileError(
            f"metadata {path} describes a volume of {meta.size} bytes but the disk has "
            f"{size}: wrong metadata file for this disk (move it away to start afresh)")
    if meta.node != node:
        raise MetadataFileError(
            f"metadata {path} belongs to node {meta.node!r}, not {node!r}")
    return meta, False


def save(path: str, meta: Metadata) -> None:
    """Replace the record atomically and durably: after return it survives power loss."""
    tmp = f"{path}.tmp"
    data = encode(meta)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except OSError as exc:
        raise MetadataFileError(f"metadata {path}: cannot write: {exc.strerror}") from None
