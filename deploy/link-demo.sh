#!/usr/bin/env bash
# The link demo: two network namespaces ("boxes" alpha and beta) joined by a veth
# pair, the dedicated replication link, and mirrord's link protocol running over it.
#
#   sudo deploy/link-demo.sh            # about a minute
#   DEMO_BYTES=256M sudo deploy/link-demo.sh
#
# It installs what it needs (pip install -e .), shows a clean transfer, a transfer
# through 5% loss / 1% duplication / reordering / 0.1% corruption, a cut of the link
# and its return, and a peer with the wrong secret being refused.  Everything it makes
# (namespaces, processes, temporary files) is removed on exit, also when interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

if [ "$(id -u)" != 0 ]; then
    echo "link-demo.sh: run as root (it creates network namespaces)" >&2
    exit 2
fi

BYTES=${DEMO_BYTES:-1G}
FAULT_BYTES=${DEMO_FAULT_BYTES:-256M}
RUN=md$$                       # names unique to this run
NS_A=${RUN}alpha NS_B=${RUN}beta
IF_A=mir0 IF_B=mir0            # each box calls its dedicated interface mir0
WORK=$(mktemp -d /tmp/mirrord-demo.XXXXXX)
PIDS=()

cleanup() {
    trap - EXIT INT TERM ERR
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
    done
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    [ -n "${DEMO_KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "link-demo.sh: failed at line $LINENO; logs were in $WORK" >&2' ERR
trap 'echo; echo "interrupted: cleaning up"; exit 130' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
link() {  # link NS NODE ARGS...: run mirrord-link on a box
    local ns=$1 node=$2; shift 2
    # exec: run in the background, `$!` is then mirrord-link itself (ip netns exec
    # execs too), so cleanup stops the real process, not a subshell around it.
    exec ip netns exec "$ns" python3 -m mirrord.linktool --interface mir0 --node "$node" "$@"
}
field() {  # field FILE KEY...: print keys of a JSON report
    python3 - "$@" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:
    value = report
    for part in key.split("."):
        value = value[part]
    print(f"{key}={value}", end="  ")
print()
EOF
}

say "Installing mirrord (pip install -e .)"
command -v ip >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2
}
python3 -m pip install -q --disable-pip-version-check -e "$REPO"

say "Two boxes, $NS_A and $NS_B, joined by a dedicated link (veth, MTU 9000)"
ip netns add "$NS_A"
ip netns add "$NS_B"
# Distinct ifindexes on the two ends: the kernel then reports the peer end's carrier
# change at once (with equal indexes it may batch the event for up to a second).
ip -n "$NS_A" link add "$IF_A" index 10 mtu 9000 type veth peer name "$IF_B" index 20 mtu 9000 netns "$NS_B"
ip -n "$NS_A" link set "$IF_A" up
ip -n "$NS_B" link set "$IF_B" up
ip -n "$NS_A" -br link show "$IF_A"
ip -n "$NS_B" -br link show "$IF_B"
printf 'correct horse battery staple' > "$WORK/secret"
printf 'not the same secret' > "$WORK/wrong-secret"

say "1. $BYTES from alpha to beta, authenticated with a shared secret"
link "$NS_B" beta --secret-file "$WORK/secret" receive --bytes "$BYTES" > "$WORK/recv1.json" 2> "$WORK/recv1.log" &
PIDS+=($!)
(link "$NS_A" alpha --secret-file "$WORK/secret" send --bytes "$BYTES") > "$WORK/send1.json" 2> "$WORK/send1.log"
wait "${PIDS[-1]}"
grep -h "connected" "$WORK/send1.log" | head -1
echo -n "sender:   "; field "$WORK/send1.json" bytes goodput_mb_s digest
echo -n "receiver: "; field "$WORK/recv1.json" bytes goodput_mb_s digest
cmp -s <(field "$WORK/send1.json" digest) <(field "$WORK/recv1.json" digest) && echo "digests match: the stream arrived intact"

say "2. $FAULT_BYTES through a bad link: 5% loss, 1% duplication, 2% reordering, 0.1% corruption (both ways)"
FAULTS=loss=0.05,dup=0.01,reorder=0.02,corrupt=0.001
link "$NS_B" beta --faults "$FAULTS,seed=2" receive --bytes "$FAULT_BYTES" > "$WORK/recv2.json" 2> "$WORK/recv2.log" &
PIDS+=($!)
(link "$NS_A" alpha --faults "$FAULTS,seed=1" send --bytes "$FAULT_BYTES") > "$WORK/send2.json" 2> "$WORK/send2.log"
wait "${PIDS[-1]}"
echo -n "injected at alpha: "; field "$WORK/send2.json" faults.dropped faults.duplicated faults.reordered faults.corrupted
echo -n "alpha repaired:    "; field "$WORK/send2.json" counters.retransmits goodput_mb_s
echo -n "beta dropped:      "; field "$WORK/recv2.json" counters.corrupt counters.duplicates order_errors
cmp -s <(field "$WORK/send2.json" digest) <(field "$WORK/recv2.json" digest) && echo "digests match: every byte exactly once, in order"

say "3. Cut the link, then restore it"
link "$NS_A" alpha monitor > "$WORK/mon-a.jsonl" 2> "$WORK/mon-a.log" &
MON_A=$!
PIDS+=($MON_A)
link "$NS_B" beta monitor > "$WORK/mon-b.jsonl" 2> "$WORK/mon-b.log" &
MON_B=$!
PIDS+=($MON_B)
wait_for() {  # wait_for FILE PATTERN COUNT: bounded wait for COUNT matching lines
    for _ in $(seq 100); do
        [ "$(grep -c "$2" "$1" 2>/dev/null || true)" -ge "$3" ] && return 0
        sleep 0.1
    done
    echo "timed out waiting for '$2' in $1" >&2
    return 1
}
wait_for "$WORK/mon-a.log" "connected to" 1
wait_for "$WORK/mon-b.log" "connected to" 1
tail -n1 "$WORK/mon-a.log"
echo "\$ ip link set mir0 down   (on alpha)"
ip -n "$NS_A" link set "$IF_A" down
wait_for "$WORK/mon-a.log" "connection lost" 1
wait_for "$WORK/mon-b.log" "connection lost" 1
grep -h "connection lost" "$WORK/mon-a.log" "$WORK/mon-b.log"
sleep 1
echo "\$ ip link set mir0 up     (on alpha)"
ip -n "$NS_A" link set "$IF_A" up
wait_for "$WORK/mon-a.log" "connected to" 2
wait_for "$WORK/mon-b.log" "connected to" 2
grep -h "connected to" "$WORK/mon-a.log" | tail -n1
python3 - "$WORK/mon-a.jsonl" <<'EOF'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1]) if '"event"' in l]
lost = next(e for e in events if e["event"] == "lost")
back = [e for e in events if e["event"] == "connected"]
print(f"alpha: session {back[0]['session']} lost ({lost['reason']}), "
      f"new session {back[-1]['session']} {back[-1]['t'] - lost['t']:.2f} s after the loss "
      f"(1 s of it the link was down)")
EOF

kill "$MON_A" "$MON_B"
wait "$MON_A" "$MON_B" || true

say "4. A box with the wrong secret is refused"
link "$NS_A" alpha --secret-file "$WORK/secret" monitor --seconds 2 > /dev/null 2> "$WORK/auth-a.log" &
PIDS+=($!)
(link "$NS_B" beta --secret-file "$WORK/wrong-secret" monitor --seconds 2) > /dev/null 2> "$WORK/auth-b.log" || true
wait "${PIDS[-1]}" || true
grep -h "handshake refused" "$WORK/auth-a.log" | head -1

say "Done: the demo removes its namespaces and files now"
