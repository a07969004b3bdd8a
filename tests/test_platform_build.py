"""From configuration to platform meters: auto, on and off, credentials read before anything
runs, each problem one ConfigError naming its key."""

from __future__ import annotations

import pytest

from carbond.config import load
from carbond.meters.acpi import AcpiMeter
from carbond.meters.ipmi import IpmiMeter
from carbond.meters.platform import build_platform_meters
from carbond.meters.redfish import RedfishMeter
from carbond.types import ConfigError
from tests.hwmon import FakeHwmon


def config_from(tmp_path, text: str):
    path = tmp_path / "carbond.yaml"
    path.write_text(text)
    return load(str(path), {})


def names(meters) -> list[str]:
    return [m.name for m in meters]


def test_by_default_a_host_without_sources_gets_no_platform_meter(tmp_path) -> None:
    config = config_from(tmp_path, f"meters: {{acpi: {{root: {tmp_path}/none}}}}\n")
    assert config.acpi.enabled == "auto" and config.redfish.enabled == "off"
    assert config.ipmi.enabled == "off" and config.platform_policy == "proportional"
    assert build_platform_meters(config, start_threads=False) == []


def test_auto_finds_the_acpi_meter_and_on_builds_it_down(tmp_path) -> None:
    hwmon = FakeHwmon(str(tmp_path / "hwmon"))
    config = config_from(tmp_path, f"meters: {{acpi: {{root: {hwmon.root}}}}}\n")
    assert build_platform_meters(config, start_threads=False) == []
    hwmon.add(0, "power_meter")
    (meter,) = build_platform_meters(config, start_threads=False)
    assert isinstance(meter, AcpiMeter) and meter.meter is not None
    empty = config_from(tmp_path, f"meters: {{acpi: {{enabled: on, root: {tmp_path}/x}}}}\n")
    (down,) = build_platform_meters(empty, start_threads=False)
    assert not down.report()[0].ok
    off = config_from(tmp_path, f"meters: {{acpi: {{enabled: off, root: {hwmon.root}}}}}\n")
    assert build_platform_meters(off, start_threads=False) == []


def test_ipmi_auto_needs_a_character_device(tmp_path) -> None:
    missing = config_from(tmp_path, f"meters: {{ipmi: {{enabled: auto, device: "
                                    f"{tmp_path}/ipmi0}}}}\n")
    assert build_platform_meters(missing, start_threads=False) == []
    present = config_from(tmp_path, "meters: {ipmi: {enabled: auto, device: /dev/null, "
                                    "interval: 2s}}\n")
    (meter,) = build_platform_meters(present, start_threads=False)
    assert isinstance(meter, IpmiMeter) and meter.interval_seconds == 2.0
    meter.close()


def redfish_yaml(tmp_path, **extra: str) -> str:
    (tmp_path / "user").write_text("carbond\n")
    (tmp_path / "password").write_text("s3cret\n")
    options = {"enabled": "on", "url": "https://127.0.0.1:1", "username_file":
               str(tmp_path / "user"), "password_file": str(tmp_path / "password"), **extra}
    body = ", ".join(f"{k}: {v}" for k, v in options.items())
    return f"meters: {{redfish: {{{body}}}}}\n"


def test_redfish_on_reads_its_credentials_now(tmp_path) -> None:
    config = config_from(tmp_path, redfish_yaml(tmp_path, chassis="1U", interval="15s",
                                                stale_after="2m", auth="basic"))
    (meter,) = build_platform_meters(config, start_threads=False)
    assert isinstance(meter, RedfishMeter)
    assert (meter.chassis, meter.interval_seconds, meter.stale_after_seconds) == ("1U", 15, 120)
    assert "s3cret" not in repr(vars(meter.client))


@pytest.mark.parametrize(("extra", "key"), [
    ({"password_file": "/nonexistent/pw"}, "meters.redfish.password_file"),
    ({"username_file": "/nonexistent/user"}, "meters.redfish.username_file"),
    ({"ca_file": "/nonexistent/ca.pem"}, "meters.redfish.ca_file"),
])  # fmt: skip
def test_unreadable_credential_and_ca_files_name_their_key(tmp_path, extra, key) -> None:
    config = config_from(tmp_path, redfish_yaml(tmp_path, **extra))
    with pytest.raises(ConfigError) as info:
        build_platform_meters(config, start_threads=False)
    assert info.value.key == key


def test_a_ca_file_that_is_no_certificate(tmp_path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    config = config_from(tmp_path, redfish_yaml(tmp_path, ca_file=str(tmp_path / "ca.pem")))
    with pytest.raises(ConfigError) as info:
        build_platform_meters(config, start_threads=False)
    assert info.value.key == "meters.redfish.ca_file"


@pytest.mark.parametrize(("text", "key"), [
    ("meters: {redfish: {enabled: on}}", "meters.redfish.url"),
    ("meters: {redfish: {enabled: on, url: 'http://bmc'}}", "meters.redfish.url"),
    ("meters: {redfish: {enabled: on, url: 'https://u:p@bmc'}}", "meters.redfish.url"),
    ("meters: {redfish: {enabled: auto}}", "meters.redfish.enabled"),
    ("meters: {redfish: {insecure: 'yes'}}", "meters.redfish.insecure"),
    ("meters: {redfish: {chassis: '../x'}}", "meters.redfish.chassis"),
    ("meters: {redfish: {auth: digest}}", "meters.redfish.auth"),
    ("meters: {redfish: {interval: -5s}}", "meters.redfish.interval"),
    ("meters: {acpi: {enabled: sometimes}}", "meters.acpi.enabled"),
    ("meters: {ipmi: {device: 5}}", "meters.ipmi.device"),
    ("meters: {ipmi: {interval: 0}}", "meters.ipmi.interval"),
    ("meters: {ipmi: []}", "meters.ipmi"),
    ("attribution: {platform: everyone}", "attribution.platform"),
])  # fmt: skip
def test_bad_platform_keys_name_the_key(tmp_path, text, key) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(tmp_path, text + "\n")
    assert info.value.key == key


def test_redfish_rules_between_keys(tmp_path) -> None:
    for extra, key in (({"timeout": "20s"}, "meters.redfish.timeout"),
                       ({"stale_after": "5s"}, "meters.redfish.stale_after"),
                       ({"insecure": "true", "ca_file": "/x"}, "meters.redfish.insecure")):
        with pytest.raises(ConfigError) as info:
            config_from(tmp_path, redfish_yaml(tmp_path, **extra))
        assert info.value.key == key


def test_the_command_line_exits_2_with_one_line(tmp_path) -> None:
    import subprocess
    import sys

    path = tmp_path / "carbond.yaml"
    path.write_text("meters: {redfish: {enabled: on, url: 'http://bmc.example'}}\n")
    done = subprocess.run([sys.executable, "-m", "carbond", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "carbond: error: meters.redfish.url: expected an https:// URL of the BMC (credentials "
        "never travel in clear), got 'http://bmc.example'"]
