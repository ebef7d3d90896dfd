"""Interleaved A/B of link transfers between checkouts: which tree moves data faster.

On a shared 2-core VM the same build moves ±15% between runs minutes apart, so two
trees are compared in rounds on one pair of namespaces: each round runs one
`mirrord-link send` → `receive` transfer per tree (the order rotating), and each
tree's goodput is divided by the first tree's in the same round.  The median of those
paired ratios is the figure; a drift of the machine's speed cancels out of it.

    python3 bench/link_ab.py --repo /path/to/before --repo /path/to/after
    python3 bench/link_ab.py --repo A --repo B --rounds 8 --bytes 3G --verify \\
        --sender-option=--message-size=1M

Per transfer: goodput at the receiver, and each end's CPU seconds (user + system, for
the whole process).  The sender is the bottleneck on veth: its CPU is ~ the wall time.
Needs root (namespaces).  MB is 10**6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from linkproc import LinkProcess, link_argv  # noqa: E402
from netns import NetnsPair  # noqa: E402


def transfer(pair: NetnsPair, repo: str, size: str, verify: bool, sender_options: list[str]) -> dict:
    """One transfer a → b with `repo`'s mirrord-link; the figures of the run."""
    checked = [] if verify else ["--no-verify"]
    receiver = LinkProcess(pair, pair.ns_b, link_argv(
        pair.if_b, "beta", "receive", "--bytes", size, "--timeout", "300", *checked), repo=repo)
    sender = LinkProcess(pair, pair.ns_a, link_argv(
        pair.if_a, "alpha", "send", "--bytes", size, "--timeout", "300", *checked,
        *sender_options), repo=repo)
    rc_s, sent = sender.finish(timeout=360)
    rc_r, got = receiver.finish(timeout=60)
    if rc_s or rc_r or not got or not sent or (verify and got["digest"] != sent["digest"]):
        raise RuntimeError(f"transfer with {repo} failed:\n{sender.stderr}\n{receiver.stderr}")
    return {"goodput_mb_s": got["goodput_mb_s"], "sender_cpu_s": sent["process_cpu_seconds"],
            "receiver_cpu_s": got["process_cpu_seconds"],
            "retransmits": sent["counters"]["retransmits"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", action="append", required=True,
                   help="checkout to run mirrord-link from (repeat; the first is the reference)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--bytes", default="3G", help="per transfer (default 3G)")
    p.add_argument("--mtu", type=int, default=9000)
    p.add_argument("--verify", action="store_true", help="digest the stream (default: --no-verify)")
    p.add_argument("--sender-option", action="append", default=[],
                   help="extra option for `mirrord-link send` (repeat), e.g. --message-size=256K")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("link_ab: run as root (it makes network namespaces)", file=sys.stderr)
        return 2
    repos = [os.path.abspath(r) for r in args.repo]
    runs: dict[str, list[dict]] = {repo: [] for repo in repos}
    with NetnsPair(mtu=args.mtu) as pair:
        for round_ in range(args.rounds):
            shift = round_ % len(repos)
            for repo in repos[shift:] + repos[:shift]:
                run = transfer(pair, repo, args.bytes, args.verify, args.sender_option)
                runs[repo].append(run)
                print(f"round {round_}: {repo}: {run['goodput_mb_s']:.0f} MB/s, sender "
                      f"{run['sender_cpu_s']:.2f} CPU-s", file=sys.stderr, flush=True)
    reference = runs[repos[0]]
    summary = []
    for repo in repos:
        mine = runs[repo]
        summary.append({
            "repo": repo,
            "goodput_mb_s_median": statistics.median(r["goodput_mb_s"] for r in mine),
            "paired_goodput_ratio_median": round(statistics.median(
                m["goodput_mb_s"] / r["goodput_mb_s"] for m, r in zip(mine, reference)), 3),
            "paired_sender_cpu_ratio_median": round(statistics.median(
                m["sender_cpu_s"] / r["sender_cpu_s"] for m, r in zip(mine, reference)), 3),
            "runs": mine,
        })
    for s in summary:
        print(f"{s['repo']}: median {s['goodput_mb_s_median']:.0f} MB/s, paired goodput ratio "
              f"{s['paired_goodput_ratio_median']:.3f}, sender CPU ratio "
              f"{s['paired_sender_cpu_ratio_median']:.3f}", file=sys.stderr)
    print(json.dumps({"bytes": args.bytes, "mtu": args.mtu, "verify": args.verify,
                      "sender_options": args.sender_option, "trees": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
