"""Cgroup path -> Consumer, exactly as DESIGN.md's consumer table names them.

Paths are relative to the cgroup root, without a leading slash (``""`` is the root itself), the
way `/proc/PID/cgroup` shows them minus the first ``/``. User rules from ``attribution.rules`` are
tried first; then the built-in rules, most specific first: a container beats the pod it runs in,
a pod or Slurm job beats the unit or slice around it, a user slice beats the units inside it.
A `carbond exec` run (``…/carbond.exec/<encoded project>/<run>``) beats everything around it.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from carbond.types import ConfigError, Consumer, name_text, shown

ROOT_CONSUMER = Consumer("cgroup", "/")
"""The root cgroup's own time that no process claims (kernel threads, irq, untracked tasks)."""

RULE_KINDS = frozenset(
    {"unit", "container", "pod", "job", "vm", "user", "project", "process", "cgroup"})

_HEX64 = r"[0-9a-f]{64}"
_CONTAINER_SCOPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"^docker-(?P<id>{_HEX64})\.scope$"), "docker"),
    (re.compile(rf"^cri-containerd-(?P<id>{_HEX64})\.scope$"), "containerd"),
    (re.compile(rf"^crio-(?:conmon-)?(?P<id>{_HEX64})\.scope$"), "crio"),
    (re.compile(rf"^libpod-(?:conmon-)?(?P<id>{_HEX64})(?:\.scope)?$"), "podman"),
)
_BARE_ID = re.compile(rf"^{_HEX64}$")
_POD = re.compile(
    r"^(?:kubepods(?:-[a-z]+)*-)?pod"
    r"(?P<uid>[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
    r"|[0-9a-f]{32})(?:\.slice)?$"
)
_SLURM_PARENT = re.compile(r"^(?:slurm(?:_.+)?|(?:.+_)?slurmstepd\.scope)$")
_SLURM_JOB = re.compile(r"^job_(?P<id>\d+)$")
# libvirt: machine-qemu\x2d<N>\x2d<NAME>.scope (systemd-escaped "qemu-N-NAME"), also the older
# machine-qemu\x2d<NAME>.scope; Proxmox: qemu.slice/<VMID>.scope.
_LIBVIRT_SCOPE = re.compile(r"^machine-qemu\\x2d(?P<name>.+)\.scope$")
_LIBVIRT_NUMBERED = re.compile(r"^[0-9]+-(?P<name>.+)$")
_PROXMOX_SCOPE = re.compile(r"^(?P<id>[0-9]+)\.scope$")
_SYSTEMD_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")
_USER_SLICE = re.compile(r"^user-(?P<uid>\d+)\.slice$")
_UNIT = re.compile(r"^.+\.(?:service|scope)$")
_TEMPLATE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_RULE_PATH_CHARS = 4096
"""PATH_MAX: the kernel shows no longer cgroup path in /proc/PID/cgroup. Beyond it user rules
are skipped (and counted) and the built-in rules, which look at one component at a time, name
the path: what one tick spends on naming stays bounded whatever the tree holds."""

EXEC_PARENT = "carbond.exec"
"""The directory `carbond exec` makes its run cgroups in: EXEC_PARENT/<project>/<run>."""
PROJECT_DIR_MAX_BYTES = 255  # NAME_MAX: one path component
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def encode_project(name: str) -> str:
    """A project name as one cgroup directory name: every byte outside [A-Za-z0-9_.-], and a
    leading '.', percent-encoded, so no name can make a path component, '.', '..', a newline
    (which would break /proc/PID/cgroup) or a non-ASCII byte. ValueError if empty or longer
    than one path component allows."""
    raw = os.fsencode(name)
    if not raw:
        raise ValueError("must not be empty")
    text = "".join(
        chr(byte) if byte in _SAFE_BYTES and not (index == 0 and byte == ord(".")) else
        f"%{byte:02X}"
        for index, byte in enumerate(raw)
    )
    if len(text) > PROJECT_DIR_MAX_BYTES:
        raise ValueError(f"too long: {len(text)} bytes once encoded, at most "
                         f"{PROJECT_DIR_MAX_BYTES}")
    return text


