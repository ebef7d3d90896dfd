"""ha/ocf_scores.py: the promotion score and the monitor result, from fake statuses.

Each status is shaped like `mirrorctl status --json` output; the table in the module's
docstring is tested row by row, then every combination of role, disk and connection
(none may crash, and only an up-to-date disk may ever be promotable).
"""

from __future__ import annotations

import itertools

import pytest

from ha.ocf_scores import (
    OCF, SCORE_PEER_UNKNOWN, SCORE_UP_TO_DATE, assess, monitor_result, promotion_score,
)

ROLES = ("primary", "secondary")
DISKS = ("up-to-date", "outdated", "inconsistent", "diskless", "failed")
CONNECTIONS = ("standalone", "connecting", "connected", "sync-source", "sync-target")


def status(role="secondary", disk="up-to-date", connection="connected", **extra) -> dict:
    peer = {"node": "beta", "role": "primary", "disk": "up-to-date"} \
        if connection in ("connected", "sync-source", "sync-target") else None
    return {"resource": "r0", "node": "alpha", "role": role, "disk": disk,
            "connection": connection, "peer": peer, "protocol": "C",
            "out_of_sync_bytes": 0, "sync": None, "outdated": None, "io_frozen": False,
            **extra}


# -- the table ----------------------------------------------------------------------------

@pytest.mark.parametrize("connection", CONNECTIONS)
def test_an_up_to_date_primary_scores_highest_whatever_its_connection(connection):
    assert promotion_score(status("primary", "up-to-date", connection)) == SCORE_UP_TO_DATE


@pytest.mark.parametrize("connection", ["connected", "sync-source"])
def test_an_up_to_date_secondary_that_sees_its_peer_scores_highest(connection):
    verdict = assess(status("secondary", "up-to-date", connection))
    assert verdict.score == SCORE_UP_TO_DATE == 10000
    assert verdict.why == f"disk up to date, {connection} to beta"


@pytest.mark.parametrize("connection", ["standalone", "connecting"])
def test_an_up_to_date_secondary_without_its_peer_is_still_promotable_but_lower(connection):
    # The survivor of a dead primary: failover must be able to promote it.
    verdict = assess(status("secondary", "up-to-date", connection))
    assert verdict.score == SCORE_PEER_UNKNOWN == 1000
    assert f"peer unknown ({connection})" in verdict.why
    assert 0 < SCORE_PEER_UNKNOWN < SCORE_UP_TO_DATE


@pytest.mark.parametrize("disk", ["outdated", "inconsistent", "failed", "diskless"])
@pytest.mark.parametrize("connection", CONNECTIONS)
def test_a_disk_that_is_not_up_to_date_is_never_promotable(disk, connection):
    for role in ROLES:
        assert promotion_score(status(role, disk, connection)) is None


def test_a_sync_target_is_not_promotable_even_if_it_says_up_to_date():
    verdict = assess(status("secondary", "up-to-date", "sync-target",
                            sync={"percent": 42.0}))
    assert verdict.score is None
    assert verdict.why == "this node is the target of a running resync, 42.0% done"


def test_an_outdated_record_wins_over_the_disk_field():
    s = status("secondary", "up-to-date", "standalone",
               outdated={"by": "beta", "reason": "replication link lost"})
    verdict = assess(s)
    assert verdict.score is None
    assert verdict.why == "the disk is outdated (by beta: replication link lost)"


# -- the reasons (logged on every score change) ----------------------------------------

@pytest.mark.parametrize("s, why", [
    (status(disk="outdated", connection="standalone",
            outdated={"by": "beta", "reason": "beta went on writing alone"}),
     "the disk is outdated (by beta: beta went on writing alone)"),
    (status(disk="outdated", connection="standalone", outdated={"by": "beta"}),
     "the disk is outdated (by beta)"),
    (status(disk="outdated", connection="standalone", outdated=None),
     "the disk is outdated"),
    (status(disk="inconsistent", connection="sync-target", sync={"percent": 7.25}),
     "the disk is inconsistent: target of a running resync, 7.2% done"),
    (status(disk="inconsistent", connection="standalone"),
     "the disk is inconsistent (fresh, or an interrupted resync target)"),
    (status(disk="failed"), "the disk has failed"),
    (status(disk="diskless"), "no disk (diskless)"),
    (status(disk="shiny"), "unknown disk state 'shiny'"),
    (status(connection="teleporting"), "unknown connection state 'teleporting'"),
    (status(role="observer"), "unknown role 'observer'"),
    ({}, "unknown disk state None"),
])
def test_why_a_node_is_not_promotable(s, why):
    verdict = assess(s)
    assert verdict.score is None and verdict.why == why


def test_odd_values_in_the_status_do_not_crash():
    assert assess(status(disk="outdated", outdated="yes")).why == "the disk is outdated"
    odd_sync = status(disk="inconsistent", connection="sync-target", sync={"percent": True})
    assert assess(odd_sync).why.endswith("resync")
    assert assess(status(connection="connected", peer="beta")).why == \
        "disk up to date, connected to the peer"


def test_every_combination_promotes_only_an_up_to_date_disk():
    for role, disk, connection in itertools.product(ROLES, DISKS, CONNECTIONS):
        score = promotion_score(status(role, disk, connection))
        assert score in (None, SCORE_PEER_UNKNOWN, SCORE_UP_TO_DATE)
        if score is not None:
            assert disk == "up-to-date"
            assert role == "primary" or connection != "sync-target"


# -- monitor ------------------------------------------------------------------------------

@pytest.mark.parametrize("s, code", [
    (status("primary"), OCF.RUNNING_PROMOTED),
    (status("primary", "up-to-date", "standalone", io_frozen=True), OCF.RUNNING_PROMOTED),
    (status("primary", "failed"), OCF.FAILED_PROMOTED),
    (status("secondary"), OCF.SUCCESS),
    (status("secondary", "inconsistent", "sync-target"), OCF.SUCCESS),
    (status("secondary", "outdated", "standalone"), OCF.SUCCESS),
    (status("secondary", "failed"), OCF.ERR_GENERIC),
    (status("observer"), OCF.ERR_GENERIC),
    ({}, OCF.ERR_GENERIC),
])
def test_monitor_result(s, code):
    got, reason = monitor_result(s)
    assert got == code
    assert (reason == "") == (code in (OCF.SUCCESS, OCF.RUNNING_PROMOTED))


def test_the_ocf_codes_are_the_standard_ones():
    assert [int(c) for c in OCF] == list(range(10))
    assert (OCF.NOT_RUNNING, OCF.RUNNING_PROMOTED, OCF.FAILED_PROMOTED) == (7, 8, 9)
    assert (OCF.ERR_UNIMPLEMENTED, OCF.ERR_INSTALLED, OCF.ERR_CONFIGURED) == (3, 5, 6)
