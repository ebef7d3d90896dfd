"""Soak: the suite's crash, link and resync scenarios for many more rounds, by hand.

    python3 tests/soak.py SCENARIO [--rounds 40] [--seed 1] [--protocol C] [--size-mib 64]

Not collected by pytest (its name does not start with test_); run it as root when a
change touches the write path, the resync or the link, and let it go for a while.  Each
round makes a random-write stream (fio, 16 in flight) meet one event, waits until the
pair is back in sync and compares the two backing files.  One line per round; on the
first divergence it prints the differing 4 KiB blocks and both daemons' logs and exits 1.

Scenarios:
  primary     kill -9 the primary under writes; restart it, promote it
  secondary   kill -9 the secondary under writes; restart it while the writes go on
  both        kill -9 both at once (a power cut of the pair); restart both in random order
  flap        cut and restore the link 1-3 times under writes
  sync-kill   kill -9 either box while a resync runs beside a write stream
  invalidate  a checksum resync (`invalidate` on the secondary) under writes
  verify      an online verify under writes: must find no difference
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time

from mirrorpair import MirrorPair, first_difference, in_sync
from netns import NetnsPair

MiB = 1 << 20
SCENARIOS = ("primary", "secondary", "both", "flap", "sync-kill", "invalidate", "verify")


def stop(fio) -> None:
    fio.kill()
    fio.wait(30)


def settled(pair, timeout: float = 120) -> None:
    pair.wait("alpha", lambda s: in_sync(s) and s["out_of_sync_bytes"] == 0, timeout,
              "back in sync")
    time.sleep(0.3)
    pair.wait("alpha", in_sync, 30, "still in sync")


def differing_blocks(pair) -> list[int]:
    blocks = []
    with open(pair.disk("alpha"), "rb") as a, open(pair.disk("beta"), "rb") as b:
        offset = 0
        while chunk := a.read(MiB):
            other = b.read(MiB)
            blocks += [offset + i for i in range(0, len(chunk), 4096)
                       if chunk[i:i + 4096] != other[i:i + 4096]]
            offset += len(chunk)
    return blocks


def one_round(pair, scenario: str, rng: random.Random, seed: int) -> str:
    """Run one round; returns a note for its line."""
    net, note = pair.net, ""
    if scenario == "primary":
        fio = pair.random_writes("alpha", seed)
        time.sleep(0.2 + rng.random())
        pair.kill("alpha")
        stop(fio)
        pair.start("alpha")
        pair.promote("alpha")
    elif scenario == "secondary":
        fio = pair.random_writes("alpha", seed)
        time.sleep(0.2 + rng.random())
        pair.kill("beta")
        time.sleep(rng.random())
        pair.start("beta")
        time.sleep(rng.random() * 1.5)  # writes go on during beta's resync
        stop(fio)
    elif scenario == "both":
        fio = pair.random_writes("alpha", seed)
        time.sleep(0.2 + rng.random())
        for node in ("alpha", "beta"):
            pair.procs[node].send_signal(signal.SIGKILL)
        for node in ("alpha", "beta"):
            pair.procs[node].wait(20)
        stop(fio)
        for node in rng.sample(["alpha", "beta"], 2):
            pair.start(node)
        pair.promote("alpha")
    elif scenario == "flap":
        fio = pair.random_writes("alpha", seed)
        for _ in range(rng.randrange(1, 4)):
            time.sleep(rng.random() * 0.8)
            net.set_link(pair.ns["alpha"], False)
            time.sleep(rng.random() * 0.8)
            net.set_link(pair.ns["alpha"], True)
        time.sleep(rng.random())
        stop(fio)
    elif scenario == "sync-kill":
        net.set_link(pair.ns["alpha"], False)
        fio = pair.random_writes("alpha", seed, bs="256k")  # much to resync
        time.sleep(1.0 + rng.random())
        stop(fio)
        net.set_link(pair.ns["alpha"], True)
        victim = rng.choice(["alpha", "beta"])
        time.sleep(0.05 + rng.random() * 0.4)
        fio = pair.random_writes("alpha", seed + 1)
        time.sleep(rng.random() * 0.2)
        pair.kill(victim)
        stop(fio)
        pair.start(victim)
        if victim == "alpha":
            pair.promote("alpha")
        note = f"killed {victim}"
    elif scenario == "invalidate":
        fio = pair.random_writes("alpha", seed)
        time.sleep(0.1 + rng.random() * 0.5)
        pair.ctl("beta", "invalidate")
        time.sleep(rng.random() * 2.0)  # a checksum resync under writes
        stop(fio)
    else:  # verify
        fio = pair.random_writes("alpha", seed)
        time.sleep(0.1 + rng.random() * 0.3)
        pair.ctl("alpha", "verify")
        # `verify` answers once the run is set up: the first status without one has
        # this run's result.
        done = pair.wait("alpha", lambda s: s["verify"] is None, 120, "verify done")
        stop(fio)
        found = done["last_verify"]
        if not found["completed"] or found["differing_blocks"]:
            raise SystemExit(f"verify under writes: {found}\n{pair.logs_text()}")
        note = "verify found nothing"
    settled(pair)
    return note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Scenarios:")[1])
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--protocol", default="C", choices=("A", "B", "C"))
    p.add_argument("--size-mib", type=int, default=64)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with NetnsPair(mtu=9000) as net:
        pair = MirrorPair(net, size=args.size_mib * MiB, protocol=args.protocol)
        try:
            pair.start_all()
            pair.promote("alpha", force=True)
            pair.wait_connected(timeout=120)
            for round_no in range(args.rounds):
                started = time.monotonic()
                note = one_round(pair, args.scenario, rng, args.seed * 1000 + round_no * 2)
                diff = first_difference(pair.disk("alpha"), pair.disk("beta"))
                took = time.monotonic() - started
                if diff is None:
                    print(f"round {round_no} {args.scenario}: identical ({took:.1f} s) {note}",
                          flush=True)
                    continue
                blocks = differing_blocks(pair)
                print(f"round {round_no} {args.scenario}: DIFFER from byte {diff}; "
                      f"{len(blocks)} blocks: {[hex(b) for b in blocks[:32]]}\n"
                      f"{pair.logs_text()}", flush=True)
                return 1
        finally:
            pair.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
