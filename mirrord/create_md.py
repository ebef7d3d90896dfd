"""`mirrorctl create-md`: write fresh metadata for this node's disk (like drbdadm create-md).

Fresh metadata says: disk inconsistent, no generation, empty bitmap and activity log.
Run it once per node before the first start; `mirrord` refuses to start without it.
Refused while the daemon is running, and over existing metadata unless forced.
"""

from __future__ import annotations

from resync.metadata import Metadata

from .config import ResourceConfig, disk_size
from .control import ControlClient, ControlUnavailable
from .metafile import MetadataFileError, MetaStore


class CreateRefused(Exception):
    """create-md will not run: why and what to do, in one line."""


def create_md(cfg: ResourceConfig, force: bool = False) -> str:
    node = cfg.node
    try:
        ControlClient(node.control_socket, timeout=2.0).request("status")
    except ControlUnavailable:
        pass  # not running: good
    else:
        raise CreateRefused(f"mirrord is running for {cfg.name} on {node.name} "
                            f"({node.control_socket}); stop it first")
    try:
        size = disk_size(node.disk)
    except (OSError, ValueError) as exc:
        raise CreateRefused(f"{cfg.path}: nodes.{node.name}.disk: {exc}") from None
    meta = Metadata(size=size, node=node.name, volume_id=cfg.volume_id)
    try:
        MetaStore.create(node.metadata, meta, force=force)
    except MetadataFileError as exc:
        raise CreateRefused(str(exc)) from None
    return (f"created metadata {node.metadata} for {size} bytes on {node.name}: the disk is "
            "inconsistent until a resync, or `mirrorctl primary --force`")
