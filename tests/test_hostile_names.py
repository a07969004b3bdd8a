"""Issue 14: any byte sequence in a cgroup or process name. A cgroup named `bad\\xff.service`
made every scrape fail for as long as the consumer was kept, and the same name ended the
taskstats thread silently. Real cgroups, real processes, the real `carbond run`."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.cgroup_helpers import TestTree
from tests.helpers import carbond_run, select, total
from tests.powercap import ConstantPower

CONSUMER = "carbond_consumer_energy_joules_total"


def test_non_utf8_cgroup_and_process_names_are_stable_visible_labels(tree: TestTree,
                                                                      tmp_path) -> None:
    bad = os.fsencode(tree.root) + b"/bad\xff.service"
    os.mkdir(bad)
    tree.burners.start(0.3, os.fsdecode(bad + b"/cgroup.procs"))
    program = os.fsencode(tmp_path) + b"/t\xfe\xfftrue"
    shutil.copy("/bin/true", program)
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(
        "--powercap-root", str(tmp_path / "powercap"), "--cgroup-root", tree.base,
        "--interval", "1s",
    ) as daemon:
        first = daemon.wait_ticks(2)  # every scrape parses (wait_ticks uses the text parser)
        for _ in range(20):  # exits with a non-UTF-8 comm, in the root cgroup
            subprocess.run([program], check=True)
        last = daemon.wait_ticks(3)
        assert daemon.process.poll() is None
    name = "bad\\xff.service"  # a systemd unit by its name, the bad byte visible
    assert select(last, CONSUMER, consumer=name, kind="unit", component="cpu")
    assert total(last, CONSUMER, consumer=name) > total(first, CONSUMER, consumer=name) > 0
    assert not any("\ufffd" in labels for key in last for labels in dict(key[1]).values())
    assert total(last, "carbond_exited_tasks_total") >= total(
        first, "carbond_exited_tasks_total") + 20
    log = daemon.process.stderr.read()
    assert "taskstats stopped" not in log and "Traceback" not in log