def decode_project(directory: str) -> str:
    """`encode_project` reversed; total: anything else (made by hand) decodes to itself, and
    bytes that are not UTF-8 come back as os.fsdecode gives them."""
    raw = _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), os.fsencode(directory))
    return os.fsdecode(raw)


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # the ConfigError says what is wrong, once, on one line
    return options


def compile_match(text: str, key: str) -> Any:
    """A rule's pattern compiled by RE2, which matches in time linear in the path whatever the
    pattern: with a backtracking engine `(a+)+$` and one cgroup name froze the daemon. What
    RE2 cannot match that way (backreferences, lookaround, `\\Z`, huge repetitions) is refused
    here, at load, rather than degraded at run time."""
    try:
        return re2.compile(text, options=_re2_options())
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        why = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        raise ConfigError(key, f"{shown(text)} is not a regular expression RE2 accepts (rules "
                          f"are matched in linear time; no backreferences or lookaround): "
                          f"{shown(why, 200)}") from None


@dataclass(frozen=True)
class Rule:
    """One compiled `attribution.rules` entry; `name` may only use the regex's named groups.
    Rules compare by their text (a reload with the same rules keeps the namer's cache)."""

    match: str
    kind: str
    name: str
    pattern: Any = dataclasses.field(compare=False, repr=False)  # RE2, compiled from `match`

    def apply(self, path: str) -> Consumer | None:
        found = self.pattern.search(path)
        if found is None:
            return None
        groups = found.groupdict()
        # Safe substitution: only `{group}` tokens, values are plain strings, never evaluated.
        name = _TEMPLATE_FIELD.sub(lambda m: groups.get(m.group(1)) or "", self.name)
        return Consumer(self.kind, name) if name else None


