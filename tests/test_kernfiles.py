"""The one mountinfo parser (workloads/kernfiles.py), and what its callers make of it over
fake /proc trees."""

from __future__ import annotations

from pathlib import Path

from carbond.workloads.cgroups import cgroup_root
from carbond.workloads.cpu import host_cpuacct_root
from carbond.workloads.kernfiles import (
    Mount,
    mount_fstype,
    mount_of,
    parse_mountinfo,
    read_mountinfo,
)

MOUNTINFO = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    "30 27 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n"
    "35 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:15 master:3 - cgroup cgroup "
    "rw,cpu,cpuacct\n"
    "40 27 0:40 /data\\040dir /mnt/my\\040disk rw - ext4 /dev/my\\134disk rw\n"
    "41 27 0:41 / /srv rw - tmpfs  rw\n"
)


def test_mountinfo_fields_with_optional_tags_and_an_empty_source() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mount_point for m in mounts] == [
        "/proc", "/", "/sys/fs/cgroup", "/sys/fs/cgroup/cpu,cpuacct", "/mnt/my disk", "/srv"
    ]
    assert mounts[0] == Mount(22, 27, "0:21", "/", "/proc", ("rw", "relatime"), (), "proc",
                              "proc", ("rw",))
    cpuacct = mounts[3]
    assert cpuacct.tags == ("shared:15", "master:3")
    assert (cpuacct.fstype, cpuacct.source) == ("cgroup", "cgroup")
    assert cpuacct.super_options == ("rw", "cpu", "cpuacct")
    assert (mounts[5].fstype, mounts[5].source) == ("tmpfs", "")


def test_mountinfo_octal_escapes_are_undone() -> None:
    disk = parse_mountinfo(MOUNTINFO)[4]
    assert (disk.root, disk.mount_point) == ("/data dir", "/mnt/my disk")
    assert disk.source == "/dev/my\\disk"
    text = "1 0 0:1 / /a\\011tab\\012nl\\134x\\303\\251 rw - tmpfs t rw\n"
    assert parse_mountinfo(text)[0].mount_point == "/a\ttab\nnl\\xé"


def test_mountinfo_skips_lines_it_cannot_read() -> None:
    text = "\n".join([
        "",
        "garbage",
        "x 27 0:21 / /bad rw - proc proc rw",  # mount id not a number
        "22 27 0:21 / /nosep rw proc proc rw",  # no separator
        "22 27 0:21 / /short rw - proc proc",  # nothing after the source
        "23 27 0:21 / /good rw - proc proc rw",
    ])
    assert [m.mount_point for m in parse_mountinfo(text)] == ["/good"]


def test_mount_of_takes_the_deepest_mount_and_the_last_on_one_point() -> None:
    mounts = parse_mountinfo(
        MOUNTINFO + "50 30 0:50 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n"
    )
    assert mount_of("/sys/fs/cgroup/cpu,cpuacct/a", mounts).mount_id == 35
    assert mount_of("/sys/fs/cgroup/unified", mounts).fstype == "cgroup2"  # hides the tmpfs
    assert mount_of("/sys/fs/cgroupies", mounts).mount_point == "/"
    assert mount_of("/mnt/my disk/x", mounts).mount_id == 40
    assert mount_of("/x", []) is None


def write_mountinfo(proc: Path, text: str) -> None:
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self" / "mountinfo").write_text(text)


def test_mountinfo_readers_over_a_fake_proc(tmp_path: Path) -> None:
    proc, disk = tmp_path / "proc", tmp_path.resolve() / "my disk"
    (disk / "sub").mkdir(parents=True)
    escaped = str(disk).replace(" ", "\\040")
    write_mountinfo(proc, f"1 0 0:1 / / rw - ext4 /dev/sda rw\n"
                          f"2 1 0:2 / {escaped} rw - xfs /dev/sdb rw\n")
    assert read_mountinfo(str(proc))[1].mount_point == str(disk)
    assert mount_fstype(str(disk / "sub"), str(proc)) == "xfs"
    assert read_mountinfo(str(tmp_path / "none")) == []
    assert mount_fstype(str(disk), str(tmp_path / "none")) is None


def test_a_cgroup_root_path_inside_its_mount(tmp_path: Path) -> None:
    proc, mnt = tmp_path / "proc", tmp_path.resolve() / "cg root"
    (mnt / "a" / "b").mkdir(parents=True)
    (mnt / "a" / "b" / "cpu.stat").write_text("usage_usec 0\n")
    escaped = str(mnt).replace(" ", "\\040")
    write_mountinfo(proc, f"1 0 0:1 / / rw - ext4 /dev/sda rw\n"
                          f"2 1 0:2 / {escaped} rw shared:4 - cgroup2 cgroup2 rw\n")
    assert cgroup_root(str(mnt / "a" / "b"), str(proc)).rel == "/a/b"
    write_mountinfo(proc, "1 0 0:1 / / rw - ext4 /dev/sda rw\n")  # no cgroup mount at all
    assert cgroup_root(str(mnt / "a" / "b"), str(proc)).rel == "/"


def test_the_host_cpuacct_root_is_a_whole_hierarchy_with_release_agent(tmp_path: Path) -> None:
    proc, whole, sub = tmp_path / "proc", tmp_path / "cpu acct", tmp_path / "ns"
    for directory in (whole, sub):
        directory.mkdir()
        (directory / "cpuacct.usage").write_text("0\n")
    (whole / "release_agent").write_text("")
    ns, host = str(sub), str(whole).replace(" ", "\\040")
    write_mountinfo(proc, f"1 0 0:1 /docker/x {ns} rw - cgroup cgroup rw,cpuacct\n"
                          f"2 0 0:1 / {host} rw master:2 - cgroup cgroup rw,cpu,cpuacct\n")
    assert host_cpuacct_root(str(proc)) == str(whole)
    write_mountinfo(proc, f"1 0 0:1 /docker/x {ns} rw - cgroup cgroup rw,cpuacct\n")
    assert host_cpuacct_root(str(proc)) is None
    assert host_cpuacct_root(str(tmp_path / "none")) is None
