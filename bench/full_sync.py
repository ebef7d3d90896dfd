"""Full sync alone, for A/B runs between two checkouts: one number per run.

    python3 bench/full_sync.py [--repo CHECKOUT] [--size-mib 1024]

A MirrorPair (tests/mirrorpair.py) of CHECKOUT (default: this one) at MTU 9000 on
/dev/shm: alpha's disk full of distinct non-zero 1 MiB chunks, beta's zeroed; the time
from `primary --force` on alpha until both are in sync, both daemons' CPU seconds and
the resync bytes sent, as one JSON line.  Run it alternately from two checkouts (e.g.
a `git worktree` of the commit before a change) so that both meet the same machine;
bench/resync.py is the benchmark with its baselines (nbdcopy, rsync).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--size-mib", type=int, default=1024)
    args = p.parse_args(argv)
    repo, size = os.path.abspath(args.repo), args.size_mib << 20
    sys.path.insert(0, os.path.join(repo, "tests"))
    sys.path.insert(0, repo)
    from mirrord.control import ControlClient
    from mirrorpair import MirrorPair, in_sync
    from netns import NetnsPair

    with NetnsPair(mtu=9000) as net:
        pair = MirrorPair(net, size=size)
        try:
            chunk = os.urandom(1 << 20)
            with open(pair.disk("alpha"), "r+b") as f:
                for i in range(size >> 20):
                    f.write(chunk[:8] + i.to_bytes(8, "big") + chunk[16:])
            with open(pair.disk("beta"), "r+b") as f:
                f.write(bytes(size))
            pair.start_all()
            started = time.monotonic()
            pair.promote("alpha", force=True)
            # Poll the control socket from here: a mirrorctl process per poll would cost
            # ~0.3 CPU-s each, taken from the daemons being measured.
            with ControlClient(pair.paths["alpha"]["control_socket"], timeout=30) as ctl:
                while True:
                    status = ctl.request("status")["status"]
                    if in_sync(status) and status["sync"] is None:
                        break
                    if time.monotonic() - started > 300:
                        raise SystemExit(f"not in sync within 300 s: {status}")
                    time.sleep(0.05)
            took = time.monotonic() - started
            print(json.dumps({
                "repo": repo, "seconds": round(took, 2), "mb_s": round(size / took / 1e6),
                "cpu_s": {n: cpu_seconds(pair.procs[n].pid) for n in ("alpha", "beta")},
                "sent_bytes": status["resync_sent_bytes"], "identical": pair.disks_equal()}))
        finally:
            pair.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
