"""Slurm job metadata: `scontrol show job --json ID`, once per job.

Security: carbond runs privileged and this is the one place it starts a program. The program is
fixed when carbond starts (the configured absolute path, or `scontrol` found on carbond's own
PATH at start, looked up again only by a reload that changes `metadata`), must be a regular
executable file that only root (or carbond's own user) can change, in a directory only they can
change; the argument vector is fixed and the job ID, which comes from a cgroup path anyone who
can create cgroups could name, must be digits only. No shell, a minimal environment (PATH,
LC_ALL, and SLURM_CONF if carbond has it), no standard input, stdout read up to a limit and the
whole process group killed at the deadline, so a hung or chatty `scontrol` costs one worker
thread its deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Collection, Mapping

from carbond.workloads.identity.errors import SourceError
from carbond.workloads.identity.metadata import Metadata

MAX_ANSWER_BYTES = 4 * 1024 * 1024
JOB_ID = re.compile(r"^[0-9]{1,10}$")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_JOBS_PER_ROUND = 32  # a burst of new jobs is looked up over several rounds

Table = dict[tuple[str, str], Metadata]


def find_scontrol(configured: str | None, path_env: str | None = None) -> str | None:
    """The scontrol to run: `configured` (absolute) if given, else the first on PATH (the
    daemon's, as started); None when there is none. ValueError when the file is not one
    carbond may run (see the module docstring)."""
    found = configured if configured else shutil.which(
        "scontrol", path=path_env if path_env is not None else os.environ.get("PATH", SAFE_PATH))
    if found is None:
        return None
    found = os.path.realpath(found)
    check_program(found)
    return found


def check_program(path: str) -> None:
    """ValueError unless `path` is a regular executable that only root or this user can
    replace (file and directory)."""
    trusted = {0, os.geteuid()}
    try:
        info = os.stat(path)
        folder = os.stat(os.path.dirname(path) or "/")
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode) or not os.access(path, os.X_OK):
        raise ValueError(f"{path} is not an executable file")
    for what, item in (("file", info), ("directory", folder)):
        if item.st_uid not in trusted:
            raise ValueError(f"{path}: its {what} belongs to uid {item.st_uid}, not root")
        writable = item.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not (what == "directory" and item.st_mode & stat.S_ISVTX
                             and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            raise ValueError(f"{path}: its {what} is writable by others")


class SlurmSource:
    """Per-job lookups; `scontrol` None means Slurm is not on this host (every lookup an
    error, counted, should a `slurm/ID` consumer appear)."""

    name = "slurm"
    per_id = True

    def __init__(self, scontrol: str | None, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.scontrol = scontrol
        self.max_answer_bytes = max_answer_bytes
        environment = {"PATH": SAFE_PATH, "LC_ALL": "C"}
        if "SLURM_CONF" in os.environ:
            environment["SLURM_CONF"] = os.environ["SLURM_CONF"]
        self._environment = environment

    def fetch(self, wanted: Collection[tuple[str, str]], timeout_seconds: float) -> Table:
        """Each wanted ("slurm", ID) that scontrol knows; a job it does not know is absent.
        One call per job, all within `timeout_seconds`."""
        deadline = time.monotonic() + timeout_seconds
        table: Table = {}
        for space, job_id in sorted(wanted)[:MAX_JOBS_PER_ROUND]:
            if space != "slurm":
                continue
            found = self.job(job_id, max(0.0, deadline - time.monotonic()))
            if found is not None:
                table[("slurm", job_id)] = found
        return table

    def job(self, job_id: str, timeout_seconds: float) -> Metadata | None:
        if not JOB_ID.match(job_id):
            raise SourceError("job ID is not a number")
        if self.scontrol is None:
            raise SourceError("no scontrol on this host")
        output = self._run([self.scontrol, "show", "job", "--json", job_id], timeout_seconds)
        return parse_job(output, job_id)

    def _run(self, argv: list[str], timeout_seconds: float) -> bytes:
        deadline = time.monotonic() + timeout_seconds
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, env=self._environment,
                                       start_new_session=True, close_fds=True)
        except OSError as exc:
            raise SourceError(f"cannot run scontrol: {exc.strerror}") from None
        assert process.stdout is not None
        output = bytearray()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SourceError(f"scontrol did not finish within {timeout_seconds:g}s")
                ready, _, _ = select.select([process.stdout], [], [], remaining)
                if not ready:
                    continue
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
                if len(output) > self.max_answer_bytes:
                    raise SourceError(f"scontrol wrote more than {self.max_answer_bytes} bytes")
            status = process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise SourceError(f"scontrol did not exit within {timeout_seconds:g}s") from None
        finally:
            _end(process)
        if status != 0:
            # Also a job scontrol no longer knows (purged after MinJobAge): the resolver
            # gives up on an ID after a few failed tries.
            raise SourceError(f"scontrol exited with status {status}")
        return bytes(output)


def _end(process: subprocess.Popen[bytes]) -> None:
    """Kill what is left of the process group (a grandchild may still hold the pipe) and
    reap the child."""
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


def parse_job(output: bytes, job_id: str) -> Metadata | None:
    """The job's metadata from Slurm's JSON (`jobs[].job_id`, `user_name`, `account`,
    `partition`, `name`); None when the job is not in it (unknown to scontrol); SourceError
    when the output is not that JSON."""
    if not output:
        return None
    try:
        answer = json.loads(output)
    except (ValueError, RecursionError):
        raise SourceError("scontrol output is not JSON") from None
    jobs = answer.get("jobs") if isinstance(answer, Mapping) else None
    if not isinstance(jobs, list):
        raise SourceError("scontrol output has no jobs list")
    for job in jobs:
        if isinstance(job, Mapping) and _number(job.get("job_id")) == job_id:
            return Metadata(user=_text(job.get("user_name")), account=_text(job.get("account")),
                            partition=_text(job.get("partition")), job_name=_text(job.get("name")))
    return None


def _number(value: object) -> str | None:
    """Slurm writes numbers plain or, since 23.02 for some fields, as {"set", "number"}."""
    if isinstance(value, Mapping):
        value = value.get("number") if value.get("set", True) else None
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return str(value)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
