#!/usr/bin/env bash
# The test command (README.md): installs what the tests need on a fresh machine, then
# runs the whole suite.  Needs root: integration tests make network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: run as root (the integration tests create network namespaces)" >&2
    exit 2
fi
# iproute2 for `ip netns`/veth; procps for ps (the demo test looks for leftover processes);
# real NBD clients and a FUSE bridge for the NBD tests (see ../shared/NBD-TESTING.md);
# e2fsprogs and mount (losetup) for the ext4 test.
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ps >/dev/null || need+=(procps)
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
[ -e /usr/lib/python3/dist-packages/nbd.py ] || need+=(python3-libnbd)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v fio >/dev/null || need+=(fio)
command -v e2fsck >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null || need+=(mount)
# a real Corosync + Pacemaker pair for the cluster tests (tests/cluster.py); crm_mon and
# cibadmin are only Recommends of pacemaker; resource-agents brings ocf-tester.
command -v corosync >/dev/null || need+=(corosync)
command -v pacemakerd >/dev/null || need+=(pacemaker)
command -v crm_mon >/dev/null || need+=(pacemaker-cli-utils)
command -v ocf-tester >/dev/null || need+=(resource-agents)
# ocf-tester checks an agent's meta-data with xmllint (tests/test_ocf_agent.py).
command -v xmllint >/dev/null || need+=(libxml2-utils)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}"
fi
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
exec python3 -m pytest -q "$@" tests
