"""Failover time: the primary's box powered off -> the new primary accepts NBD writes.

One real two-node Corosync + Pacemaker cluster in network namespaces (tests/cluster.py:
knet, token 1000, two_node), the resource run by the OCF agent as the documented
promotable clone (deploy/pacemaker/r0-clone.xml, monitors 3 s / 4 s), the replication
link its own veth pair.  Each run:
1. the promoted node is powered off (its PID namespace killed, its links down);
2. from the host, a client tries every 10 ms to connect to the survivor's export and
   write 4 KiB with FUA; the time of the first write that completes is the failover time;
3. the daemon's log on the survivor gives the steps, each in seconds after the power-off:
   the link lost (carrier), the peer gone from the corosync group (corosync's token
   timeout and consensus: Corosync's part), promoted (Pacemaker's part: the scheduler,
   the agent's promote action), the peer fenced (ours: the outdate attempt, here the
   CIB constraint of the fence handler, since the dead peer cannot answer);
4. the crashed node is powered on again, resyncs, and the next run powers off whichever
   node is promoted then.
The median of the runs (default 5) is reported, with every sample.

    python3 bench/failover.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import cluster as cluster_module  # noqa: E402
from clustermirror import CLONE, CRM_FENCE, DAEMON_LOG, SETTLE_S, bring_up  # noqa: E402
from probe import cpu_probe  # noqa: E402

PROBE_INTERVAL_S = 0.01  # between two write attempts on the survivor
FAILOVER_TIMEOUT_S = 60.0
GOAL_S = 5.0  # the goal, with token 1000
# The daemon's log lines that mark each step (mirrord/engine.py, cluster.py, engine_fence.py).
STEPS = {
    "link_lost": r"connection to \w+ lost",
    "corosync_peer_gone": r"'s daemon left the cluster group",
    "promoted": r" is now primary",
    "fenced": r"(cannot be promoted now|could not fence)",
}
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def write_accepted(nbd, uri: str) -> bool:
    handle = nbd.NBD()
    try:
        handle.connect_uri(uri)
        handle.pwrite(b"\x5a" * 4096, 0, nbd.CMD_FLAG_FUA)
        return True
    except Exception:  # noqa: BLE001 - not yet: refused, read-only, or gone
        return False
    finally:
        try:
            handle.close()
        except Exception:  # noqa: BLE001
            pass


def step_times(log: str, since: float) -> dict:
    """Seconds after `since` (epoch) of the first line of each step after it."""
    out = {}
    for line in log.splitlines():
        m = LOG_TIME.match(line)
        if m is None:
            continue
        at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if at < since - 0.5:
            continue
        for step, pattern in STEPS.items():
            if step not in out and re.search(pattern, line):
                out[step] = round(at - since, 3)
    return out


def one_failover(m, nbd) -> dict:
    c = m.c
    (victim,) = m.promoted(c.nodes[0])
    survivor = c.peer(victim)
    uri = m.uri(survivor)
    probe = cpu_probe()
    crashed = time.time()
    c.crash(victim)
    while not write_accepted(nbd, uri):
        if time.time() - crashed > FAILOVER_TIMEOUT_S:
            raise RuntimeError(f"no write accepted on {survivor} in {FAILOVER_TIMEOUT_S} s\n"
                               f"{m.logs()}")
        time.sleep(PROBE_INTERVAL_S)
    took = time.time() - crashed
    log = c.run(survivor, ["/usr/bin/cat", DAEMON_LOG]).stdout
    sample = {"powered_off": victim, "survivor": survivor, "write_accepted_s": round(took, 3),
              **step_times(log, crashed), "cpu_probe_ms": probe}
    # Back to two nodes in sync before the next run.
    c.boot(victim)
    c.wait(lambda: c.roles(survivor, CLONE) == {survivor: "Promoted", victim: "Unpromoted"},
           SETTLE_S * 2, f"{victim} back, unpromoted")
    m.wait_connected(timeout=120)
    c.wait(lambda: not m.fence_constraint(survivor), 30, "the fence constraint removed")
    return sample


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = p.parse_args(argv)
    reason = cluster_module.unusable_reason()
    if reason:
        print(f"failover bench: {reason}", file=sys.stderr)
        return 2
    import nbdclient

    nbd = nbdclient.load()
    made = []

    def make(start=True, **options):
        c = cluster_module.Cluster(**options)
        made.append(c)
        if start:
            c.start()
        return c

    dirs = [tempfile.mkdtemp(prefix=f"mirrord-bench-{w}-", dir="/tmp") for w in ("ocf", "cfg")]
    for d in dirs:
        os.chmod(d, 0o755)
    samples = []
    try:
        m, _, _ = bring_up(make, dirs[0], dirs[1], size=64 << 20, extra_resource=CRM_FENCE)
        for run in range(args.runs):
            sample = one_failover(m, nbd)
            samples.append(sample)
            print(f"run {run + 1}: {json.dumps(sample)}", file=sys.stderr)
    finally:
        for c in made:
            c.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    def median(key):
        values = [s[key] for s in samples if key in s]
        return round(statistics.median(values), 3) if values else None

    result = {
        "runs": len(samples), "corosync_token_ms": 1000,
        "write_accepted_s": median("write_accepted_s"),
        "steps_median_s": {step: median(step) for step in STEPS},
        "samples": samples,
    }
    steps = result["steps_median_s"]
    if steps["corosync_peer_gone"] is not None and steps["promoted"] is not None:
        result["split_s"] = {
            "corosync (power-off -> peer gone)": steps["corosync_peer_gone"],
            "pacemaker (peer gone -> promoted)": round(steps["promoted"]
                                                       - steps["corosync_peer_gone"], 3),
            "mirrord (promoted -> write accepted)": round(result["write_accepted_s"]
                                                          - steps["promoted"], 3),
        }
    print(f"failover: median {result['write_accepted_s']} s over {len(samples)} runs "
          f"(goal < {GOAL_S:g} s); split {result.get('split_s')}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
