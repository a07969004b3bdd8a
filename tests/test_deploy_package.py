"""The Debian package under a real systemd (issue 23): `make deb`, then a minimal Debian root
of this host's release booted with systemd as PID 1 (systemd-nspawn, no network, pure cgroup
v2; tests/nspawn.py), and the package's whole life in it, as an operator would live it:

install offline -> active (running) with its STATUS= -> /metrics -> a transient busy unit
attributed to burn.service -> reload good (in force when it returns) and bad (fails, old
configuration kept) -> stop within 2 s -> start with counters continuing -> upgrade to a newer
build keeping the configuration and the ledger -> remove (both kept) -> purge (state gone).

Every systemctl here is the container's (through nsenter): the host's services and processes
are never touched. Timings are printed (pytest -s), never asserted.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from carbond import __version__
from carbond.runtime.applied import read_applied
from tests.deb_helpers import Deb
from tests.helpers import Samples, select, total
from tests.nspawn import (
    Container,
    Mirror,
    apt_mirror,
    booted,
    cached_root,
    cannot_run_containers,
    os_release,
)

SCRAPE = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
          "'http://127.0.0.1:9877/metrics', timeout=5).read().decode())")
CONFIG = "/etc/carbond/carbond.yaml"
STATE = "/var/lib/private/carbond"  # DynamicUser=: /var/lib/carbond links here
BUDGET = "budgets: [{name: pkgtest, match: {}, period: month, limit: 1kg}]\n"
STATUS = re.compile(r'Status: "\d+ consumers, host [\d.]+ W, [\d.]+ g/kWh from static \(\w+\)"')
TICKS = "carbond_tick_duration_seconds_count"


def scrape(box: Container) -> Samples:
    text = box.run(["python3", "-c", SCRAPE]).stdout
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scraped(box: Container) -> Samples | None:
    try:
        return scrape(box)
    except AssertionError:
        return None  # not serving (yet)


def until(check: Callable[[], Samples | None], what: str, timeout: float = 60.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def next_tick(box: Container, after: Samples | None = None) -> Samples:
    """A scrape taken after at least one tick that started after this call."""
    start = total(after or until(lambda: scraped(box), "/metrics"), TICKS)

    def later() -> Samples | None:
        samples = scraped(box)
        return samples if samples and total(samples, TICKS) >= start + 2 else None

    return until(later, "two more ticks")


def show(box: Container, prop: str) -> str:
    return box.run(["systemctl", "show", "carbond", "-p", prop, "--value"]).stdout.strip()


def counters(samples: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The counters that must never go backwards, across restarts and upgrades too."""
    names = ("carbond_host_energy_joules_total", "carbond_host_emissions_grams_total",
             "carbond_consumer_energy_joules_total", "carbond_consumer_emissions_grams_total")
    return {key: value for key, value in samples.items() if key[0] in names}


def assert_continued(before: Samples, after: Samples, what: str) -> None:
    back = {key: (value, after.get(key)) for key, value in counters(before).items()
            if key in after and after[key] < value}
    assert not back, f"{what}: counters went backwards: {back}"
    assert total(after, "carbond_host_energy_joules_total") >= total(
        before, "carbond_host_energy_joules_total") > 0


@pytest.fixture
def mirror() -> Mirror:
    """This host's Debian mirror, or a skip (one line) where no container can be booted;
    requested before the builds, so a machine that cannot boot one does not build either."""
    why = cannot_run_containers()
    if why:
        pytest.skip(why)
    suite = os_release()["VERSION_CODENAME"]
    found = apt_mirror(suite)
    if found is None:
        pytest.skip(f"no apt source for {suite} main in /etc/apt to debootstrap from")
    return found


def test_the_package_lives_its_whole_life_under_a_real_systemd(
        mirror: Mirror, tmp_path: Path, carbond_deb: Deb, carbond_deb_newer: Deb) -> None:
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    timings = {"build .deb": carbond_deb.build_seconds,
               "build newer .deb": carbond_deb_newer.build_seconds}
    started = time.monotonic()
    tarball, made = cached_root(mirror, arch)
    timings["debootstrap (cold)" if made else "root from cache"] = time.monotonic() - started
    mark = time.monotonic()
    with booted(tarball, tmp_path, [carbond_deb.path, carbond_deb_newer.path]) as box:
        timings["unpack and boot"] = time.monotonic() - mark
        mark = time.monotonic()
        life(box, carbond_deb, carbond_deb_newer, timings)
        timings["package life"] = time.monotonic() - mark
    assert not any(path.exists() for path in box.cgroups), "container cgroups left behind"
    timings["test (without the builds)"] = time.monotonic() - started
    print("\n" + "\n".join(f"  {name}: {seconds:.2f} s" for name, seconds in timings.items()))


