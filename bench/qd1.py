"""4 KiB writes at queue depth 1 through a mirrored volume, for A/B runs between two
checkouts: one JSON line per run.

    python3 bench/qd1.py [--repo CHECKOUT] [--writes 3000] [--protocol C]

A MirrorPair (tests/mirrorpair.py) of CHECKOUT (default: this one) at MTU 9000 on
/dev/shm, 64 MiB, alpha primary and in sync; then `--writes` libnbd `pwrite`s of 4 KiB,
one at a time, each timed from the call to its return (the server's acknowledgement),
at consecutive offsets.  Prints p50, p90 and p99 in µs.  Run it alternately from two
checkouts (a `git worktree` of the commit before a change) so that both meet the same
machine; bench/volume.py is the benchmark with its baselines (standalone, nbdkit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--writes", type=int, default=3000)
    p.add_argument("--protocol", default="C", choices=("A", "B", "C"))
    args = p.parse_args(argv)
    repo = os.path.abspath(args.repo)
    sys.path.insert(0, os.path.join(repo, "tests"))
    sys.path.insert(0, repo)
    import nbdclient
    from mirrorpair import MirrorPair, in_sync
    from netns import NetnsPair

    size = 64 << 20
    with NetnsPair(mtu=9000) as net:
        pair = MirrorPair(net, size=size, protocol=args.protocol)
        try:
            pair.start_all()
            pair.promote("alpha", force=True)
            pair.wait("alpha", lambda s: in_sync(s) and s["sync"] is None, 120, "in sync")
            handle = nbdclient.load().NBD()
            handle.connect_uri(pair.uri("alpha"))
            block = os.urandom(4096)
            latencies = []
            for i in range(args.writes):
                started = time.perf_counter()
                handle.pwrite(block, (i * 4096) % (size - 4096))
                latencies.append(time.perf_counter() - started)
            handle.shutdown()
        finally:
            pair.close()
    latencies.sort()

    def at(share: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * share))] * 1e6, 1)

    print(json.dumps({"repo": repo, "protocol": args.protocol, "writes": args.writes,
                      "p50_us": at(0.5), "p90_us": at(0.9), "p99_us": at(0.99)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
