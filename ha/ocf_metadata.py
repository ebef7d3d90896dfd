"""The agent's meta-data: OCF 1.1 XML that Pacemaker, pcs and crm read.

It must validate against both grammars that ship with resource-agents: the OCF 1.1
RelaxNG schema (/usr/share/resource-agents/metadata.rng: roles are Promoted and
Unpromoted) and the old ra-api-1.dtd that `ocf-tester` checks with `xmllint --valid`
(hence the DOCTYPE, and no OCF 1.1-only attributes such as reloadable or unique-group).
The action timeouts are the minimums Pacemaker suggests to pcs and crm; the monitor
intervals differ per role because Pacemaker needs one recurring operation per role.
"""

from __future__ import annotations

__all__ = ["ACTIONS", "meta_data"]

AGENT_VERSION = "0.1.0"

# (name, timeout, extra attributes): the actions Pacemaker may call.
ACTIONS = (
    ("start", "60s", ""),  # `mirrorctl up` waits up to 30 s for the daemon to answer
    ("stop", "60s", ""),  # a clean stop flushes the disk and the metadata
    ("promote", "30s", ""),
    ("demote", "30s", ""),
    ("notify", "20s", ""),
    ("monitor", "20s", ' depth="0" interval="10s" role="Promoted"'),
    ("monitor", "20s", ' depth="0" interval="20s" role="Unpromoted"'),
    ("meta-data", "5s", ""),
    ("validate-all", "20s", ""),
)

_PARAMETERS = """\
<parameter name="config" unique="1" required="1">
<longdesc lang="en">
The resource's TOML file (e.g. /etc/mirrord/r0.toml), the same on both nodes. One
file, one resource, one clone.
</longdesc>
<shortdesc lang="en">mirrord resource config file</shortdesc>
<content type="string" default="" />
</parameter>

<parameter name="node" unique="0" required="0">
<longdesc lang="en">
This node's name in the config file ([nodes.NAME]). Empty: mirrorctl's default, the
host name (then its short form).
</longdesc>
<shortdesc lang="en">this node's name in the config</shortdesc>
<content type="string" default="" />
</parameter>

<parameter name="log_file" unique="0" required="0">
<longdesc lang="en">
Where the daemon's output is appended (passed to `mirrorctl up --log-file`). Empty:
/var/log/mirrord/RESOURCE.log.
</longdesc>
<shortdesc lang="en">the daemon's log file</shortdesc>
<content type="string" default="" />
</parameter>

<parameter name="mirrorctl" unique="0" required="0">
<longdesc lang="en">
The mirrorctl command (a path, optionally with arguments). Empty: the mirrorctl of the
Python that runs this agent (python3 -m mirrord.mirrorctl), which deploy/install.sh
sets up.
</longdesc>
<shortdesc lang="en">mirrorctl command</shortdesc>
<content type="string" default="" />
</parameter>
"""

_LONGDESC = """\
Runs one mirrord resource (box-to-box block mirroring) as a promotable clone: start and
stop run `mirrorctl up` and `mirrorctl down`, promote and demote run `mirrorctl primary`
(never forced) and `mirrorctl secondary`, monitor reads `mirrorctl status --json`.

Promotion scores follow the disk: 10000 for an up-to-date primary, or an up-to-date
secondary connected to its peer; 1000 for an up-to-date secondary that cannot see its
peer (the survivor of a dead primary); none for an outdated, inconsistent, failed or
diskless disk, or a resync target, which are never promoted.

Configure with promoted-max=1 clone-max=2 clone-node-max=1 notify=true. The first
promotion of a fresh pair needs `mirrorctl primary --force` once, by hand, on the node
whose data counts.
"""


def meta_data() -> str:
    actions = "\n".join(f'<action name="{name}" timeout="{timeout}"{extra} />'
                        for name, timeout, extra in ACTIONS)
    return f"""<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="mirrord" version="{AGENT_VERSION}">
<version>1.1</version>

<longdesc lang="en">
{_LONGDESC}</longdesc>
<shortdesc lang="en">mirrord block mirroring (promotable)</shortdesc>

<parameters>
{_PARAMETERS}</parameters>

<actions>
{actions}
</actions>
</resource-agent>
"""
