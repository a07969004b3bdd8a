"""The pure parts of identity: naming from metadata, label values from any text, GPU holders
(conservation whatever the holders), the vendored protos (regenerating gives the committed
files) and the `metadata:` configuration section."""

from __future__ import annotations

import filecmp
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.attribution import GpuWeights, Policy, TickInput, attribute
from carbond.meters.nvml import GpuInfo, MigInstance
from carbond.pipeline.deltas import DeviceDelta
from carbond.types import IDLE, ConfigError, Consumer
from carbond.workloads.identity import settings
from carbond.workloads.identity.gpus import devices_by_id, held_weights, holders_by_device
from carbond.workloads.identity.metadata import (
    LABELS,
    Metadata,
    id_key,
    label_value,
    name_part,
    named,
)
from carbond.workloads.identity.resolver import SOURCES, MetadataResolver

ROOT = Path(__file__).resolve().parent.parent
UID = "5e4b2c1a-9f3d-4e6b-8a7c-1d2e3f4a5b6c"
C = "8c0f5ef2a1b34c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5"


@pytest.mark.parametrize(("consumer", "metadata", "expected"), [
    (Consumer("pod", f"pod/{UID}"), Metadata(namespace="ns", pod="p"), Consumer("pod", "ns/p")),
    (Consumer("container", f"containerd/{C[:12]}"),
     Metadata(namespace="ns", pod="p", container="c"), Consumer("container", "ns/p/c")),
    (Consumer("container", f"crio/{C[:12]}"), Metadata(namespace="ns", pod="p"),
     Consumer("pod", "ns/p")),  # a sandbox: the pod's
    (Consumer("container", f"docker/{C[:12]}"), Metadata(container="db", runtime="docker"),
     Consumer("container", "docker/db")),
    (Consumer("container", f"podman/{C[:12]}"), Metadata(container="db", runtime="podman"),
     Consumer("container", "podman/db")),
    (Consumer("container", f"containerd/{C[:12]}"), Metadata(container="c", runtime="containerd"),
     Consumer("container", f"containerd/{C[:12]}")),  # no pod: the ID stands
    (Consumer("job", "slurm/42"), Metadata(user="alice", account="physics"),
     Consumer("job", "slurm/42")),
    (Consumer("pod", f"pod/{UID}"), Metadata(namespace="a/b", pod="c"),
     Consumer("pod", f"pod/{UID}")),
    (Consumer("unit", "x.service"), Metadata(namespace="ns", pod="p"),
     Consumer("unit", "x.service")),
])
def test_names_from_metadata(consumer, metadata, expected):
    assert named(consumer, metadata) == expected


@pytest.mark.parametrize(("consumer", "key"), [
    (Consumer("pod", f"pod/{UID}"), ("pod", UID)),
    (Consumer("container", f"containerd/{C[:12]}"), ("containerd", C[:12])),
    (Consumer("container", f"docker/{C}"), ("docker", C[:12])),
    (Consumer("job", "slurm/4242"), ("slurm", "4242")),
    (Consumer("job", "slurm/42x"), None),
    (Consumer("container", "docker/shop-db-1"), None),  # already a name
    (Consumer("pod", "team-a/web"), None),
    (Consumer("unit", "pod/x"), None),
    (Consumer("idle", "idle"), None),
])
def test_id_keys(consumer, key):
    assert id_key(consumer) == key


@given(st.text())
def test_any_text_is_a_valid_bounded_label_value(text):
    value = label_value(text)
    value.encode("utf-8")
    assert len(value) <= 256
    assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in value)
    assert label_value(text) == value  # stable


@given(st.text(), st.text(), st.text())
def test_a_name_has_exactly_its_parts(namespace, pod, container):
    """Whatever the sources say, a pod-container name splits back into the three parts it was
    made of, or the ID name stands: no answer can pass for another pod's container."""
    ident = Consumer("container", f"containerd/{C[:12]}")
    got = named(ident, Metadata(namespace=namespace, pod=pod, container=container))
    got.name.encode("utf-8")
    if not (name_part(namespace) and name_part(pod)):
        assert got == ident
    elif name_part(container):
        assert got.kind == "container" and got.name.split("/") == [namespace, pod, container]
    else:  # a sandbox, or a container name that cannot be one: the pod's
        assert got.kind == "pod" and got.name.split("/") == [namespace, pod]


