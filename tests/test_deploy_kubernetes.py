"""deploy/kubernetes validated against the Kubernetes schemas (kubernetes-validate, strict:
unknown fields are errors) and the ServiceMonitor against prometheus-operator's CRD schema
(tests/schemas), and checked for what carbond needs on a node (issue 13, item 5)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from carbond import config
from carbond.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
SERVICEMONITOR_SCHEMA = Path(__file__).resolve().parent / "schemas" / "servicemonitor-v1.json"
KUBERNETES_VERSION = "1.30"  # oldest release we claim; the manifests use nothing newer


def documents() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def strict(schema: Any) -> Any:
    """The CRD schema as the API server's strict field validation applies it: an object
    with listed properties accepts no others (unless it preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def validate_servicemonitor(doc: dict[str, Any]) -> None:
    schema = strict(json.loads(SERVICEMONITOR_SCHEMA.read_text()))
    jsonschema.validate(doc, schema)


def test_every_manifest_is_in_the_kustomization():
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert set(documents()) == {"Namespace", "ConfigMap", "DaemonSet", "Service",
                                "ServiceMonitor", "Kustomization"}


@pytest.mark.parametrize("kind", ["Namespace", "ConfigMap", "DaemonSet", "Service"])
def test_builtin_kinds_validate_strictly(kind):
    doc = documents()[kind]
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validation_rejects_a_misspelt_field():
    """The validators are strict: a typo is an error, not an ignored field."""
    daemonset = copy.deepcopy(documents()["DaemonSet"])
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)
    monitor = copy.deepcopy(documents()["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate_servicemonitor(monitor)
    monitor = copy.deepcopy(documents()["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["scheme"] = "gopher"
    with pytest.raises(jsonschema.ValidationError):
        validate_servicemonitor(monitor)


def test_servicemonitor_validates_against_the_crd_schema():
    monitor = documents()["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    validate_servicemonitor(monitor)


def test_service_monitor_and_daemonset_select_each_other():
    docs = documents()
    pod = docs["DaemonSet"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert docs["DaemonSet"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    service_labels = docs["Service"]["metadata"]["labels"]
    monitor = docs["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service_labels.items()
    # job="carbond", as deploy/prometheus/alerts.yml expects.
    assert service_labels[monitor["jobLabel"]] == "carbond"
    port = monitor["endpoints"][0]["port"]
    assert [p["name"] for p in docs["Service"]["spec"]["ports"]] == [port]
    container = pod["spec"]["containers"][0]
    assert [p["name"] for p in container["ports"]] == [port]
    namespaces = {doc["metadata"].get("namespace") for kind, doc in docs.items()
                  if kind not in ("Namespace", "Kustomization")}
    assert namespaces == {docs["Namespace"]["metadata"]["name"]}


def test_daemonset_gives_carbond_what_it_needs_and_no_more():
    spec = documents()["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    container = spec["containers"][0]
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for name, host_path in (("proc", "/proc"), ("sys", "/sys")):
        assert mounts[name]["readOnly"] is True
        assert volumes[name]["hostPath"]["path"] == host_path
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/carbond"
    assert not mounts["state"].get("readOnly")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "resources" not in container or "nvidia.com/gpu" not in str(container["resources"])


def test_daemonset_arguments_and_configmap_are_valid_carbond_input(tmp_path):
    """The container's command line parses as `carbond run` and the ConfigMap's carbond.yaml
    loads without error."""
    docs = documents()
    container = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.command == "run"
    assert args.state_dir == "/var/lib/carbond" and args.proc_root == "/host/proc"
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for path in (args.config, args.proc_root, args.powercap_root, args.cgroup_root):
        assert any(path == m or path.startswith(m + "/") for m in mounted), path
    conf = tmp_path / "carbond.yaml"
    conf.write_text(docs["ConfigMap"]["data"]["carbond.yaml"])
    flags = {flag: getattr(args, flag.lstrip("-").replace("-", "_").replace(".", "_"))
             for flag in config.FLAG_KEYS}
    loaded = config.load(str(conf), flags)
    assert loaded.zone == "DE" and loaded.interval_seconds == 5.0
    assert (loaded.listen_host, loaded.listen_port) == ("0.0.0.0", 9877)
    assert loaded.powercap_root == "/host/sys/class/powercap"