def life(box: Container, deb: Deb, newer: Deb, timings: dict[str, float]) -> None:
    # ---- install, with the network off ------------------------------------------------------
    assert box.run(["ls", "/sys/class/net"]).stdout.split() == ["lo"], "the network is on"
    before = box.run(["dpkg-query", "-W", "-f", "${Package}\n"]).stdout.split()
    install = box.run(["apt-get", "install", "-y", f"/root/{deb.path.name}"], timeout=300)
    assert "0 upgraded, 1 newly installed, 0 to remove" in install.stdout, install.stdout
    gets = [line for line in install.stdout.splitlines() if line.startswith("Get:")]
    assert gets and all(f" /root/{deb.path.name} " in line for line in gets), gets
    after = box.run(["dpkg-query", "-W", "-f", "${Package}\n"]).stdout.split()
    assert sorted(set(after) - set(before)) == ["carbond"] and len(after) == len(before) + 1

    # ---- running, as the unit says ----------------------------------------------------------
    assert box.run(["systemctl", "is-enabled", "carbond"]).stdout.strip() == "enabled"
    status = box.run(["systemctl", "status", "carbond"], check=False).stdout
    assert "Active: active (running)" in status and STATUS.search(status), status
    first = next_tick(box)
    assert select(first, "carbond_build_info", version=__version__)
    assert total(first, "carbond_meter_up", meter="model") == 1.0

    # ---- a transient busy unit is burn.service ---------------------------------------------
    box.run(["systemd-run", "--unit=burn", "--quiet", "sh", "-c", "while :; do :; done"])
    try:
        start = next_tick(box)
        end = next_tick(box, start)
    finally:
        box.run(["systemctl", "stop", "burn"])
    grown = {dict(key)["consumer"]: value - start.get(("carbond_consumer_energy_joules_total",
                                                       key), 0.0)
             for key, value in select(end, "carbond_consumer_energy_joules_total",
                                      kind="unit", component="cpu").items()}
    assert grown.get("burn.service", 0.0) > 0 and max(grown, key=grown.get) == "burn.service", \
        grown

    # ---- reload: good, in force when it returns ---------------------------------------------
    config = Path(box.root, CONFIG.lstrip("/"))
    config.write_text(config.read_text() + BUDGET)
    main_pid = show(box, "MainPID")
    box.run(["systemctl", "reload", "carbond"])
    applied = read_applied(str(Path(box.root, STATE.lstrip("/"))))
    assert applied is not None and str(applied.pid) == main_pid
    assert applied.sha256 == hashlib.sha256(config.read_bytes()).hexdigest()
    assert total(next_tick(box), "carbond_budget_limit_grams", budget="pkgtest") == 1000.0

    # ---- reload: bad, fails and keeps the old configuration --------------------------------
    good = config.read_text()
    config.write_text(good + "intervall: 5s\n")
    bad = box.run(["systemctl", "reload", "carbond"], check=False)
    assert bad.returncode != 0, bad
    status = box.run(["systemctl", "status", "carbond"], check=False).stdout
    assert "intervall: unknown key 'intervall'" in status and "(code=exited, status=2)" in status
    assert "Active: active (running)" in status and show(box, "MainPID") == main_pid, status
    assert read_applied(str(Path(box.root, STATE.lstrip("/")))) == applied
    assert total(next_tick(box), "carbond_budget_limit_grams", budget="pkgtest") == 1000.0
    config.write_text(good)

    # ---- stop within 2 s: systemd itself would kill it after that ---------------------------
    drop_in = Path(box.root, "etc/systemd/system/carbond.service.d")
    drop_in.mkdir(parents=True)
    (drop_in / "stop.conf").write_text("[Service]\nTimeoutStopSec=2s\n")
    box.run(["systemctl", "daemon-reload"])
    last = scrape(box)
    box.run(["systemctl", "stop", "carbond"])
    assert show(box, "Result") == "success" and show(box, "ExecMainStatus") == "0"
    timings["systemctl stop"] = stop_seconds(box)
    (drop_in / "stop.conf").unlink()
    drop_in.rmdir()
    box.run(["systemctl", "daemon-reload"])

    # ---- start: counters continue from the ledger ------------------------------------------
    box.run(["systemctl", "start", "carbond"])
    restarted = next_tick(box)
    assert_continued(last, restarted, "restart")
    assert select(restarted, "carbond_consumer_energy_joules_total", consumer="burn.service")

    # ---- upgrade to a newer build: configuration and ledger kept ---------------------------
    before_upgrade = scrape(box)
    upgrade = box.run(["apt-get", "install", "-y", f"/root/{newer.path.name}"], timeout=300)
    assert "1 upgraded, 0 newly installed" in upgrade.stdout, upgrade.stdout
    assert box.run(["dpkg-query", "-W", "-f", "${Version}", "carbond"]).stdout == newer.version
    assert box.run(["systemctl", "is-active", "carbond"]).stdout.strip() == "active"
    assert show(box, "MainPID") not in (main_pid, "0"), "the upgrade did not restart carbond"
    assert config.read_text() == good
    assert not list(config.parent.glob("carbond.yaml.dpkg-*"))
    upgraded = next_tick(box)
    assert_continued(before_upgrade, upgraded, "upgrade")
    assert total(upgraded, "carbond_budget_limit_grams", budget="pkgtest") == 1000.0
    report = json.loads(box.run(["carbond", "report", "--format", "json", "--since", "1d"])
                        .stdout)
    assert "burn.service" in json.dumps(report), report

    # ---- remove: configuration and ledger stay ----------------------------------------------
    box.run(["apt-get", "remove", "-y", "carbond"], timeout=300)
    assert box.run(["systemctl", "is-active", "carbond"], check=False).stdout.strip() \
        in ("inactive", "unknown")
    assert box.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "carbond"]).stdout \
        .strip() == "rc"
    assert not Path(box.root, "opt/carbond").exists()
    assert not Path(box.root, "usr/bin/carbond").is_symlink()
    assert config.read_text() == good
    assert Path(box.root, STATE.lstrip("/"), "ledger.db").is_file()

    # ---- purge: state gone ----------------------------------------------------------------
    box.run(["apt-get", "purge", "-y", "carbond"], timeout=300)
    for gone in ("etc/carbond", "var/lib/carbond", STATE.lstrip("/"),
                 "etc/systemd/system/multi-user.target.wants/carbond.service"):
        assert not Path(box.root, gone).exists() and not Path(box.root, gone).is_symlink(), gone
    listed = box.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "carbond"], check=False)
    assert listed.returncode != 0 or listed.stdout.strip() in ("", "un"), listed


