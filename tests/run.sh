#!/usr/bin/env bash
# The test command (README.md): installs what the tests need on a fresh machine, then
# runs the whole suite.  Needs root: integration tests make network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: run as root (the integration tests create network namespaces)" >&2
    exit 2
fi
# iproute2 for `ip netns`/veth; procps for ps (the demo test looks for leftover processes).
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ps >/dev/null || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}"
fi
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
exec python3 -m pytest -q "$@" tests
