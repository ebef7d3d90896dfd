#!/bin/sh
# Install mirrord on this box for Pacemaker (or systemd): the Python package, the OCF
# resource agent, the CIB fence handler and the systemd unit.  Idempotent: run it again
# after an upgrade, or to point the installed wrappers at another Python.
#
#   sudo deploy/install.sh                     # pip install the checkout, then the rest
#   sudo deploy/install.sh --no-pip            # the package is installed already
#   deploy/install.sh --root DIR               # everything under DIR (staging, packaging)
#   deploy/install.sh --agent-only --dest DIR  # only the OCF agent, into DIR
#
# Options:
#   --python PATH   the Python that has (or gets) mirrord; default: python3 on PATH.
#                   Its real path (sys.executable, not a pyenv shim) is baked into the
#                   wrappers: Pacemaker runs agents with a minimal PATH.
#   --no-pip        do not run `python -m pip install .`
#   --source-tree   the wrappers run this checkout (PYTHONPATH), no pip install
#                   (tests, development)
#   --root DIR      install under DIR instead of / (no pip, no systemctl)
#   --agent-only    only the OCF agent; --dest DIR puts it in DIR instead of
#                   <root>/usr/lib/ocf/resource.d/mirrord (tests bind-mount DIR there)
#
# What goes where:
#   /usr/lib/ocf/resource.d/mirrord/mirrord   the agent: ocf:mirrord:mirrord
#   /usr/lib/mirrord/crm-fence                the fence handler (ha/crm_fence.py), for
#                                             fence_peer / unfence_peer in the resource file
#   /etc/systemd/system/mirrord@.service      only if /etc/systemd exists; NOT enabled:
#                                             under Pacemaker the agent starts the daemon
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
python=python3 pip=yes source_tree= root= agent_only= dest=

usage() { sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
    --python) python=${2:?--python needs a path}; shift 2 ;;
    --no-pip) pip=; shift ;;
    --source-tree) source_tree=$src pip=; shift ;;
    --root) root=${2:?--root needs a directory}; pip=; shift 2 ;;
    --agent-only) agent_only=yes pip=; shift ;;
    --dest) dest=${2:?--dest needs a directory}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -z "$dest" ] || [ -n "$agent_only" ] || { echo "install.sh: --dest goes with --agent-only" >&2; exit 2; }
if [ -z "$root$dest" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root to install into the system (or use --root DIR / --dest DIR)" >&2
    exit 2
fi
case "$root" in ''|/*) ;; *) root=$(pwd)/$root ;; esac
case "$dest" in ''|/*) ;; *) dest=$(pwd)/$dest ;; esac

# The real interpreter: a pyenv shim or a symlink on PATH must not be baked in.
py=$(command -v "$python" 2>/dev/null) || { echo "install.sh: no $python on PATH (use --python)" >&2; exit 2; }
py=$("$py" -c 'import sys; print(sys.executable)') || { echo "install.sh: $python does not run" >&2; exit 2; }
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "install.sh: $py is older than Python 3.11" >&2; exit 2; }

if [ -n "$pip" ]; then
    echo "install.sh: $py -m pip install $src"
    "$py" -m pip install --disable-pip-version-check -q "$src"
fi

# From here the wrappers' environment: the checkout on PYTHONPATH with --source-tree.
if [ -n "$source_tree" ]; then
    PYTHONPATH=$source_tree${PYTHONPATH:+:$PYTHONPATH}; export PYTHONPATH
fi
"$py" -P -c 'import ha.ocf_agent, ha.crm_fence, mirrord.mirrorctl' 2>/dev/null || {
    echo "install.sh: $py cannot import mirrord (install it, or drop --no-pip)" >&2; exit 1; }

# fill TEMPLATE OUT: the agent wrapper with this Python, this source tree and the
# meta-data (printed now, for users who cannot run $py, see deploy/ocf/mirrord).
fill() {
    "$py" -P - "$1" "$2" "$py" "$source_tree" <<'PY'
import os, subprocess, sys
template, out, python, tree = sys.argv[1:]
meta = subprocess.run([python, "-P", "-m", "ha.ocf_agent", "meta-data"], check=True,
                      capture_output=True, text=True).stdout.rstrip("\n")
text = open(template).read()
for key, value in (("@PYTHON@", python), ("@SOURCE_TREE@", tree), ("@META_DATA@", meta)):
    if "'" in value and key != "@META_DATA@":
        sys.exit(f"install.sh: {value!r}: a path with a quote cannot be baked in")
    text = text.replace(key, value)
tmp = out + ".new"
with open(tmp, "w") as f:
    f.write(text)
os.chmod(tmp, 0o755)
os.replace(tmp, out)  # atomic: Pacemaker may run the agent while we install
PY
}

install_dir() { mkdir -p "$1" && chmod 755 "$1"; }

agent_dir=${dest:-$root/usr/lib/ocf/resource.d/mirrord}
install_dir "$agent_dir"
fill "$src/deploy/ocf/mirrord" "$agent_dir/mirrord"
echo "install.sh: OCF agent $agent_dir/mirrord (ocf:mirrord:mirrord, Python $py)"
[ -z "$agent_only" ] || exit 0

handler_dir=$root/usr/lib/mirrord
install_dir "$handler_dir"
tmp=$handler_dir/crm-fence.new
{
    echo '#!/bin/sh'
    echo "# mirrord's CIB fence handler (ha/crm_fence.py), installed by deploy/install.sh."
    echo "# In the resource file: fence_peer = \"${handler_dir#"$root"}/crm-fence fence\" (and unfence)."
    if [ -n "$source_tree" ]; then
        echo "PYTHONPATH='$source_tree'\${PYTHONPATH:+:\$PYTHONPATH}; export PYTHONPATH"
    fi
    echo "exec '$py' -P -m ha.crm_fence \"\$@\""
} >"$tmp"
chmod 755 "$tmp" && mv -f "$tmp" "$handler_dir/crm-fence"
echo "install.sh: fence handler $handler_dir/crm-fence"

if [ -d "$root/etc/systemd" ]; then
    install_dir "$root/etc/systemd/system"
    # The unit's ExecStart names /usr/local/bin/mirrord; run the Python found here instead.
    env_line=
    [ -z "$source_tree" ] || env_line="\\nEnvironment=PYTHONPATH=$source_tree"
    sed "s|^ExecStart=.*|ExecStart='$py' -P -m mirrord.daemon --config /etc/mirrord/%i.toml$env_line|" \
        "$src/deploy/mirrord@.service" >"$root/etc/systemd/system/mirrord@.service.new"
    chmod 644 "$root/etc/systemd/system/mirrord@.service.new"
    mv -f "$root/etc/systemd/system/mirrord@.service.new" "$root/etc/systemd/system/mirrord@.service"
    echo "install.sh: systemd unit $root/etc/systemd/system/mirrord@.service (not enabled:" \
         "under Pacemaker the agent starts mirrord)"
    if [ -z "$root" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
fi
