"""The metadata file on disk: create it, open it, and write its records durably.

The record formats and the layout are resync/metadata.py; this module does the I/O.
Each write that the invariants depend on (superblock, activity-log record, bitmap pages
before an extent leaves the log) is followed by fdatasync before the caller goes on.
"""

from __future__ import annotations

import logging
import os

from resync.bitmap import Bitmap
from resync.metadata import (
    AL_SLOTS, PAGE_BITS, RECORD, SUPER_SLOTS, Layout, Metadata, MetadataError, decode_al,
    decode_page, decode_super, encode_al, encode_page, encode_super,
)

from .exclusive import InUseError, is_locked, lock_exclusively

log = logging.getLogger(__name__)


class MetadataFileError(Exception):
    """The metadata file cannot be used; the message names it and says what to do."""


class MetaStore:
    """One volume's open metadata file."""

    def __init__(self, path: str, fd: int, meta: Metadata, sequence: int, al_sequence: int,
                 al_active: list[int], bitmap: Bitmap, torn_pages: int) -> None:
        self.path = path
        self.fd = fd
        self.meta = meta
        self.layout = Layout(meta.size, meta.block)
        self.sequence = sequence
        self.al_sequence = al_sequence
        self.al_active_at_open = al_active  # extents that were active when it last stopped
        self.bitmap = bitmap
        self.torn_pages = torn_pages

    # --- creating and opening -----------------------------------------------------

    @classmethod
    def create(cls, path: str, meta: Metadata, force: bool = False) -> None:
        """Write fresh metadata (inconsistent disk, no generation, empty bitmap and log)."""
        if os.path.exists(path):
            if not force:
                raise MetadataFileError(f"metadata {path} already exists (use --force to "
                                        "overwrite it: the node then forgets what it knew)")
            try:
                running = is_locked(path)
            except OSError as exc:
                raise MetadataFileError(f"metadata {path}: {exc.strerror}") from None
            if running:
                # Replacing the file under a running daemon would leave it writing the
                # old one while the next start reads a blank one.
                raise MetadataFileError(f"metadata {path} is in use by a running mirrord: "
                                        "stop it first (`mirrorctl down`, or its unit)")
        layout = Layout(meta.size, meta.block)
        tmp = f"{path}.new"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, layout.file_size)
                os.pwrite(fd, encode_super(meta, 1), layout.super_offset(1))
                os.pwrite(fd, encode_al(1, []), layout.al_slot_offset(1))
                empty = bytes(PAGE_BITS // 8)
                for page in range(layout.pages):
                    os.pwrite(fd, encode_page(page, empty), layout.page_offset(page))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(path)
        except OSError as exc:
            raise MetadataFileError(f"metadata {path}: cannot write: {exc.strerror}") from None

    @classmethod
    def open(cls, path: str, *, size: int, node: str, volume_id: int) -> "MetaStore":
        """Open and check the metadata of this node's disk; refuse anything doubtful."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MetadataFileError(f"metadata {path} does not exist: create it with "
                                    "`mirrorctl create-md` (on a new disk)") from None
        except OSError as exc:
            raise MetadataFileError(f"metadata {path}: {exc.strerror}") from None
        try:
            lock_exclusively(fd, path, "metadata")
            return cls._load(path, fd, size=size, node=node, volume_id=volume_id)
        except InUseError as exc:
            os.close(fd)
            raise MetadataFileError(exc.strerror) from None
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _load(cls, path: str, fd: int, *, size: int, node: str, volume_id: int) -> "MetaStore":
        best, errors = None, []
        for slot in range(SUPER_SLOTS):
            try:
                sequence, meta = decode_super(os.pread(fd, RECORD, slot * RECORD))
            except MetadataError as exc:
                errors.append(str(exc))
                continue
            if best is None or sequence > best[0]:
                best = (sequence, meta)
        if best is None:
            raise MetadataFileError(f"metadata {path} is damaged or not mirrord metadata "
                                    f"({'; '.join(errors)}): refusing to start; restore it, "
                                    "or recreate it with `mirrorctl create-md --force` (this "
                                    "node then gets a full resync)")
        sequence, meta = best
        if meta.node != node:
            raise MetadataFileError(f"metadata {path} belongs to node {meta.node!r}, not "
                                    f"{node!r}: wrong file for this node")
        if meta.size != size:
            raise MetadataFileError(f"metadata {path} describes a volume of {meta.size} bytes "
                                    f"but the disk has {size}: wrong metadata for this disk")
        if meta.volume_id != volume_id:
            raise MetadataFileError(f"metadata {path} belongs to volume id {meta.volume_id}, "
                                    f"the config says {volume_id}: another resource's file")
        layout = Layout(meta.size, meta.block)
        if os.fstat(fd).st_size < layout.file_size:
            raise MetadataFileError(f"metadata {path} is truncated: refusing to start")
        al_sequence, al_active = 0, []
        for slot in range(AL_SLOTS):
            try:
                seq, extents = decode_al(os.pread(fd, RECORD, layout.al_offset + slot * RECORD))
            except MetadataError:
                continue  # a torn record: an older one (or none) stands
            if seq > al_sequence:
                al_sequence, al_active = seq, extents
        bitmap = Bitmap(meta.size, meta.block, PAGE_BITS)
        torn = []
        for page in range(layout.pages):
            bits = decode_page(page, os.pread(fd, RECORD, layout.page_offset(page)))
            if bits is None:
                torn.append(page)
            bitmap.load_page(page, bits)
        if torn:
            log.warning("metadata %s: %d damaged bitmap page(s): their whole ranges are "
                        "marked out of sync", path, len(torn))
        bitmap.dirty_pages = set(torn)  # rewrite the damaged pages at the next flush
        return cls(path, fd, meta, sequence, al_sequence, al_active, bitmap, len(torn))

    # --- writing ------------------------------------------------------------------

    def save(self, meta: Metadata) -> None:
        """Write the superblock into the older slot and make it durable."""
        sequence = self.sequence + 1
        self._write(encode_super(meta, sequence), self.layout.super_offset(sequence % SUPER_SLOTS))
        self._sync()
        self.sequence = sequence
        self.meta = meta

    def write_al(self, extents: list[int]) -> None:
        sequence = self.al_sequence + 1
        self._write(encode_al(sequence, extents), self.layout.al_slot_offset(sequence))
        self._sync()
        self.al_sequence = sequence

    def flush_bitmap(self) -> int:
        """Write the bitmap pages that changed since the last flush; returns how many."""
        pages = sorted(self.bitmap.dirty_pages)
        if not pages:
            return 0
        for page in pages:
            self._write(encode_page(page, self.bitmap.page_bytes(page)),
                        self.layout.page_offset(page))
        self._sync()
        self.bitmap.dirty_pages.difference_update(pages)
        return len(pages)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _write(self, data: bytes, offset: int) -> None:
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise MetadataFileError(f"metadata {self.path}: write at {offset} failed: "
                                    f"{exc.strerror}") from None

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise MetadataFileError(f"metadata {self.path}: fdatasync failed: "
                                    f"{exc.strerror}") from None


def _fsync_dir(path: str) -> None:
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
