"""The DaemonSet gives carbond the two sockets its Kubernetes metadata sources use (issue 20),
read-only, and the ConfigMap's sources agree with what is mounted (docs/identity.md)."""

from __future__ import annotations

import os

import yaml

from carbond import config
from carbond.workloads.identity import settings
from carbond.workloads.identity.cri import CONTAINERD_SOCKET
from carbond.workloads.identity.podresources import KUBELET_SOCKET
from tests.test_deploy_kubernetes import documents


def test_the_cri_and_podresources_sockets_are_mounted_read_only():
    spec = documents()["DaemonSet"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for socket in (CONTAINERD_SOCKET, KUBELET_SOCKET):
        directory = os.path.dirname(socket)
        mount = mounts[directory]
        assert mount["readOnly"] is True
        host = volumes[mount["name"]]["hostPath"]
        assert (host["path"], host["type"]) == (directory, "Directory")
    assert spec["automountServiceAccountToken"] is False  # no RBAC: the API server is not asked


def test_the_configmap_asks_only_the_mounted_sources(tmp_path):
    path = tmp_path / "carbond.yaml"
    path.write_text(documents()["ConfigMap"]["data"]["carbond.yaml"])
    loaded = config.load(str(path), {})
    names = [source.name for source in settings.sources(loaded.metadata)]
    assert names == ["cri", "podresources"]
    assert yaml.safe_load(path.read_text())["metadata"]["slurm"] == {"scontrol": "off"}