def compile_rules(raw: object, key: str = "attribution.rules") -> tuple[Rule, ...]:
    """Validate and compile user rules once, at config load; bad input is a ConfigError."""
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise ConfigError(key, "must be a list of {match, kind, name}")
    rules = []
    for index, entry in enumerate(raw):
        where = f"{key}[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(where, "must be a mapping with match, kind and name")
        unknown = set(entry) - {"match", "kind", "name"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key")
        for field in ("match", "kind", "name"):
            if not isinstance(entry.get(field), str) or not entry[field]:
                raise ConfigError(f"{where}.{field}", "required, a non-empty string")
        pattern = compile_match(entry["match"], f"{where}.match")
        if entry["kind"] not in RULE_KINDS:
            raise ConfigError(f"{where}.kind", f"must be one of {', '.join(sorted(RULE_KINDS))}")
        for field in _TEMPLATE_FIELD.findall(entry["name"]):
            if field not in pattern.groupindex:
                raise ConfigError(f"{where}.name", f"{{{field}}} is not a named group of match")
        rules.append(Rule(entry["match"], entry["kind"], entry["name"], pattern))
    return tuple(rules)


def user_name(uid: int) -> str:
    """Password-database name for a UID, else the UID itself."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def _container(parts: list[str]) -> Consumer | None:
    # The deepest container component wins (a container's own sub-cgroups stay the container).
    for index in range(len(parts) - 1, -1, -1):
        part = parts[index]
        for pattern, runtime in _CONTAINER_SCOPES:
            found = pattern.match(part)
            if found:
                return Consumer("container", f"{runtime}/{found['id'][:12]}")
        if _BARE_ID.match(part) and index > 0:
            parent = parts[index - 1]
            if parent == "docker":
                return Consumer("container", f"docker/{part[:12]}")
            if _POD.match(parent) and any(p.startswith("kubepods") for p in parts[:index]):
                # cgroupfs driver: the runtime isn't in the path; containerd is the k8s default.
                return Consumer("container", f"containerd/{part[:12]}")
    return None


def systemd_unescape(text: str) -> str:
    """`systemd-escape --unescape`: each `\\xNN` is the byte NN (bytes that are not UTF-8 stay
    visible as `\\xNN`, as `name_text` writes them)."""
    raw = _SYSTEMD_ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), os.fsencode(text))
    return name_text(raw)


def _vm(parts: list[str]) -> Consumer | None:
    """A libvirt/QEMU domain (its name) or a Proxmox VM (its ID), at any depth below."""
    for index, part in enumerate(parts):
        found = _LIBVIRT_SCOPE.match(part)
        if found and index > 0 and parts[index - 1] == "machine.slice":
            name = systemd_unescape(found["name"])
            numbered = _LIBVIRT_NUMBERED.match(name)
            name = numbered["name"] if numbered else name
            return Consumer("vm", name) if name else None
        found = _PROXMOX_SCOPE.match(part)
        if found and index > 0 and parts[index - 1] == "qemu.slice":
            return Consumer("vm", found["id"])
    return None


def project_name(parts: list[str]) -> str | None:
    """The project of the deepest `carbond exec` run in a path, EXEC_PARENT/<project>[/<run>…]
    (None outside one). Under a user's slice (`user.slice/user-UID.slice/…`, UID not 0) the
    project is that user's, `USER/PROJECT`, whoever named the directory: a user who may write
    their delegated sub-tree cannot add to another user's project, nor to root's."""
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == EXEC_PARENT:
            name = decode_project(parts[index + 1])
            if not name:
                return None
            found = _USER_SLICE.match(parts[1]) if len(parts) > 2 and parts[0] == "user.slice" \
                else None
            if found and int(found["uid"]) != 0:
                owner = user_name(int(found["uid"])) + "/"
                if not name.startswith(owner):
                    name = owner + name
            return name
    return None


def _project(parts: list[str]) -> Consumer | None:
    name = project_name(parts)
    return Consumer("project", name) if name else None


def _builtin(parts: list[str]) -> Consumer:
    project = _project(parts)
    if project is not None:
        return project
    container = _container(parts)
    if container is not None:
        return container
    vm = _vm(parts)
    if vm is not None:
        return vm
    if any(p.startswith("kubepods") for p in parts):
        for part in reversed(parts):
            found = _POD.match(part)
            if found:
                return Consumer("pod", "pod/" + found["uid"].replace("_", "-"))
    for index in range(len(parts) - 1, 0, -1):
        found = _SLURM_JOB.match(parts[index])
        if found and any(_SLURM_PARENT.match(p) for p in parts[:index]):
            return Consumer("job", f"slurm/{found['id']}")
    if len(parts) >= 2 and parts[0] == "user.slice":
        found = _USER_SLICE.match(parts[1])
        if found:
            return Consumer("user", user_name(int(found["uid"])))
    for part in reversed(parts):
        if _UNIT.match(part):
            return Consumer("unit", part)
    return Consumer("cgroup", "/".join(parts))


def consumer_for_cgroup(path: str, rules: Iterable[Rule] = ()) -> Consumer:
    """The consumer a cgroup's own CPU time belongs to: user rules first, then built-ins.
    A path longer than MAX_RULE_PATH_CHARS is named by the built-ins alone."""
    path = path.strip("/")
    if len(path) <= MAX_RULE_PATH_CHARS:
        for rule in rules:
            consumer = rule.apply(path)
            if consumer is not None:
                return consumer
    if not path:
        return ROOT_CONSUMER
    return _builtin(path.split("/"))


class CgroupNamer:
    """`consumer_for_cgroup` with a per-path cache (paths repeat every tick).

    `rules_skipped` counts paths named without the user rules because they were longer than
    MAX_RULE_PATH_CHARS (each path once per time it is named, not per cached lookup)."""

    # 16,384 paths hold a large node's live tree (1,000 pods are about 5,000 cgroups) and,
    # under churn, cost a few MiB at most before the cache starts over.
    def __init__(self, rules: Iterable[Rule] = (), max_cached: int = 16384) -> None:
        self.rules = tuple(rules)
        self.max_cached = max_cached
        self._cache: dict[str, Consumer] = {}
        self.rules_skipped = 0

    def __call__(self, path: str) -> Consumer:
        path = name_text(path)  # any byte sequence: one stable, visible name
        consumer = self._cache.get(path)
        if consumer is None:
            if len(self._cache) >= self.max_cached:
                self._cache.clear()  # container churn: bounded memory beats a perfect hit rate
            if self.rules and len(path.strip("/")) > MAX_RULE_PATH_CHARS:
                self.rules_skipped += 1
            consumer = self._cache[path] = consumer_for_cgroup(path, self.rules)
        return consumer
