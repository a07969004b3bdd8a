"""The DESIGN.md consumer table, over cgroup paths as real hosts name them."""

from __future__ import annotations

import pwd

import pytest

from carbond.types import ConfigError, Consumer
from carbond.workloads.naming import (
    ROOT_CONSUMER,
    CgroupNamer,
    compile_rules,
    consumer_for_cgroup,
)

D = "3f1e9a6c2b7d4e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678abcdef"
C = "8c0f5ef2a1b34c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5"
UID = "5e4b2c1a-9f3d-4e6b-8a7c-1d2e3f4a5b6c"
UID_ = UID.replace("-", "_")
ROOT_NAME = pwd.getpwuid(0).pw_name

TABLE = [
    # systemd units
    ("system.slice/nginx.service", Consumer("unit", "nginx.service")),
    ("system.slice/getty@tty1.service", Consumer("unit", "getty@tty1.service")),
    (
        "system.slice/system-postgresql.slice/postgresql@15-main.service",
        Consumer("unit", "postgresql@15-main.service"),
    ),
    ("init.scope", Consumer("unit", "init.scope")),
    ("system.slice/run-r1234.scope", Consumer("unit", "run-r1234.scope")),
    ("system.slice/foo.service/payload", Consumer("unit", "foo.service")),
    # virtual machines: libvirt/QEMU (systemd-escaped scope names) and Proxmox
    ("machine.slice/machine-qemu\\x2d1\\x2dvm.scope", Consumer("vm", "vm")),
    (
        "machine.slice/machine-qemu\\x2d12\\x2dweb\\x2dfrontend.scope",
        Consumer("vm", "web-frontend"),
    ),
    ("machine.slice/machine-qemu\\x2d3\\x2dgpu\\x2dbox.scope/libvirt/vcpu0",
     Consumer("vm", "gpu-box")),
    ("machine.slice/machine-qemu\\x2d4\\x2dcaf\\xc3\\xa9.scope", Consumer("vm", "caf\u00e9")),
    ("machine.slice/machine-qemu\\x2d5\\x2dbad\\xff.scope", Consumer("vm", "bad\\xff")),
    ("machine.slice/machine-qemu\\x2dold.scope", Consumer("vm", "old")),
    ("machine.slice/systemd-nspawn@box.service", Consumer("unit", "systemd-nspawn@box.service")),
    (
        "system.slice/machine-qemu\\x2d1\\x2dvm.scope",
        Consumer("unit", "machine-qemu\\x2d1\\x2dvm.scope"),
    ),
    ("qemu.slice/101.scope", Consumer("vm", "101")),
    ("qemu.slice/101.scope/vcpu0", Consumer("vm", "101")),
    ("qemu.slice", Consumer("cgroup", "qemu.slice")),
    ("system.slice/101.scope", Consumer("unit", "101.scope")),
    # Docker: systemd and cgroupfs drivers
    (f"system.slice/docker-{D}.scope", Consumer("container", f"docker/{D[:12]}")),
    (f"docker/{D}", Consumer("container", f"docker/{D[:12]}")),
    (f"system.slice/docker-{D}.scope/init.scope", Consumer("container", f"docker/{D[:12]}")),
    ("system.slice/docker.service", Consumer("unit", "docker.service")),
    ("system.slice/containerd.service", Consumer("unit", "containerd.service")),
    # Kubernetes, systemd driver, all QoS classes, containerd / CRI-O / docker
    (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"cri-containerd-{C}.scope",
        Consumer("container", f"containerd/{C[:12]}"),
    ),
    (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"crio-{C}.scope",
        Consumer("container", f"crio/{C[:12]}"),
    ),
    (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"crio-conmon-{C}.scope",
        Consumer("container", f"crio/{C[:12]}"),
    ),
    (
        f"kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{C}.scope",
        Consumer("container", f"containerd/{C[:12]}"),
    ),
    (
        f"kubepods.slice/kubepods-pod{UID_}.slice/docker-{D}.scope",
        Consumer("container", f"docker/{D[:12]}"),
    ),
    (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
        Consumer("pod", f"pod/{UID}"),
    ),
    (f"kubepods.slice/kubepods-pod{UID_}.slice", Consumer("pod", f"pod/{UID}")),
    (
        "kubepods.slice/kubepods-burstable.slice",
        Consumer("cgroup", "kubepods.slice/kubepods-burstable.slice"),
    ),
    ("kubepods.slice", Consumer("cgroup", "kubepods.slice")),
    # Kubernetes, cgroupfs driver
    (f"kubepods/burstable/pod{UID}/{C}", Consumer("container", f"containerd/{C[:12]}")),
    (f"kubepods/besteffort/pod{UID}/{C}", Consumer("container", f"containerd/{C[:12]}")),
    (f"kubepods/pod{UID}/{C}", Consumer("container", f"containerd/{C[:12]}")),
    (f"kubepods/burstable/pod{UID}", Consumer("pod", f"pod/{UID}")),
    (f"kubepods/pod{UID}", Consumer("pod", f"pod/{UID}")),
    ("kubepods/burstable", Consumer("cgroup", "kubepods/burstable")),
    # kubelet's own cgroup path for static pods uses a 32-hex config hash
    (
        "kubepods.slice/kubepods-burstable.slice/"
        "kubepods-burstable-pod6c94a2eeaf5d5e4b02d1b2b4d4d2c6a7.slice",
        Consumer("pod", "pod/6c94a2eeaf5d5e4b02d1b2b4d4d2c6a7"),
    ),
    # Podman rootful and rootless
    (f"machine.slice/libpod-{C}.scope", Consumer("container", f"podman/{C[:12]}")),
    (f"machine.slice/libpod-{C}.scope/container", Consumer("container", f"podman/{C[:12]}")),
    (f"machine.slice/libpod-conmon-{C}.scope", Consumer("container", f"podman/{C[:12]}")),
    (f"libpod_parent/libpod-{C}", Consumer("container", f"podman/{C[:12]}")),
    (
        f"user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{C}.scope",
        Consumer("container", f"podman/{C[:12]}"),
    ),
    (
        f"user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{C}.scope/container",
        Consumer("container", f"podman/{C[:12]}"),
    ),
    # Slurm v1 and v2 layouts
    ("slurm/uid_1000/job_4242/step_0", Consumer("job", "slurm/4242")),
    ("slurm/uid_1000/job_4242/step_batch", Consumer("job", "slurm/4242")),
    ("slurm/uid_1000/job_4242/step_extern/task_0", Consumer("job", "slurm/4242")),
    ("slurm/uid_1000/job_4242", Consumer("job", "slurm/4242")),
    ("slurm_node17/uid_1000/job_7/step_0", Consumer("job", "slurm/7")),
    ("system.slice/slurmstepd.scope/job_4242/step_0/user/task_0", Consumer("job", "slurm/4242")),
    ("system.slice/slurmstepd.scope/job_4242/step_batch", Consumer("job", "slurm/4242")),
    ("system.slice/node17_slurmstepd.scope/job_9/step_0", Consumer("job", "slurm/9")),
    ("system.slice/slurmstepd.scope", Consumer("unit", "slurmstepd.scope")),
    ("system.slice/slurmstepd.scope/system", Consumer("unit", "slurmstepd.scope")),
    ("system.slice/slurmd.service", Consumer("unit", "slurmd.service")),
    ("system.slice/job_12", Consumer("cgroup", "system.slice/job_12")),  # not Slurm
    # user slices: name from the password database, else the UID
    ("user.slice/user-0.slice/session-3.scope", Consumer("user", ROOT_NAME)),
    ("user.slice/user-0.slice", Consumer("user", ROOT_NAME)),
    (
        "user.slice/user-4242999.slice/user@4242999.service/app.slice/jupyter.service",
        Consumer("user", "4242999"),
    ),
    ("user.slice", Consumer("cgroup", "user.slice")),
    # no rule
    ("system.slice", Consumer("cgroup", "system.slice")),
    ("lxc/web01", Consumer("cgroup", "lxc/web01")),
    ("", ROOT_CONSUMER),
    ("/", ROOT_CONSUMER),
    (f"/system.slice/docker-{D}.scope", Consumer("container", f"docker/{D[:12]}")),
]


