"""deploy/pacemaker: the CIB XML passes Pacemaker's own check, its timeouts are at least
the agent's advertised ones, and the pcs and crm forms say the same as the XML.

(tests/test_failover.py runs the XML form in a real cluster, tests/clustermirror.py; the pcs and crm forms
were checked with pcs 0.11.5 and crmsh 4.4.1 against a CIB file, see deploy/pacemaker/
README.md.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from ha.ocf_metadata import meta_data

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "deploy", "pacemaker")
CIB = """<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
<configuration><crm_config><cluster_property_set id="o"><nvpair id="o-s"
name="stonith-enabled" value="false"/></cluster_property_set></crm_config><nodes/>
<resources>{}</resources><constraints/></configuration><status/></cib>"""


def read(name: str) -> str:
    with open(os.path.join(DEPLOY, name)) as f:
        return f.read()


def xml_form() -> tuple[set, dict]:
    clone = ET.fromstring(read("r0-clone.xml"))
    ops = {(o.get("name"), o.get("interval"), o.get("timeout"), o.get("role"))
           for o in clone.iter("op")}
    meta = {nv.get("name"): nv.get("value") for nv in clone.iterfind("meta_attributes/nvpair")}
    return ops, meta


def text_form(text: str) -> tuple[set, dict]:
    # One line per command, single spaces: continuation lines and comments removed.
    text = re.sub(r"\\\n\s*", " ", re.sub(r"(?m)^\s*#.*$", "", text))
    text = re.sub(r"[ \t]+", " ", text)
    ops = set()
    for m in re.finditer(r"\bop (\w[\w-]*)((?: [\w-]+=\S+)+)", text):
        kv = dict(pair.split("=", 1) for pair in m.group(2).split())
        ops.add((m.group(1), kv.get("interval"), kv.get("timeout"), kv.get("role")))
    tail = re.search(r"(?:promotable|meta)((?: [\w-]+=\S+)+)\s*$", text.strip())
    meta = dict(pair.split("=", 1) for pair in tail.group(1).split()) if tail else {}
    meta.setdefault("promotable", "true")  # pcs: the `promotable` keyword itself
    return ops, meta


def seconds(value: str) -> float:
    return float(value.rstrip("s"))


def test_the_xml_is_a_valid_promotable_clone_of_our_agent(tmp_path):
    clone = ET.fromstring(read("r0-clone.xml"))
    (primitive,) = clone.iter("primitive")
    assert (primitive.get("class"), primitive.get("provider"), primitive.get("type")) == \
        ("ocf", "mirrord", "mirrord")
    _, meta = xml_form()
    assert meta == {"promotable": "true", "promoted-max": "1", "promoted-node-max": "1",
                    "clone-max": "2", "clone-node-max": "1", "notify": "true"}
    if shutil.which("crm_verify") is None:
        pytest.skip("crm_verify not installed (pacemaker-cli-utils)")
    path = tmp_path / "cib.xml"
    path.write_text(CIB.format(read("r0-clone.xml")))
    proc = subprocess.run(["crm_verify", "--xml-file", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_the_timeouts_are_at_least_the_agents():
    advertised = {}
    for action in ET.fromstring(meta_data()).iter("action"):
        key = (action.get("name"), action.get("role"))
        advertised[key] = seconds(action.get("timeout"))
    ops, _ = xml_form()
    names = {name for name, *_ in ops}
    assert names == {"start", "stop", "promote", "demote", "notify", "monitor"}
    for name, interval, timeout, role in ops:
        assert seconds(timeout) >= advertised[(name, role)], (name, role)
    monitors = {role: interval for name, interval, _, role in ops if name == "monitor"}
    assert set(monitors) == {"Promoted", "Unpromoted"}
    assert monitors["Promoted"] != monitors["Unpromoted"]


@pytest.mark.parametrize("name", ["pcs.sh", "crm.txt"])
def test_the_pcs_and_crm_forms_say_the_same(name):
    xml_ops, xml_meta = xml_form()
    ops, meta = text_form(read(name))
    assert ops == xml_ops
    assert meta == xml_meta
    assert "config=/etc/mirrord/r0.toml" in read(name)
