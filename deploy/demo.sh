#!/usr/bin/env bash
# The two-box demo of a mirrored volume: two network namespaces ("boxes" alpha and beta)
# joined by a veth pair (their dedicated replication link), one mirrord on each, and an
# ext4 filesystem on the volume through the primary's NBD export.
#
#   sudo deploy/demo.sh                     # well under two minutes
#   DEMO_SIZE=256M sudo deploy/demo.sh      # a smaller volume (default 512M)
#   DEMO_KEEP=1 sudo deploy/demo.sh         # keep the work dir (config, logs, disks)
#
# It installs what it needs (apt-get for missing tools, pip install -e .), then shows:
# the initial full sync, ext4 on alpha's export (nbdfuse + a loop device), a cut of the
# link while the primary goes on writing, the resync when the link returns, and a
# switch of roles after which beta serves the same files (sha256sum -c, e2fsck -fn).
# Everything it makes (namespaces, daemons, FUSE and ext4 mounts, loop devices, files)
# is removed on exit, also when interrupted.  See also deploy/link-demo.sh (the link only).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

if [ "$(id -u)" != 0 ]; then
    echo "demo.sh: run as root (it creates network namespaces, loop devices and mounts)" >&2
    exit 2
fi

SIZE=${DEMO_SIZE:-512M}
SIZE_MIB=$(( $(numfmt --from=iec "$SIZE" 2>/dev/null || echo 0) >> 20 ))
if [ "$SIZE_MIB" -lt 128 ]; then
    echo "demo.sh: DEMO_SIZE=$SIZE: give at least 128M (e.g. 256M, 1G)" >&2
    exit 2
fi
# While the link is down alpha writes a big file besides small ones, so that the resync
# after it comes back (it copies only the regions written meanwhile) can be watched.
BIG_MIB=$(( SIZE_MIB / 2 - 32 ))
RATE=${DEMO_SYNC_RATE:-64M}
RUN=md$$                       # names unique to this run
NS_A=${RUN}alpha NS_B=${RUN}beta
IFNAME=mir0                    # each box calls its dedicated interface mir0
WORK=$(mktemp -d /dev/shm/mirrord-demo.XXXXXX)
CONF=$WORK/r0.toml
declare -A DAEMON=()           # node -> mirrord PID
declare -A FUSE=()             # FUSE mount dir -> nbdfuse PID
INTERRUPTED=
JOB=                           # the background command run/bounded is waiting for

# --- cleanup: in the order the stack was built, top down; every step bounded ----------

fuse_conn() {  # fuse_conn DIR: the FUSE connection number of the mount at DIR (from
    # mountinfo, not stat: stat of a FUSE mount whose server hangs would hang too)
    awk -v m="$1" '$5 == m { for (i = 7; $i != "-"; i++) {}  # skip optional fields
                             if ($(i + 1) == "fuse") { split($3, d, ":"); print d[1] * 1048576 + d[2] } }' /proc/self/mountinfo
}
abort_fuse() {  # abort_fuse DIR: cut a hung FUSE connection (NBD-TESTING.md); requests
    local conn     # blocked on it (and their callers in D state) then fail at once
    conn=$(fuse_conn "$1")
    [ -n "$conn" ] || return 0
    grep -q ' /sys/fs/fuse/connections ' /proc/mounts || mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null
    echo 1 > "/sys/fs/fuse/connections/$conn/abort" 2>/dev/null || true
}
is_mounted() { awk -v m="$1" '$2 == m { found = 1 } END { exit !found }' /proc/mounts; }
run() {  # run CMD...: CMD as a background job that this shell waits for.  A Ctrl-C is
    # then handled at once, even while CMD is stuck (in D state on a FUSE server that
    # hangs), where a foreground command would hold the shell until it ends.
    "$@" &
    JOB=$!
    local rc=0
    wait "$JOB" || rc=$?
    JOB=
    return "$rc"
}
bounded() {  # bounded SECONDS CMD...: run, but if CMD is still running after SECONDS
    # (stuck on a FUSE server that hangs), abort our FUSE connections so that it fails
    local limit=$1 i rc=0; shift
    "$@" &
    JOB=$!
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$JOB" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$JOB" 2>/dev/null; then
        echo "demo.sh: '$*' still running after $limit s: aborting the FUSE connections" >&2
        for dir in "${!FUSE[@]}"; do abort_fuse "$dir"; done
    fi
    wait "$JOB" || rc=$?
    JOB=
    return "$rc"
}
descendants() {  # descendants PID: its children, theirs, ... (by parent PID)
    local kid
    for kid in $(pgrep -P "$1"); do
        echo "$kid"
        descendants "$kid"
    done
}
stop_job() {  # stop_job: end the command run/bounded was waiting for when interrupted
    [ -n "$JOB" ] && kill -0 "$JOB" 2>/dev/null || return 0
    local kids
    kids=$(descendants "$JOB")  # e.g. the `head` of a write_files job
    kill -TERM "$JOB" $kids 2>/dev/null
    for _ in $(seq 30); do
        kill -0 "$JOB" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$JOB" 2>/dev/null; then  # stuck: unblock it, then make sure
        for dir in "${!FUSE[@]}"; do abort_fuse "$dir"; done
        kill -KILL "$JOB" $kids 2>/dev/null
    fi
    wait "$JOB" 2>/dev/null
    JOB=
}

