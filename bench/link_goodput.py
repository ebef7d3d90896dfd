"""Link goodput against the raw AF_PACKET baseline, measured in the same run.

For each MTU, in one pair of fresh namespaces joined by veth:
1. the raw baseline (bench/raw_link.py: one Python `send` per full-MTU frame, nothing
   else in the loop) — what the machine can push through the link at all;
2. `mirrord-link send` → `mirrord-link receive` of a deterministic stream of 256 KiB
   messages (MESSAGE_SIZE): delivered payload per second at the receiver, digest
   checked, counters kept;
3. the same with both ends skipping the digest (`--no-verify`: the link alone, as iperf
   measures, one unchanging buffer sent over and over as the baseline sends one
   frame), and with a shared secret (every frame MAC'd, digest checked);
and reports goodput / raw as the figure of merit (absolute numbers on a shared 2-core
VM are noisy; ratios from one run are not).  Each measurement is repeated and the
median reported.

    python3 bench/link_goodput.py                    # MTU 1500 and 9000, 3 repeats
    python3 bench/link_goodput.py --mtu 9000 --repeats 5 --bytes 2G

MB is 10**6 bytes.  Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from linkproc import LinkProcess, link_argv  # noqa: E402
from netns import NetnsPair  # noqa: E402
from probe import cpu_probe  # noqa: E402
from raw_link import measure_raw  # noqa: E402

DEFAULT_BYTES = {1500: "512M", 9000: "2G"}
# Message size of every transfer: nbdcopy's default request size, and the daemon sends
# each NBD write as one message.
MESSAGE_SIZE = "256K"


def transfer(pair: NetnsPair, size: str, extra: list[str], verify: bool = True) -> dict:
    """One mirrord-link transfer a → b; the receiver's report (goodput, counters)."""
    receiver = LinkProcess(pair, pair.ns_b, link_argv(
        pair.if_b, "beta", *extra, "receive", "--bytes", size, "--timeout", "300",
        *([] if verify else ["--no-verify"])))
    sender = LinkProcess(pair, pair.ns_a, link_argv(
        pair.if_a, "alpha", *extra, "send", "--bytes", size, "--timeout", "300",
        "--message-size", MESSAGE_SIZE, *([] if verify else ["--no-verify"])))
    rc_s, sent = sender.finish(timeout=360)
    rc_r, got = receiver.finish(timeout=60)
    if rc_s or rc_r or not got or not sent or (verify and got["digest"] != sent["digest"]):
        raise RuntimeError(f"transfer failed:\n{sender.stderr}\n{receiver.stderr}")
    return got


def measure(mtu: int, size: str, repeats: int, secret_file: str) -> dict:
    raws, plains, links, macs = [], [], [], []
    probes = [cpu_probe()]
    retransmits = 0
    with NetnsPair(mtu=mtu) as pair:
        for i in range(repeats):
            raws.append(measure_raw(mtu, 2.0, pair=pair)["delivered_mb_s"])
            probes.append(cpu_probe())
            # Alternate the order of the verified and unverified runs between repeats so
            # that a drift in the machine's speed does not favour one of them.
            for verify in ((True, False) if i % 2 == 0 else (False, True)):
                got = transfer(pair, size, [], verify=verify)
                (plains if verify else links).append(got["goodput_mb_s"])
                retransmits += got["counters"]["duplicates"]
                probes.append(cpu_probe())
            macs.append(transfer(pair, size, ["--secret-file", secret_file])["goodput_mb_s"])
            probes.append(cpu_probe())
    raw = statistics.median(raws)
    plain = statistics.median(plains)
    mac = statistics.median(macs)
    link_only = statistics.median(links)
    return {
        "mtu": mtu,
        "bytes": size,
        "repeats": repeats,
        "raw_mb_s": raw,
        "goodput_mb_s": plain,
        "goodput_unverified_mb_s": link_only,
        "goodput_with_secret_mb_s": mac,
        "ratio": round(plain / raw, 3),
        "ratio_unverified": round(link_only / raw, 3),
        "ratio_with_secret": round(mac / raw, 3),
        "samples": {"raw": raws, "goodput": plains, "unverified": links, "with_secret": macs},
        # Steady = a quiet machine; a spread of more than ~15% means the figures are suspect.
        "cpu_probe_ms": probes,
        "duplicates_seen": retransmits,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mtu", type=int, action="append", help="MTU to measure (repeatable)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bytes", help="transfer size (default 512M at 1500, 2G at 9000)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("link_goodput: run as root (it makes network namespaces)", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("wb", suffix=".secret") as secret:
        secret.write(b"benchmark shared secret")
        secret.flush()
        results = [measure(mtu, args.bytes or DEFAULT_BYTES.get(mtu, "512M"), args.repeats,
                           secret.name)
                   for mtu in (args.mtu or [1500, 9000])]
    for r in results:
        print(f"MTU {r['mtu']}: raw {r['raw_mb_s']:.0f} MB/s, goodput {r['goodput_mb_s']:.0f} "
              f"MB/s ({r['ratio']:.0%} of raw), unverified {r['goodput_unverified_mb_s']:.0f} "
              f"MB/s ({r['ratio_unverified']:.0%}), with secret {r['goodput_with_secret_mb_s']:.0f} "
              f"MB/s ({r['ratio_with_secret']:.0%})", file=sys.stderr)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
