"""Slurm jobs: real cgroups in both Slurm layouts stay `slurm/ID`; their user, account,
partition and job name come from a stand-in `scontrol` (the JSON of `scontrol show job
--json`), looked up once per job, with a fixed argument vector; and every way scontrol can
misbehave (missing, failing, hanging, garbage, huge, a child holding the pipe) is an error
that leaves the ID name."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from carbond.types import Consumer
from carbond.workloads.cgroups import CgroupReader, cgroup_root
from carbond.workloads.identity.errors import SourceError
from carbond.workloads.identity.resolver import MetadataResolver
from carbond.workloads.identity.slurm import SlurmSource, check_program, find_scontrol, parse_job
from carbond.workloads.naming import CgroupNamer
from tests.cgroup_helpers import TestTree

JOBS = {
    "4242": {"job_id": 4242, "user_name": "alice", "user_id": 1000, "account": "physics",
             "partition": "gpu", "name": "train-resnet", "job_state": ["RUNNING"],
             "nodes": "node17", "array_job_id": {"set": True, "infinite": False, "number": 0}},
    "7": {"job_id": {"set": True, "infinite": False, "number": 7}, "user_name": "bob",
          "account": "chemistry", "partition": "cpu", "name": "md\u00e9", "job_state": "RUNNING"},
}

STAND_IN = '''#!{python}
import json, os, sys, time
jobs = {jobs!r}
mode = {mode!r}
with open({log!r}, "a") as log:
    log.write(json.dumps(sys.argv[1:] + [sorted(os.environ)]) + "\\n")
if sys.argv[1:4] != ["show", "job", "--json"] or len(sys.argv) != 5:
    sys.exit(2)
if mode == "hang":
    time.sleep(600)
if mode == "garbage":
    sys.stdout.write("JobId=4242 JobName=train UserId=alice(1000)\\n"); sys.exit(0)
if mode == "huge":
    while True:
        sys.stdout.write("x" * 65536)
if mode == "child-holds-pipe":
    if os.fork() == 0:
        time.sleep(600)
    sys.exit(0)
job = jobs.get(sys.argv[4])
if job is None:
    sys.stderr.write("slurm_load_jobs error: Invalid job id specified\\n")
    sys.exit(1)
json.dump({{"meta": {{"plugin": {{"type": "openapi/v0.0.39"}}}}, "errors": [], "warnings": [],
           "jobs": [job]}}, sys.stdout)
'''


def stand_in(directory: Path, mode: str = "answer") -> tuple[str, Path]:
    directory.mkdir(exist_ok=True)
    os.chmod(directory, 0o755)
    log = directory / "calls.log"
    path = directory / "scontrol"
    path.write_text(STAND_IN.format(python="/usr/bin/python3", jobs=JOBS, mode=mode,
                                    log=str(log)))
    os.chmod(path, 0o755)
    return str(path), log


def test_job_metadata_from_the_documented_json(tmp_path):
    path, log = stand_in(tmp_path / "bin")
    source = SlurmSource(path)
    assert source.fetch([("slurm", "4242")], 5.0) == {("slurm", "4242"): source.job("4242", 5)}
    found = source.job("4242", 5.0)
    assert (found.user, found.account, found.partition, found.job_name) == (
        "alice", "physics", "gpu", "train-resnet")
    assert source.job("7", 5.0).job_name == "md\u00e9"  # job_id as {"set", "number"}
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0][:4] == ["show", "job", "--json", "4242"]
    assert set(calls[0][4]) <= {"PATH", "LC_ALL", "SLURM_CONF", "PWD", "SHLVL", "_"}


@pytest.mark.parametrize("bad", ["42; rm -rf /", "$(id)", "-1", "4242 --help", "", "1" * 11])
def test_job_ids_are_digits_only(tmp_path, bad):
    path, log = stand_in(tmp_path / "bin")
    with pytest.raises(SourceError):
        SlurmSource(path).job(bad, 5.0)
    assert not log.exists()  # never run


@pytest.mark.parametrize("mode", ["hang", "garbage", "huge", "child-holds-pipe"])
def test_misbehaving_scontrol_is_an_error(tmp_path, mode):
    path, _ = stand_in(tmp_path / "bin", mode)
    with pytest.raises(SourceError):
        SlurmSource(path, max_answer_bytes=1 << 20).job("4242", 1.0)


def test_unknown_job_and_no_scontrol(tmp_path):
    path, _ = stand_in(tmp_path / "bin")
    with pytest.raises(SourceError, match="status 1"):
        SlurmSource(path).job("999", 5.0)
    with pytest.raises(SourceError, match="no scontrol"):
        SlurmSource(None).job("4242", 5.0)
    assert parse_job(b'{"jobs": []}', "4242") is None


def test_scontrol_is_found_once_and_must_be_trusted(tmp_path):
    path, _ = stand_in(tmp_path / "bin")
    assert find_scontrol(None, path_env=str(tmp_path / "bin")) == os.path.realpath(path)
    assert find_scontrol(None, path_env=str(tmp_path / "nowhere")) is None
    os.chmod(path, 0o777)  # anyone could replace what carbond runs as root
    with pytest.raises(ValueError, match="writable by others"):
        check_program(path)
    os.chmod(path, 0o755)
    os.chmod(tmp_path / "bin", 0o777)
    with pytest.raises(ValueError, match="writable by others"):
        check_program(path)
    os.chmod(tmp_path / "bin", 0o755)
    os.chown(path, 65534, 65534)
    with pytest.raises(ValueError, match="belongs to uid 65534"):
        check_program(path)
    with pytest.raises(ValueError):
        check_program(str(tmp_path / "bin"))  # not a file


LAYOUTS = {
    "v1": "slurm/uid_1000/job_4242/step_0",
    "v2": "system.slice/slurmstepd.scope/job_4242/step_0/user/task_0",
}


def test_real_cgroups_of_both_layouts_are_slurm_jobs_with_metadata(tree: TestTree, tmp_path):
    """A burner in a real step cgroup of this hierarchy's Slurm layout: the reader charges its
    CPU time to `slurm/4242`, and the resolver adds the job's owner from scontrol, once."""
    rel = LAYOUTS[tree.hierarchy]
    tree.make(rel)
    reader = CgroupReader(cgroup_root(tree.root), CgroupNamer())
    path, log = stand_in(tmp_path / "bin")
    resolver = MetadataResolver([SlurmSource(path)])
    resolver.start()
    try:
        reader.tick()
        tree.burners.start(1.0, tree.procs(rel))
        time.sleep(0.5)
        usage = reader.tick().usage
        job = Consumer("job", "slurm/4242")
        assert usage[job] > 0.05
        deadline = time.monotonic() + 10
        while not resolver.lookup(job).metadata.account and time.monotonic() < deadline:
            time.sleep(0.02)
        identity = resolver.lookup(job)
        for _ in range(20):
            resolver.lookup(job)
    finally:
        resolver.stop()
        reader.close()
    assert identity.consumer == job  # Slurm keeps slurm/ID
    assert identity.metadata.labels() == {"user": "alice", "account": "physics",
                                          "partition": "gpu", "job_name": "train-resnet"}
    assert len(log.read_text().splitlines()) == 1  # once per job


def test_failing_scontrol_is_retried_a_few_times_then_left(tmp_path):
    path, log = stand_in(tmp_path / "bin")
    resolver = MetadataResolver([SlurmSource(path)], relist_seconds=0.05)
    resolver.start()
    try:
        job = Consumer("job", "slurm/999")  # scontrol exits 1: unknown or unreachable
        resolver.lookup(job)
        deadline = time.monotonic() + 20
        while resolver.errors()["slurm"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        resolver.stop()
    assert resolver.errors()["slurm"] == 5  # MAX_ATTEMPTS, then the ID name stands
    assert len(log.read_text().splitlines()) == 5
    assert resolver.lookup(job).consumer == job