stop_pid() {  # stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

mounts_under() {  # mounts_under DIR: mount points below DIR, deepest first
    awk -v w="$1/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r
}

loops_under() {  # loops_under DIR: loop devices whose backing file is below DIR
    losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v w="$1/" 'index($2, w) == 1 { print $1 }'
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM ERR
    set +e
    [ -n "$INTERRUPTED" ] && status=130
    cd /
    stop_job  # a step still running (writing files, say) ...
    # ... then the ext4 mounts (they write back through the loop device and FUSE) ...
    for mnt in $(mounts_under "$WORK" | grep -v '/fuse-'); do
        bounded 20 umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
    done
    rmdir "$WORK"/fs-* 2>/dev/null  # see detach(): drops copies in other mount namespaces
    # ... then the loop devices on the FUSE files ...
    for loop in $(loops_under "$WORK"); do
        bounded 20 losetup -d "$loop" 2>/dev/null
    done
    for _ in $(seq 100); do  # `losetup -d` of a device still open completes at its close
        [ -z "$(loops_under "$WORK")" ] && break
        sleep 0.1
    done
    # ... then the FUSE mounts (nbdfuse exits when unmounted) ...
    for dir in "${!FUSE[@]}"; do
        if is_mounted "$dir"; then
            bounded 10 fusermount3 -u "$dir" 2>/dev/null || {
                abort_fuse "$dir"
                bounded 10 fusermount3 -u "$dir" 2>/dev/null || umount -l "$dir" 2>/dev/null
            }
        fi
        rmdir "$dir" 2>/dev/null
        stop_pid "${FUSE[$dir]}"
    done
    # ... then the daemons (by PID), the namespaces and the files.
    for node in "${!DAEMON[@]}"; do
        stop_pid "${DAEMON[$node]}"
    done
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
    if [ -n "${DEMO_KEEP:-}" ]; then
        echo "demo.sh: kept $WORK"
    else
        rm -rf --one-file-system "$WORK"  # never into a mount that would not go
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'trap - ERR; die "failed at line $LINENO"' ERR
trap 'INTERRUPTED=1; trap "" ERR; echo; echo "interrupted: cleaning up"; exit 130' INT TERM

# --- helpers ---------------------------------------------------------------------------

die() {  # die MESSAGE: say why, with the end of both daemons' logs, and stop
    echo "demo.sh: $*" >&2
    for node in alpha beta; do
        echo "--- $WORK/$node.log (last lines)" >&2
        tail -n 8 "$WORK/$node.log" >&2 2>/dev/null || true
    done
    exit 1
}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; }
mirrorctl() {  # mirrorctl NODE ARGS...: the node's daemon, through its control socket
    local node=$1; shift
    python3 -m mirrord.mirrorctl --socket "$WORK/$node.ctl" "$@"
}
state() {  # state NODE: "role disk connection peer-disk out-of-sync-bytes", or "down"
    mirrorctl "$1" status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["role"], s["disk"], s["connection"], (s.get("peer") or {}).get("disk", "-"),
      s["out_of_sync_bytes"])' 2>/dev/null || echo down
}
uri() { echo "nbd+unix:///r0?socket=$WORK/$1.nbd"; }
start_mirrord() {  # start_mirrord NS NODE: in the background; $! is mirrord itself
    # exec: `$!` is then mirrord (ip netns exec and setsid exec too), so cleanup stops
    # the real process.  setsid: Ctrl-C reaches only this script, which then takes the
    # stack down in order (filesystem, loop, FUSE, daemons) instead of all at once.
    exec setsid ip netns exec "$1" python3 -m mirrord.daemon --config "$CONF" --node "$2"
}
watch_sync() {  # watch_sync SECONDS: alpha's `mirrorctl status` on one line a second, with
    # the time since the start, until alpha and beta are connected and both up to date.
    # One process polling the control socket (the request `mirrorctl status` makes and
    # its formatting), so that the lines keep pace on a busy machine.
    python3 - "$WORK/alpha.ctl" "$1" <<'EOF'
import sys, time
from mirrord.control import ControlClient, ControlUnavailable
from mirrord.mirrorctl import format_status

path, limit = sys.argv[1], float(sys.argv[2])
start = time.monotonic()
with ControlClient(path, timeout=10) as client:
    for tick in range(int(limit) + 1):
        time.sleep(max(0.0, start + tick - time.monotonic()))
        try:
            status = client.request("status")["status"]
        except (ControlUnavailable, KeyError) as exc:
            sys.exit(f"demo.sh: alpha's control socket: {exc}")
        first, *rest = format_status(status).splitlines()
        line = " | ".join([first.split(", protocol")[0]]
                          + [r.strip() for r in rest if not r.strip().startswith("peer")])
        print(f"  [{time.monotonic() - start:4.1f}s] {line}", flush=True)
        peer = status.get("peer") or {}
        if (status.get("connection"), status.get("disk"), peer.get("disk")) == \
                ("connected", "up-to-date", "up-to-date"):
            sys.exit(0)
sys.exit(f"demo.sh: alpha and beta not in sync after {limit:g} s")
EOF
}
attach() {  # attach NODE MNT: the node's export as a block device; sets LOOP
    local node=$1 fuse=$WORK/fuse-$1 pidfile=$WORK/nbdfuse-$1.pid ro=${3:-}
    mkdir -p "$fuse" "$2"
    show "nbdfuse $fuse/disk $(uri "$node") &"
    setsid nbdfuse -P "$pidfile" "$fuse/disk" "$(uri "$node")" &
    FUSE[$fuse]=$!
    for _ in $(seq 100); do
        [ -s "$pidfile" ] && break
        kill -0 "${FUSE[$fuse]}" 2>/dev/null || die "nbdfuse exited"
        sleep 0.1
    done
    [ -s "$pidfile" ] || die "nbdfuse not ready after 10 s"
    LOOP=$(losetup -f --show $ro "$fuse/disk")
    show "losetup -f --show ${ro:+$ro }$fuse/disk   -> $LOOP"
}
detach() {  # detach NODE MNT: umount, losetup -d, fusermount3 -u: no client left
    local fuse=$WORK/fuse-$1
    show "umount $2; losetup -d $LOOP; fusermount3 -u $fuse"
    bounded 30 umount "$2"
    # Remove each mount point once unmounted: a process anywhere on this machine that
    # made its own mount namespace while we were mounted (`ip netns exec` does) holds a
    # copy of our mounts, and unmounting here does not reach it (these mounts are
    # private); deleting the directory detaches such copies, which would otherwise keep
    # the loop device and then the FUSE file busy.
    rmdir "$2"
    bounded 30 losetup -d "$LOOP"
    for _ in $(seq 100); do
        [ -z "$(loops_under "$WORK")" ] && break
        sleep 0.1
    done
    [ -z "$(loops_under "$WORK")" ] || die "$LOOP still attached 10 s after losetup -d"
    bounded 20 fusermount3 -u "$fuse"
    rmdir "$fuse"
    for _ in $(seq 100); do  # nbdfuse exits once unmounted, closing its NBD connection
        kill -0 "${FUSE[$fuse]}" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "${FUSE[$fuse]}" 2>/dev/null && die "nbdfuse still running 10 s after its unmount"
    wait "${FUSE[$fuse]}" 2>/dev/null || true
    unset "FUSE[$fuse]"
}
write_files() {  # write_files FIRST LAST [BIG_MiB]: files FIRST..LAST of random size and
    mkdir -p "$FS/files"  # content (up to 1 MiB), the last one BIG_MiB if given; the list
    for i in $(seq "$1" "$2"); do  # of checksums in the filesystem and in $WORK
        local bytes=$(( (RANDOM % 256 + 1) * 4096 + RANDOM ))
        [ "$i" = "$2" ] && [ -n "${3:-}" ] && bytes=$(( $3 << 20 ))
        head -c "$bytes" /dev/urandom > "$FS/files/$(printf 'f%03d' "$i")"
    done
    (cd "$FS" && sha256sum files/* > "$WORK/SHA256SUMS" && cp "$WORK/SHA256SUMS" SHA256SUMS)
    printf '%s files, %s\n' "$(ls "$FS/files" | wc -l)" "$(du -sh "$FS/files" | cut -f1)"
}

# --- the demo --------------------------------------------------------------------------

say "Installing what the demo needs"
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v nbdfuse >/dev/null || need+=(libnbd-bin)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null || need+=(mount)
command -v pgrep >/dev/null || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
    echo "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}"
fi
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check -e "$REPO"
echo "work dir: $WORK"

say "Two boxes, $NS_A and $NS_B, joined by a dedicated link (veth, MTU 9000)"
ip netns add "$NS_A"
ip netns add "$NS_B"
# Distinct ifindexes on the two ends: the kernel then reports the peer end's carrier
# change at once (with equal indexes it may batch the event for up to a second).
ip -n "$NS_A" link add "$IFNAME" index 10 mtu 9000 type veth peer name "$IFNAME" index 20 mtu 9000 netns "$NS_B"
ip -n "$NS_A" link set "$IFNAME" up
ip -n "$NS_B" link set "$IFNAME" up
ip -n "$NS_A" -br link show "$IFNAME"
ip -n "$NS_B" -br link show "$IFNAME"

say "Resource r0: a $SIZE disk on each box (sparse files), resync limited to $RATE/s"
{
    printf '[resource]\nname = "r0"\nprotocol = "C"\nsync_rate = "%s"\n' "$RATE"
    for node in alpha beta; do
        printf '\n[nodes.%s]\ninterface = "%s"\n' "$node" "$IFNAME"
        for key in disk:img metadata:meta nbd_socket:nbd control_socket:ctl; do
            printf '%s = "%s/%s.%s"\n' "${key%%:*}" "$WORK" "$node" "${key#*:}"
        done
    done
} > "$CONF"
truncate -s "$SIZE" "$WORK/alpha.img" "$WORK/beta.img"
cat "$CONF"

say "Fresh metadata for each disk, then mirrord on both boxes"
for node in alpha beta; do
    show "mirrorctl --config $CONF --node $node create-md"
    # `mirrorctl create-md` where this mirrorctl has it, else the same code directly
    python3 -m mirrord.mirrorctl --config "$CONF" --node "$node" create-md 2> /dev/null \
        || python3 -m mirrord.create_md --config "$CONF" --node "$node"
done
start_mirrord "$NS_A" alpha 2> "$WORK/alpha.log" &
DAEMON[alpha]=$!
start_mirrord "$NS_B" beta 2> "$WORK/beta.log" &
DAEMON[beta]=$!
for node in alpha beta; do
    show "ip netns exec ${RUN}$node mirrord --config $CONF --node $node &   (pid ${DAEMON[$node]})"
done
for _ in $(seq 100); do
    [ "$(state alpha)" != down ] && [ "$(state beta)" != down ] && break
    for node in alpha beta; do
        kill -0 "${DAEMON[$node]}" 2>/dev/null || die "mirrord on $node exited"
    done
    sleep 0.1
done
for _ in $(seq 100); do  # both fresh disks are inconsistent until one side is forced
    [[ "$(state alpha)" == *" connected "* ]] && break
    sleep 0.1
done
show "mirrorctl status   (on alpha)"
mirrorctl alpha status

say "alpha becomes primary (--force: fresh disks are inconsistent); the full sync starts"
show "mirrorctl primary --force   (on alpha)"
mirrorctl alpha primary --force
run watch_sync 120
mirrorctl alpha status

FS=$WORK/fs-alpha
say "ext4 on alpha's export, in the root namespace (nbdfuse + loop device)"
attach alpha "$FS"
show "mkfs.ext4 -q -F $LOOP && mount $LOOP $FS"
run mkfs.ext4 -q -F "$LOOP"
run mount "$LOOP" "$FS"
echo "writing 50 files and a checksum list ..."
run write_files 1 50
run sync -f "$FS"
df -h "$FS" | tail -n 1

say "Cut the link: alpha goes on serving alone and records that beta is behind"
show "ip link set $IFNAME down   (on alpha)"
ip -n "$NS_A" link set "$IFNAME" down
for _ in $(seq 100); do
    [[ "$(state alpha)" == *" connected "* ]] || break
    sleep 0.1
done
show "mirrorctl status   (on alpha)"
mirrorctl alpha status
echo "writing 30 more files while beta is away, the last one of $BIG_MIB MiB ..."
run write_files 51 80 "$BIG_MIB"
run sync -f "$FS"
show "mirrorctl status   (on alpha)"
mirrorctl alpha status
show "mirrorctl status   (on beta)"
mirrorctl beta status

say "Restore the link: alpha resyncs beta, copying only what beta missed"
show "ip link set $IFNAME up   (on alpha)"
ip -n "$NS_A" link set "$IFNAME" up
run watch_sync 120
mirrorctl alpha status

say "Switch roles: alpha lets go of the volume, beta takes it over"
detach alpha "$FS"
show "mirrorctl secondary   (on alpha)"
mirrorctl alpha secondary
show "mirrorctl primary   (on beta)"
mirrorctl beta primary
mirrorctl beta status

FS=$WORK/fs-beta
say "The same filesystem on beta's export"
attach beta "$FS" -r
show "e2fsck -fn $LOOP   (not mounted)"
run e2fsck -fn "$LOOP" 2>&1
echo "e2fsck: no errors on beta's copy (exit 0)"
show "mount -o ro $LOOP $FS"
run mount -o ro "$LOOP" "$FS"
show "cd $FS && sha256sum -c $WORK/SHA256SUMS   (the list made on alpha)"
run env -C "$FS" sha256sum -c "$WORK/SHA256SUMS" > "$WORK/verify.txt"
sed -n '1,3p' "$WORK/verify.txt"
echo "..."
tail -n 2 "$WORK/verify.txt"
ok=$(grep -c ': OK$' "$WORK/verify.txt")
total=$(wc -l < "$WORK/SHA256SUMS")
[ "$ok" -eq "$total" ]
echo "beta holds all $ok of $total files, every checksum matches"
detach beta "$FS"
show "cmp $WORK/alpha.img $WORK/beta.img"
cmp "$WORK/alpha.img" "$WORK/beta.img"
echo "the two boxes' disks are byte-identical"

say "Done: the demo removes its mounts, loop devices, daemons, namespaces and files now"
