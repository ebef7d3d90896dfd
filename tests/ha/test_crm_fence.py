"""ha/crm_fence.py without a cluster: the constraint's XML (checked against Pacemaker's
own schema with crm_verify), finding the clone in a CIB, reading our constraint back,
and the command's failures on a box that runs no cluster (the real cibadmin).

tests/test_crm_fence_cluster.py runs fence/unfence against a real cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from ha.crm_fence import (
    Constraint, FenceError, check_clone, constraint_id, constraint_xml, find_clone,
    parse_constraint, promoted_role, wanted,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def primitive(rid: str, config: str | None, provider: str = "mirrord",
              agent: str = "mirrord") -> str:
    attrs = (f'<instance_attributes id="{rid}-ia"><nvpair id="{rid}-config" name="config" '
             f'value="{config}"/></instance_attributes>') if config is not None else ""
    return (f'<primitive id="{rid}" class="ocf" provider="{provider}" type="{agent}">'
            f'{attrs}</primitive>')


def clone(cid: str, inner: str, promotable: str = "true") -> str:
    return (f'<clone id="{cid}"><meta_attributes id="{cid}-meta"><nvpair id="{cid}-p" '
            f'name="promotable" value="{promotable}"/></meta_attributes>{inner}</clone>')


def cib(resources: str = "", constraints: str = "", schema: str = "pacemaker-3.9") -> str:
    return (f'<cib crm_feature_set="3.16.2" validate-with="{schema}" epoch="1" '
            f'num_updates="0" admin_epoch="0"><configuration><crm_config>'
            f'<cluster_property_set id="opts"><nvpair id="opts-stonith" '
            f'name="stonith-enabled" value="false"/></cluster_property_set></crm_config>'
            f'<nodes/><resources>{resources}</resources><constraints>{constraints}'
            f'</constraints></configuration><status/></cib>')


R0 = clone("r0-clone", primitive("r0", "/etc/mirrord/r0.toml"))
R1 = clone("r1-clone", primitive("r1", "/etc/mirrord/r1.toml"))


# -- the constraint --------------------------------------------------------------------

def test_the_constraint_forbids_promoted_off_this_node():
    xml = constraint_xml("r0", "r0-clone", "alpha")
    location = ET.fromstring(xml)
    assert location.tag == "rsc_location"
    assert location.attrib == {"id": "mirrord-fence-r0", "rsc": "r0-clone"}
    (rule,) = location
    assert rule.attrib == {"id": "mirrord-fence-r0-rule", "role": "Promoted",
                           "score": "-INFINITY"}
    (expression,) = rule
    assert expression.attrib == {"id": "mirrord-fence-r0-expression", "attribute": "#uname",
                                 "operation": "ne", "value": "alpha"}
    assert parse_constraint(xml, "mirrord-fence-r0") == wanted("r0", "r0-clone", "alpha") \
        == Constraint("mirrord-fence-r0", "r0-clone", "Promoted", "-INFINITY", "alpha")


def test_names_with_xml_specials_are_escaped():
    xml = constraint_xml("r0", "r0-clone", 'a"b<c&d')
    assert parse_constraint(xml, "mirrord-fence-r0").node == 'a"b<c&d'


@pytest.mark.skipif(shutil.which("crm_verify") is None,
                    reason="crm_verify not installed (pacemaker-cli-utils)")
@pytest.mark.parametrize("schema", ["pacemaker-3.9", "pacemaker-3.7", "pacemaker-3.0",
                                    "pacemaker-2.10"])
def test_pacemakers_schema_accepts_the_constraint(tmp_path, schema):
    role = promoted_role(schema)
    path = tmp_path / "cib.xml"
    path.write_text(cib(R0, constraint_xml("r0", "r0-clone", "alpha", role), schema))
    proc = subprocess.run(["crm_verify", "--xml-file", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    # The check can fail: a constraint on a clone that does not exist is refused.
    path.write_text(cib(R0, constraint_xml("r0", "nope", "alpha", role), schema))
    proc = subprocess.run(["crm_verify", "--xml-file", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and "nope" in proc.stderr


@pytest.mark.parametrize("schema, role", [
    ("pacemaker-3.9", "Promoted"), ("pacemaker-3.7", "Promoted"), ("pacemaker-4.0", "Promoted"),
    ("pacemaker-next", "Promoted"), ("pacemaker-3.6", "Master"), ("pacemaker-2.10", "Master"),
    ("pacemaker-1.2", "Master"), ("", "Master"), (None, "Master"), ("bogus", "Master"),
])
def test_the_role_name_follows_the_cibs_schema(schema, role):
    assert promoted_role(schema) == role


def test_a_legacy_master_constraint_reads_as_promoted():
    xml = constraint_xml("r0", "r0-clone", "alpha", role="Master")
    assert parse_constraint(xml, "mirrord-fence-r0") == wanted("r0", "r0-clone", "alpha")


def test_reading_the_constraint_back_from_a_cib():
    ours = constraint_xml("r0", "r0-clone", "alpha")
    other = ('<rsc_location id="someone-else" rsc="r0-clone" node="beta" score="100"/>')
    assert parse_constraint(cib(R0, other + ours), "mirrord-fence-r0").node == "alpha"
    assert parse_constraint(cib(R0, other), "mirrord-fence-r0") is None
    # cibadmin --query --xpath prints the element alone.
    assert parse_constraint(ours, "mirrord-fence-r0").rsc == "r0-clone"


def test_a_foreign_constraint_with_our_id_is_not_taken_for_ours():
    theirs = '<rsc_location id="mirrord-fence-r0" rsc="r0-clone" node="beta" score="100"/>'
    with pytest.raises(FenceError, match="not mirrord's fence"):
        parse_constraint(cib(R0, theirs), "mirrord-fence-r0")


def test_unparsable_xml_is_a_fence_error():
    with pytest.raises(FenceError, match="cannot parse the CIB"):
        parse_constraint("<cib><configuration>", "mirrord-fence-r0")


def test_constraint_id():
    assert constraint_id("r0") == "mirrord-fence-r0"


# -- finding the clone --------------------------------------------------------------------

def test_find_the_clone_by_config_path():
    doc = cib(R1 + R0 + primitive("loose", "/etc/mirrord/r0.toml"))  # not in a clone
    assert find_clone(doc, "/etc/mirrord/r0.toml") == "r0-clone"
    assert find_clone(doc, "/etc/mirrord/./r1.toml") == "r1-clone"  # normalised paths


def test_find_the_clone_inside_a_group():
    doc = cib(clone("g-clone", f'<group id="g">{primitive("r0", "/etc/mirrord/r0.toml")}'
                               f'</group>'))
    assert find_clone(doc, "/etc/mirrord/r0.toml") == "g-clone"


@pytest.mark.parametrize("resources", [
    "",
    clone("c", primitive("x", "/etc/mirrord/r0.toml", provider="pacemaker",
                         agent="Stateful")),
    clone("c", primitive("x", None)),
    clone("c", primitive("x", "/etc/mirrord/r9.toml")),
])
def test_no_matching_clone(resources):
    with pytest.raises(FenceError, match="no clone in the CIB runs ocf:mirrord:mirrord "
                                         "with config=/etc/mirrord/r0.toml"):
        find_clone(cib(resources), "/etc/mirrord/r0.toml")


def test_two_clones_with_the_same_config_are_ambiguous():
    twin = clone("twin", primitive("r0b", "/etc/mirrord/r0.toml"))
    with pytest.raises(FenceError, match="several clones run config=/etc/mirrord/r0.toml: "
                                         "r0-clone, twin"):
        find_clone(cib(R0 + twin), "/etc/mirrord/r0.toml")


def test_a_named_clone_must_exist_and_be_promotable():
    check_clone(cib(R0), "r0-clone")
    with pytest.raises(FenceError, match="no clone with id gone"):
        check_clone(cib(R0), "gone")
    plain = clone("plain", primitive("p", "/x.toml"), promotable="false")
    with pytest.raises(FenceError, match="clone plain is not promotable"):
        check_clone(cib(plain), "plain")


# -- the command, on a box without a cluster (the real cibadmin) -------------------------

def run_handler(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORD_")}
    proc = subprocess.run([sys.executable, "-m", "ha.crm_fence", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env=dict(base, PYTHONPATH=REPO, **(env or {})))
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_missing_environment_fails_with_a_reason():
    proc = run_handler("fence")
    assert proc.returncode == 1
    assert proc.stderr == ("mirrord-crm-fence: MIRRORD_RESOURCE is not set (mirrord sets it "
                           "when it runs this handler)\n")
    proc = run_handler("fence", env={"MIRRORD_RESOURCE": "r0"})
    assert proc.returncode == 1 and "MIRRORD_NODE is not set" in proc.stderr


def test_bad_usage_fails_with_one_line():
    proc = run_handler("outdate")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "invalid choice: 'outdate'" in proc.stderr
    proc = run_handler("fence", "--timeout", "0", env={"MIRRORD_RESOURCE": "r0"})
    assert proc.returncode == 1 and "--timeout must be a positive" in proc.stderr


@pytest.mark.skipif(shutil.which("cibadmin", path=os.environ.get("PATH", "") + ":/usr/sbin")
                    is None, reason="cibadmin not installed (pacemaker-cli-utils)")
def test_no_cluster_is_a_failure_with_its_reason():
    if subprocess.run(["cibadmin", "--query", "--scope", "nodes"], capture_output=True,
                      timeout=30).returncode == 0:
        pytest.skip("this box runs a cluster: the no-cluster case cannot be shown here")
    env = {"MIRRORD_RESOURCE": "r0", "MIRRORD_NODE": "alpha", "MIRRORD_PEER": "beta",
           "MIRRORD_CONFIG": "/etc/mirrord/r0.toml"}
    for action in ("fence", "unfence"):
        proc = run_handler(action, env=env)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.startswith("mirrord-crm-fence: cannot read the CIB: no cluster "
                                      "here (cibadmin exit status 102: "), proc.stderr
