"""What the OCF agent concludes from a daemon's status: the promotion score and the
monitor result.  Pure functions of the dict that `mirrorctl status --json` prints.

Promotion scores (Pacemaker promotes the running instance with the highest score; an
instance without one is never promoted):

    role       disk         connection                 score   why
    primary    up-to-date   any                        10000   it is the data
    secondary  up-to-date   connected / sync-source    10000   peer known, we are current
    secondary  up-to-date   standalone / connecting     1000   peer unknown: the failover
                                                               case (survivor of a dead
                                                               primary), still promotable
    secondary  up-to-date   sync-target                 none   a resync is overwriting us
    any        outdated / inconsistent / failed /
               diskless, or an "outdated" record        none   stale or partial data
    anything else (unknown values)                      none   never promote on a guess

A peer that is known and current scores as high as a primary, so Pacemaker's own
stickiness keeps the primary where it is; 1000 is still promotable when nothing better
exists, which is what failover needs.  The daemon refuses promotion of a disk that is not
up to date anyway; the score keeps Pacemaker from asking (and from failing over to a
stale node) in the first place.

Monitor results: primary -> OCF_RUNNING_PROMOTED (8), secondary -> OCF_SUCCESS (0); a
failed disk -> OCF_FAILED_PROMOTED (9) on a primary, OCF_ERR_GENERIC (1) on a
secondary; an unknown role -> OCF_ERR_GENERIC.  "Not running" and "not answering" are
decided before there is a status (ha/ocf_agent.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["OCF", "SCORE_PEER_UNKNOWN", "SCORE_UP_TO_DATE", "Assessment", "assess",
           "monitor_result", "promotion_score"]


class OCF(IntEnum):
    """The OCF resource agent exit codes (OCF 1.1; Pacemaker's names)."""

    SUCCESS = 0
    ERR_GENERIC = 1
    ERR_ARGS = 2
    ERR_UNIMPLEMENTED = 3
    ERR_PERM = 4
    ERR_INSTALLED = 5
    ERR_CONFIGURED = 6
    NOT_RUNNING = 7
    RUNNING_PROMOTED = 8
    FAILED_PROMOTED = 9


SCORE_UP_TO_DATE = 10000  # current data, and we know the peer's state (or we are primary)
SCORE_PEER_UNKNOWN = 1000  # current as far as we know; the peer might have newer data

CONNECTED = ("connected", "sync-source")
PEER_UNKNOWN = ("standalone", "connecting")


@dataclass(frozen=True)
class Assessment:
    score: int | None  # None: not promotable (the attribute is deleted)
    why: str  # for the log: what the score rests on, or why there is none


def assess(status: dict) -> Assessment:
    """The promotion score of the node whose status this is, and why."""
    role, disk, connection = (status.get(k) for k in ("role", "disk", "connection"))
    if role == "primary" and disk == "up-to-date":
        return Assessment(SCORE_UP_TO_DATE, "primary, disk up to date")
    if disk != "up-to-date":
        return Assessment(None, _stale_disk(status))
    outdated = status.get("outdated")
    if outdated:  # the daemon's record says outdated, whatever the disk field says
        return Assessment(None, "the disk is outdated" + _outdated_detail(outdated))
    if role != "secondary":
        return Assessment(None, f"unknown role {role!r}")
    if connection in CONNECTED:
        return Assessment(SCORE_UP_TO_DATE, f"disk up to date, {connection} to "
                                            f"{_peer_name(status)}")
    if connection in PEER_UNKNOWN:
        return Assessment(SCORE_PEER_UNKNOWN, f"disk up to date as far as this node knows; "
                                              f"peer unknown ({connection})")
    if connection == "sync-target":
        return Assessment(None, "this node is the target of a running resync"
                                + _percent(status))
    return Assessment(None, f"unknown connection state {connection!r}")


def promotion_score(status: dict) -> int | None:
    """The promotion score for `status`; None means not promotable."""
    return assess(status).score


def monitor_result(status: dict) -> tuple[OCF, str]:
    """The monitor's exit code for a daemon that answered with `status`, and the reason
    when it is a failure."""
    role, disk = status.get("role"), status.get("disk")
    if role == "primary":
        if disk == "failed":
            return OCF.FAILED_PROMOTED, "the disk has failed on the primary"
        return OCF.RUNNING_PROMOTED, ""
    if role == "secondary":
        if disk == "failed":
            return OCF.ERR_GENERIC, "the disk has failed"
        return OCF.SUCCESS, ""
    return OCF.ERR_GENERIC, f"the daemon reports an unknown role {role!r}"


def _stale_disk(status: dict) -> str:
    disk = status.get("disk")
    if disk == "outdated":
        return "the disk is outdated" + _outdated_detail(status.get("outdated"))
    if disk == "inconsistent":
        if status.get("connection") == "sync-target":
            return "the disk is inconsistent: target of a running resync" + _percent(status)
        return "the disk is inconsistent (fresh, or an interrupted resync target)"
    if disk == "failed":
        return "the disk has failed"
    if disk == "diskless":
        return "no disk (diskless)"
    return f"unknown disk state {disk!r}"


def _outdated_detail(outdated) -> str:
    if not isinstance(outdated, dict):
        return ""
    by, reason = outdated.get("by"), outdated.get("reason")
    if by and reason:
        return f" (by {by}: {reason})"
    if by or reason:
        return f" ({f'by {by}' if by else reason})"
    return ""


def _percent(status: dict) -> str:
    sync = status.get("sync")
    percent = sync.get("percent") if isinstance(sync, dict) else None
    if isinstance(percent, (int, float)) and not isinstance(percent, bool):
        return f", {percent:.1f}% done"
    return ""


def _peer_name(status: dict) -> str:
    peer = status.get("peer")
    if isinstance(peer, dict) and peer.get("node"):
        return str(peer["node"])
    return "the peer"
