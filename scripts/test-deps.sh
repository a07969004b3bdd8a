#!/usr/bin/env bash
# System tools the tests and benchmarks use: gcc (builds the stand-in libnvidia-ml.so.1 and the
# benchmark spinner), setpriv (drops capabilities to test permission errors as root), prometheus
# (the real server that `carbond report --prometheus` and the exporter are tested against),
# openssl (self-signed certificates for the TLS tests), chromium (opens `report --format html`
# headless over the DevTools protocol), tmux (a real terminal for `carbond top`),
# linux-libc-dev (<linux/ipmi.h>: the IPMI meter's ctypes structures are checked against it);
# for the package (issue 23): dpkg-dev (dpkg-shlibdeps), python3-venv (the .deb's venv on
# Debian's python3), lintian, debootstrap and systemd-container (systemd-nspawn boots the
# package under a real systemd), victoria-metrics (the remote_write fleet test);
# podman, runc and busybox-static (a real container for the identity tests). Installed with
# apt-get when missing.
set -euo pipefail
missing=()
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v openssl >/dev/null || missing+=(openssl)
# systemd-analyze verifies and scores deploy/systemd/carbond.service; make runs `make install`.
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v make >/dev/null || missing+=(make)
command -v chromium >/dev/null || missing+=(chromium fonts-dejavu-core)
command -v tmux >/dev/null || missing+=(tmux)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v lintian >/dev/null || missing+=(lintian)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v victoria-metrics >/dev/null || missing+=(victoria-metrics)
[ -f /usr/include/linux/ipmi.h ] || missing+=(linux-libc-dev)
# A real rootful Podman container (tests/test_identity_podman.py): podman, runc (crun refuses
# hybrid cgroup hosts) and busybox-static for an image made locally (no registry is reachable).
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
[ -x /bin/busybox ] || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "test-deps: need ${missing[*]}; run as root or install them" >&2
        exit 1
    fi
    apt-get update -qq
    # --no-install-recommends: the tests start the prometheus binary themselves; the package's
    # own service is stopped and disabled below so it does not hold port 9090.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    # The same for VictoriaMetrics (port 8428): the test runs its own on a free port.
    for service in prometheus victoria-metrics; do
        if [[ " ${missing[*]} " == *" $service "* ]] && command -v systemctl >/dev/null; then
            systemctl disable --now "$service" >/dev/null 2>&1 || true
        fi
    done
fi