def test_labels_are_the_design_set_in_order():
    assert LABELS == ("namespace", "pod", "pod_uid", "container", "container_id", "runtime",
                      "user", "account", "partition", "job_name", "compose_project",
                      "compose_service")
    assert list(Metadata(runtime="podman", container="x").labels()) == ["container", "runtime"]


def test_every_source_counts_from_zero():
    assert MetadataResolver([]).errors() == dict.fromkeys(SOURCES, 0)


# ---- GPUs held by pods --------------------------------------------------------------------

A, B, D = (Consumer("container", f"ns/p{i}/c") for i in range(3))


def gpu(index: int, uuid: str, migs: tuple[str, ...] = ()) -> GpuInfo:
    return GpuInfo(index, f"gpu-{index}", uuid, "H100", "ok", "", "energy counter", bool(migs),
                   tuple(MigInstance(i, m, i + 1, 0) for i, m in enumerate(migs)))


def test_device_ids_map_to_devices():
    gpus = [gpu(0, "GPU-0"), gpu(1, "GPU-1", ("MIG-a", "MIG-b"))]
    devices = devices_by_id(gpus)
    assert devices == {"0": "gpu-0", "GPU-0": "gpu-0", "1": "gpu-1", "GPU-1": "gpu-1",
                       "MIG-a": "gpu-1", "MIG-b": "gpu-1"}
    holders = holders_by_device({"GPU-0": (A,), "MIG-a": (B,), "MIG-b": (B,), "GPU-9": (D,)},
                                devices)
    assert holders == {"gpu-0": frozenset({A}), "gpu-1": frozenset({B})}


def test_one_holder_takes_the_gpu_even_without_samples():
    weights = held_weights({"gpu-0": GpuWeights()}, {"gpu-0": {A}, "gpu-1": {B}})
    assert weights["gpu-0"] == GpuWeights(sm={A: 1.0}, memory={A: 1.0})
    assert weights["gpu-1"] == GpuWeights(sm={B: 1.0}, memory={B: 1.0})  # no NVML entry


def test_time_slicing_keeps_the_sm_split():
    nvml = GpuWeights(sm={A: 30.0, B: 10.0})
    assert held_weights({"gpu-0": nvml}, {"gpu-0": {A, B}})["gpu-0"] == nvml
    tick = TickInput(seconds=5.0, devices=[DeviceDelta("gpu", "gpu-0", "nvml", 1000.0)],
                     gpus=held_weights({"gpu-0": nvml}, {"gpu-0": {A, B}}))
    energy = attribute(tick, Policy()).energy
    assert energy[A]["gpu"] == pytest.approx(750.0) and energy[B]["gpu"] == pytest.approx(250.0)


consumers = st.sampled_from([A, B, D, Consumer("container", "other/x/y")])
weight_maps = st.dictionaries(consumers, st.floats(0, 100, allow_nan=False), max_size=4)


@given(st.dictionaries(st.sampled_from(["gpu-0", "gpu-1", "gpu-2"]),
                       st.builds(GpuWeights, weight_maps, weight_maps), max_size=3),
       st.dictionaries(st.sampled_from(["gpu-0", "gpu-1", "gpu-2", "gpu-9"]),
                       st.frozensets(consumers, max_size=3), max_size=4),
       st.lists(st.floats(0, 5000, allow_nan=False), min_size=3, max_size=3),
       st.sampled_from(["separate", "proportional"]))
