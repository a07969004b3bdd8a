#!/usr/bin/env bash
# Regenerate the protobuf modules of the vendored Kubernetes APIs (CRI runtime v1, kubelet
# PodResources v1) under carbond/workloads/identity/proto/. Only messages are generated
# (--python_out): carbond calls the three RPCs it needs by their method paths, so no gRPC stub
# module (and no grpcio-tools version gate) ships. tests/test_identity_proto.py checks that
# running this again gives the committed files byte for byte; grpcio-tools is pinned in
# pyproject.toml's test extra for that reason.
set -euo pipefail
python=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
dir=carbond/workloads/identity/proto
out=${OUT_DIR:-$dir}
"$python" -m grpc_tools.protoc -I "$dir" --python_out="$out" \
    "$dir/cri_runtime_v1.proto" "$dir/podresources_v1.proto"