@pytest.mark.parametrize(("path", "expected"), TABLE, ids=[p or "<root>" for p, _ in TABLE])
def test_builtin_table(path: str, expected: Consumer) -> None:
    assert consumer_for_cgroup(path) == expected


def test_user_rules_first_and_template() -> None:
    rules = compile_rules(
        [
            {
                "match": r"^system\.slice/jupyter-(?P<user>[^.]+)\.service$",
                "kind": "user",
                "name": "{user}",
            },
            {
                "match": r"^batch/(?P<team>\w+)/(?P<run>\d+)$",
                "kind": "project",
                "name": "{team}-run{run}",
            },
        ]
    )
    assert consumer_for_cgroup("system.slice/jupyter-ada.service", rules) == Consumer("user", "ada")
    assert consumer_for_cgroup("batch/physics/17", rules) == Consumer("project", "physics-run17")
    # unmatched paths fall through to the built-in rules
    assert consumer_for_cgroup("system.slice/x.service", rules) == Consumer("unit", "x.service")


def test_template_is_not_evaluated() -> None:
    """Only {group} tokens are substituted: no attribute access, indexing or format specs."""
    rules = compile_rules(
        [
            {
                "match": r"^(?P<u>.+)\.service$",
                "kind": "unit",
                "name": "{u.__class__}{u[0]}{u!r}{0}-{u}",
            }
        ]
    )
    got = consumer_for_cgroup("evil.service", rules)
    assert got == Consumer("unit", "{u.__class__}{u[0]}{u!r}{0}-evil")


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("nope", "attribution.rules"),
        ([{"match": "(", "kind": "unit", "name": "x"}], "attribution.rules[0].match"),
        ([{"match": "a", "kind": "planet", "name": "x"}], "attribution.rules[0].kind"),
        ([{"match": "(?P<a>x)", "kind": "unit", "name": "{b}"}], "attribution.rules[0].name"),
        ([{"match": "a", "kind": "unit"}], "attribution.rules[0].name"),
        ([{"match": "a", "kind": "unit", "name": "x", "extra": 1}], "attribution.rules[0].extra"),
        ([42], "attribution.rules[0]"),
    ],
)
def test_bad_rules_name_the_key(raw: object, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_rules(raw)
    assert info.value.key == key


def test_namer_caches_per_path() -> None:
    calls = []
    rules = compile_rules([{"match": r"^x/(?P<n>\w+)$", "kind": "project", "name": "{n}"}])
    namer = CgroupNamer(rules, max_cached=2)
    real_apply = rules[0].apply

    class Counting:
        def apply(self, path: str):
            calls.append(path)
            return real_apply(path)

    namer.rules = (Counting(),)
    assert namer("x/a") == Consumer("project", "a")
    assert namer("x/a") == Consumer("project", "a")
    assert calls == ["x/a"]
    namer("x/b")
    namer("x/c")  # over max_cached: the cache starts over, results stay right
    assert namer("x/a") == Consumer("project", "a")


NOBODY = pwd.getpwuid(65534).pw_name


@pytest.mark.parametrize(("path", "expected"), [
    # a user's delegated sub-tree: the user names the directory, the project is theirs
    ("user.slice/user-65534.slice/user@65534.service/app.slice/carbond.exec/train/run.1.2.x",
     f"{NOBODY}/train"),
    # naming another user's project (or root's) from one's own tree keeps it one's own
    ("user.slice/user-65534.slice/user@65534.service/carbond.exec/root%2Ftrain/run.1.2.x",
     f"{NOBODY}/root/train"),
    # the exec socket's runs under the caller's slice already carry the prefix: not doubled
    (f"user.slice/user-65534.slice/carbond.exec/{NOBODY}%2Ftrain/run.1.2.x", f"{NOBODY}/train"),
    # root's own slice and trees only root writes: the name as given
    ("user.slice/user-0.slice/carbond.exec/train/run.1.2.x", "train"),
    ("carbond.exec/train/run.1.2.x", "train"),
    ("system.slice/carbond.exec/a%2Fb/run.1.2.x", "a/b"),
])
def test_a_project_under_a_users_slice_is_that_users(path: str, expected: str) -> None:
    assert consumer_for_cgroup(path) == Consumer("project", expected)