def test_each_gpu_is_split_once_whatever_the_holders(nvml, holders, joules, idle):
    """Conservation: every GPU's energy is attributed exactly once (the consumers' GPU energy
    sums to the GPUs' energy), and a GPU held by one consumer is that consumer's."""
    devices = [DeviceDelta("gpu", f"gpu-{i}", "nvml", j) for i, j in enumerate(joules)]
    adjusted = held_weights(nvml, holders)
    for i, j in enumerate(joules):
        tick = TickInput(seconds=5.0, devices=[devices[i]], gpus=adjusted)
        energy = attribute(tick, Policy(idle=idle, model="off")).energy
        assert math.fsum(parts.get("gpu", 0.0) for parts in energy.values()) == \
            pytest.approx(j, rel=1e-9, abs=1e-9)
        owners = holders.get(f"gpu-{i}", frozenset())
        if len(owners) == 1 and j > 0:
            (owner,) = owners
            assert energy[owner]["gpu"] == pytest.approx(j, rel=1e-9)
            assert energy.get(IDLE, {}).get("gpu", 0.0) == pytest.approx(0.0, abs=1e-9)
    tick = TickInput(seconds=5.0, devices=devices, gpus=adjusted)
    energy = attribute(tick, Policy(idle=idle, model="off")).energy
    assert math.fsum(p.get("gpu", 0.0) for p in energy.values()) == pytest.approx(
        math.fsum(joules), rel=1e-9, abs=1e-9)


# ---- the vendored protos ---------------------------------------------------------------------


def test_regenerating_the_protos_gives_the_committed_files(tmp_path):
    proto = ROOT / "carbond" / "workloads" / "identity" / "proto"
    subprocess.run([str(ROOT / "scripts" / "gen-proto.sh"), sys.executable], check=True,
                   env={**os.environ, "OUT_DIR": str(tmp_path)}, cwd=ROOT)
    for name in ("cri_runtime_v1_pb2.py", "podresources_v1_pb2.py"):
        assert filecmp.cmp(tmp_path / name, proto / name, shallow=False), name


def test_the_protos_declare_only_read_only_calls():
    from carbond.workloads.identity import grpcunix
    from carbond.workloads.identity.proto import cri_runtime_v1_pb2, podresources_v1_pb2

    assert [m.name for m in cri_runtime_v1_pb2.DESCRIPTOR.services_by_name[
        "RuntimeService"].methods] == ["Version", "ListPodSandbox", "ListContainers"]
    assert grpcunix.method_path(cri_runtime_v1_pb2, "RuntimeService", "ListContainers") == \
        "/runtime.v1.RuntimeService/ListContainers"
    assert grpcunix.method_path(podresources_v1_pb2, "PodResourcesLister", "List") == \
        "/v1.PodResourcesLister/List"


# ---- configuration -----------------------------------------------------------------------------


def test_settings_defaults_and_values():
    assert settings.parse({}) == settings.MetadataSettings()
    parsed = settings.parse({"enabled": "on", "timeout": "500ms", "relist": "10m",
                             "cri": {"socket": "/run/k3s/containerd/containerd.sock"},
                             "docker": {"socket": False}, "slurm": {"scontrol": "off"}})
    assert parsed.timeout_seconds == 0.5 and parsed.relist_seconds == 600.0
    assert parsed.cri_socket == "/run/k3s/containerd/containerd.sock"
    assert parsed.docker_socket == "off" and parsed.scontrol == "off"
    assert [s.name for s in settings.sources(parsed)] == ["cri", "podresources", "podman"]
    assert settings.sources(settings.parse({"enabled": False})) == []


@pytest.mark.parametrize(("raw", "key"), [
    ({"timeout": "2h"}, "metadata.timeout"),
    ({"relist": "1s"}, "metadata.relist"),
    ({"enabled": "maybe"}, "metadata.enabled"),
    ({"cri": {"socket": "relative.sock"}}, "metadata.cri.socket"),
    ({"docker": {"socket": "auto"}}, "metadata.docker.socket"),
    ({"podman": {"path": "/x"}}, "metadata.podman.path"),
    ({"slurm": {"scontrol": 3}}, "metadata.slurm.scontrol"),
    ({"kubelet": {}}, "metadata.kubelet"),
    ("on", "metadata"),
])
def test_bad_settings_name_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        settings.parse(raw)
    assert info.value.key == key


def test_an_untrusted_scontrol_is_a_config_error(tmp_path):
    program = tmp_path / "scontrol"
    program.write_text("#!/bin/sh\n")
    os.chmod(program, 0o777)
    with pytest.raises(ConfigError) as info:
        settings.sources(settings.parse({"slurm": {"scontrol": str(program)}}))
    assert info.value.key == "metadata.slurm.scontrol"
