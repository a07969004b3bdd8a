#!/usr/bin/env bash
# System tools the tests and benchmarks use: gcc (builds the stand-in libnvidia-ml.so.1 and the
# benchmark spinner), setpriv (drops capabilities to test permission errors as root). Installed
# with apt-get when missing.
set -euo pipefail
missing=()
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
command -v setpriv >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "test-deps: need ${missing[*]}; run as root or install them" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
