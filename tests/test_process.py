"""Process-wide settings (mirrord/process.py), each in a fresh interpreter: they change
the whole process, and the test suite's own must stay as they are."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from mirrord.process import name_os_thread

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import gc, json
from mirrord.process import tune_collector, YOUNG_GENERATION
before = gc.get_threshold()
tune_collector()
print(json.dumps({"before": before, "after": gc.get_threshold(),
                  "frozen": gc.get_freeze_count(), "young": YOUNG_GENERATION}))
"""


def run_probe(**env) -> dict:
    import json

    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            cwd=REPO, timeout=30, check=True,
                            env=dict(os.environ, PYTHONPATH=REPO, **env))
    return json.loads(result.stdout)


def test_tune_collector_freezes_startup_objects_and_widens_the_young_generation():
    out = run_probe()
    assert out["before"][0] == 700  # Python's default: the probe starts from it
    assert out["after"][0] == out["young"] > out["before"][0]
    assert out["frozen"] > 1000  # the modules imported at startup, out of every pass


def test_tune_collector_can_be_left_at_pythons_defaults_for_ab_runs():
    out = run_probe(MIRRORD_GC="default")
    assert out["after"] == out["before"]
    assert out["frozen"] == 0


def test_name_os_thread_sets_the_kernel_name_of_the_calling_thread_only():
    seen = {}

    def body():
        name_os_thread("mirrord-test-thread-long-name")
        with open("/proc/thread-self/comm") as f:
            seen["comm"] = f.read().strip()

    def unnamed():
        name_os_thread()  # its Python name
        with open("/proc/thread-self/comm") as f:
            seen["default"] = f.read().strip()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(10)
    assert seen["comm"] == "mirrord-test-th"  # the kernel keeps 15 bytes
    with open("/proc/thread-self/comm") as f:
        assert f.read().strip() != "mirrord-test-th"
    thread = threading.Thread(target=unnamed, name="applier")
    thread.start()
    thread.join(10)
    assert seen["default"] == "applier"
