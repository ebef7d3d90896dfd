"""The CIB fence handler: keep Pacemaker from promoting the peer of a node that goes on
writing alone (DRBD's crm-fence-peer, in our terms).

    python3 -m ha.crm_fence fence   [--clone ID] [--timeout S]
    python3 -m ha.crm_fence unfence [--timeout S]

The daemon runs it (the resource's ``fence_peer`` / ``unfence_peer`` commands) with
MIRRORD_RESOURCE (the resource), MIRRORD_NODE (this node), MIRRORD_PEER (the peer) and
MIRRORD_CONFIG (the absolute path of the resource's TOML file) in the environment.

``fence`` places the location constraint ``mirrord-fence-<resource>`` on the promotable
clone that runs this resource: the Promoted role scores -INFINITY on every node whose
#uname is not MIRRORD_NODE.  Pacemaker then demotes the peer if it is promoted and never
promotes it while the constraint stands, whatever its promotion score says.  The clone is
the <clone> holding the primitive ocf:mirrord:mirrord whose instance attribute ``config``
is MIRRORD_CONFIG, or the one --clone names.  The role is written "Promoted" when the
CIB's schema knows it (pacemaker-3.7, Pacemaker 2.1), else the legacy "Master".
``unfence`` removes the constraint (the daemon runs it once the peer is up to date
again).  Both are idempotent, and both read the CIB back before they report success.

Exit codes: 0 done (the CIB says so), 1 failed: stderr says why (no clone found, no
cluster, cibadmin refused, the CIB does not show the change).  The daemon must not treat
the peer as fenced unless this exits 0.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from . import pcmk

__all__ = ["Constraint", "FenceError", "constraint_id", "constraint_xml", "find_clone",
           "main", "parse_constraint", "promoted_role"]

PREFIX = "mirrord-fence-"  # constraint ids: PREFIX + resource (resource names are XML-safe)
DEFAULT_TIMEOUT = 30.0  # seconds for each cibadmin call: a wedged CIB is a failure
PROMOTED_SINCE = (3, 7)  # the first CIB schema (pacemaker-3.7) with role "Promoted"
AGENT = ("ocf", "mirrord", "mirrord")  # class, provider, type of our primitive
EXIT_OK, EXIT_FAILED = 0, 1


class FenceError(Exception):
    """Why the handler failed, in one line for stderr."""


@dataclass(frozen=True)
class Constraint:
    """The parts of our rsc_location that matter: equal means already in place."""

    id: str
    rsc: str
    role: str
    score: str
    node: str  # the one node allowed to be promoted


# -- pure: the XML --------------------------------------------------------------------------

def constraint_id(resource: str) -> str:
    return PREFIX + resource


def promoted_role(validate_with: str | None) -> str:
    """The rule role for "Promoted" that a CIB validating with `validate_with` accepts."""
    m = re.fullmatch(r"pacemaker-(\d+)\.(\d+)", validate_with or "")
    if m and (int(m.group(1)), int(m.group(2))) >= PROMOTED_SINCE:
        return "Promoted"
    if validate_with in ("pacemaker-next", "pacemaker"):
        return "Promoted"
    return "Master"


def constraint_xml(resource: str, clone: str, node: str, role: str = "Promoted") -> str:
    """The rsc_location that forbids the Promoted role of `clone` off `node`."""
    cid = constraint_id(resource)
    location = ET.Element("rsc_location", id=cid, rsc=clone)
    rule = ET.SubElement(location, "rule", id=f"{cid}-rule", role=role, score="-INFINITY")
    ET.SubElement(rule, "expression", id=f"{cid}-expression", attribute="#uname",
                  operation="ne", value=node)
    return ET.tostring(location, encoding="unicode")


def parse_constraint(xml: str, cid: str) -> Constraint | None:
    """Our constraint `cid` in `xml` (a CIB, a section of it, or cibadmin's query
    output), or None if it is not there.  Raises FenceError for XML that does not parse
    or a constraint with that id that is not of our shape."""
    root = _parse(xml)
    found = [e for e in root.iter("rsc_location") if e.get("id") == cid]
    if not found:
        return None
    location = found[0]
    rules = location.findall("rule")
    expressions = rules[0].findall("expression") if len(rules) == 1 else []
    if len(expressions) != 1 or expressions[0].get("attribute") != "#uname" \
            or expressions[0].get("operation") != "ne":
        raise FenceError(f"the CIB has a constraint {cid} that is not mirrord's fence "
                         f"(one rule, one '#uname ne NODE' expression): remove it by hand")
    rule, expression = rules[0], expressions[0]
    return Constraint(cid, location.get("rsc", ""), _role_name(rule.get("role", "")),
                      rule.get("score", ""), expression.get("value", ""))


def wanted(resource: str, clone: str, node: str) -> Constraint:
    return Constraint(constraint_id(resource), clone, "Promoted", "-INFINITY", node)


def find_clone(cib: str, config: str) -> str:
    """The id of the <clone> whose ocf:mirrord:mirrord primitive has config=`config`.

    Raises FenceError when there is none, or more than one."""
    root = _parse(cib)
    want = os.path.normpath(config)
    matches = []
    for clone in root.iter("clone"):
        for primitive in clone.iter("primitive"):
            if (primitive.get("class"), primitive.get("provider"),
                    primitive.get("type")) != AGENT:
                continue
            for nvpair in primitive.iterfind("instance_attributes/nvpair"):
                if nvpair.get("name") == "config" and \
                        os.path.normpath(nvpair.get("value", "")) == want:
                    matches.append(clone.get("id", "?"))
    if not matches:
        raise FenceError(f"no clone in the CIB runs ocf:mirrord:mirrord with config={config} "
                         f"(pass --clone ID to name it)")
    if len(set(matches)) > 1:
        raise FenceError(f"several clones run config={config}: {', '.join(sorted(set(matches)))}"
                         f" (pass --clone ID)")
    return matches[0]


def check_clone(cib: str, clone: str) -> None:
    """Raise FenceError unless `cib` has a promotable <clone id=`clone`>."""
    root = _parse(cib)
    for element in root.iter("clone"):
        if element.get("id") == clone:
            meta = {nv.get("name"): nv.get("value", "")
                    for nv in element.iterfind("meta_attributes/nvpair")}
            if meta.get("promotable", "false").lower() not in ("true", "1", "yes", "on", "y"):
                raise FenceError(f"clone {clone} is not promotable (meta promotable=true): "
                                 f"a Promoted-role constraint would mean nothing")
            return
    raise FenceError(f"the CIB has no clone with id {clone}")


def _role_name(role: str) -> str:
    return "Promoted" if role in ("Promoted", "Master") else role


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as err:
        raise FenceError(f"cannot parse the CIB from cibadmin: {err}") from None


# -- the CIB, through cibadmin --------------------------------------------------------------

class Cib:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def run(self, *args: str) -> pcmk.ToolResult:
        return pcmk.run_tool("cibadmin", [*args, "--timeout", str(max(int(self.timeout), 1))],
                             timeout=self.timeout + 5)

    def query(self) -> str:
        result = self.run("--query")
        if not result.ok:
            raise self.failure("read the CIB", result)
        return result.stdout

    def constraint(self, cid: str) -> Constraint | None:
        return parse_constraint(self.query(), cid)

    def write(self, verb: str, xml: str) -> None:
        result = self.run(verb, "--scope", "constraints", "--xml-text", xml)
        if not result.ok:
            raise self.failure(f"{verb.lstrip('-')} the constraint", result)

    @staticmethod
    def failure(what: str, result: pcmk.ToolResult) -> FenceError:
        if result.no_cluster:
            return FenceError(f"cannot {what}: no cluster here (cibadmin {result.why()})")
        return FenceError(f"cannot {what}: cibadmin {result.why()}")


def fence(cib: Cib, resource: str, node: str, config: str | None, clone: str | None) -> str:
    current_cib = cib.query()
    if clone is None:
        if not config:
            raise FenceError("MIRRORD_CONFIG is not set and no --clone was given: "
                             "cannot tell which clone to constrain")
        clone = find_clone(current_cib, config)
    else:
        check_clone(current_cib, clone)
    cid = constraint_id(resource)
    want = wanted(resource, clone, node)
    have = parse_constraint(current_cib, cid)
    if have == want:
        return f"{cid}: already in place (Promoted only on {node})"
    role = promoted_role(_parse(current_cib).get("validate-with"))
    xml = constraint_xml(resource, clone, node, role)
    cib.write("--create" if have is None else "--replace", xml)
    got = cib.constraint(cid)
    if got != want:
        raise FenceError(f"{cid}: written, but the CIB shows {got}")
    return f"{cid}: placed: {clone} may be promoted only on {node}"


def unfence(cib: Cib, resource: str) -> str:
    cid = constraint_id(resource)
    if cib.constraint(cid) is None:
        return f"{cid}: not there (nothing to remove)"
    result = cib.run("--delete", "--scope", "constraints",
                     "--xml-text", f'<rsc_location id="{cid}"/>')
    if not result.ok and result.code != pcmk.CRM_EX_NOSUCH:
        raise Cib.failure("remove the constraint", result)
    if cib.constraint(cid) is not None:
        raise FenceError(f"{cid}: removed, but the CIB still has it")
    return f"{cid}: removed"


# -- command line ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise FenceError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mirrord-crm-fence",
                description="Place (fence) or remove (unfence) the Pacemaker constraint "
                            "that keeps a mirrord resource's peer from being promoted.",
                epilog="environment: MIRRORD_RESOURCE, MIRRORD_NODE, MIRRORD_PEER, "
                       "MIRRORD_CONFIG (set by mirrord).  exit codes: 0 done, 1 failed.")
    p.add_argument("action", choices=("fence", "unfence"))
    p.add_argument("--clone", metavar="ID",
                   help="the promotable clone's id (default: found by MIRRORD_CONFIG)")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=DEFAULT_TIMEOUT,
                   help=f"for each cibadmin call (default {DEFAULT_TIMEOUT:g})")
    return p


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    prog = "mirrord-crm-fence"
    try:
        args = parser().parse_args(argv)
        if not args.timeout > 0:
            raise FenceError("--timeout must be a positive number of seconds")
        resource = _required(env, "MIRRORD_RESOURCE")
        cib = Cib(args.timeout)
        if args.action == "fence":
            node = _required(env, "MIRRORD_NODE")
            message = fence(cib, resource, node, env.get("MIRRORD_CONFIG"), args.clone)
            peer = env.get("MIRRORD_PEER")
            if peer:
                message += f" (peer {peer} fenced)"
        else:
            message = unfence(cib, resource)
    except FenceError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{prog}: {message}")
    return EXIT_OK


def _required(env, name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise FenceError(f"{name} is not set (mirrord sets it when it runs this handler)")
    return value


if __name__ == "__main__":
    sys.exit(main())