def stop_seconds(box: Container) -> float:
    """How long the last stop took, by systemd's own clock (reported, never asserted)."""
    exited = int(show(box, "ActiveExitTimestampMonotonic"))
    inactive = int(show(box, "InactiveEnterTimestampMonotonic"))
    return (inactive - exited) / 1e6


def test_the_mirror_is_read_from_apts_own_sources(tmp_path: Path) -> None:
    """deb822 `.sources` and one-line `.list` files, comments, deb-src and other suites
    skipped; a keyring named by Signed-By is passed on only when it exists."""
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    keyring = tmp_path / "archive.gpg"
    keyring.write_bytes(b"")
    (apt / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://other.example/debian trixie main\n")
    (apt / "sources.list.d" / "a.sources").write_text(
        "Types: deb\n# http://snapshot.example/archive\nURIs: http://mirror.example/debian\n"
        f"Suites: bookworm bookworm-updates\nComponents: main contrib\nSigned-By: {keyring}\n")
    (apt / "sources.list.d" / "b.list").write_text(
        "deb [arch=amd64] http://later.example/debian bookworm main\n")
    assert apt_mirror("bookworm", str(apt)) == Mirror("http://mirror.example/debian", "bookworm",
                                                      str(keyring))
    (apt / "sources.list.d" / "a.sources").unlink()
    assert apt_mirror("bookworm", str(apt)) == Mirror("http://later.example/debian", "bookworm",
                                                      None)
    assert apt_mirror("sid", str(apt)) is None
