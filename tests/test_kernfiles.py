"""The one mountinfo parser and the one /proc/PID/cgroup parser (workloads/kernfiles.py), and
what their callers make of them over fake /proc trees."""

from __future__ import annotations

from pathlib import Path

from carbond.workloads.cgroups import cgroup_root
from carbond.workloads.cpu import host_cpuacct_root
from carbond.workloads.gpu import cgroup_of, pid_cgroup
from carbond.workloads.kernfiles import (
    CgroupLine,
    Mount,
    cgroup_line,
    mount_fstype,
    mount_of,
    parse_mountinfo,
    parse_proc_cgroup,
    read_mountinfo,
    read_proc_cgroup,
)
from carbond.workloads.taskstats import live_cgroup, task_cgroup

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


HYBRID = (
    "12:pids:/user.slice\n"
    "4:cpu,cpuacct:/docker/abc\n"
    "1:name=systemd:/system.slice/docker.service\n"
    "0::/system.slice/docker.service\n"
)


def test_proc_cgroup_lines() -> None:
    lines = parse_proc_cgroup(HYBRID)
    assert lines[1] == CgroupLine(4, ("cpu", "cpuacct"), "/docker/abc", False)
    assert lines[2].controllers == ("name=systemd",)
    assert lines[3] == CgroupLine(0, (), "/system.slice/docker.service", False)
    assert lines[3].unified and not lines[1].unified
    assert cgroup_line(lines).path == "/system.slice/docker.service"
    assert cgroup_line(lines, "cpuacct").path == "/docker/abc"
    assert cgroup_line(lines, "cpu").path == "/docker/abc"
    assert cgroup_line(lines, "memory") is None
    assert cgroup_line(parse_proc_cgroup("4:cpu,cpuacct:/a\n")) is None  # pure v1


def test_proc_cgroup_a_removed_v2_cgroup_keeps_its_path() -> None:
    line = cgroup_line(parse_proc_cgroup("2:cpuacct:/\n0::/zz-probe (deleted)\n"))
    assert line == CgroupLine(0, (), "/zz-probe", True)
    # only the v2 line is ever marked by the kernel: a v1 path is taken as written
    v1 = cgroup_line(parse_proc_cgroup("2:cpuacct:/x (deleted)\n"), "cpuacct")
    assert (v1.path, v1.deleted) == ("/x (deleted)", False)


def test_proc_cgroup_hostile_paths() -> None:
    text = "0::/a:b/c\u2028d\x85e\n"  # ':' in a name; line separators other than \n
    assert parse_proc_cgroup(text) == [CgroupLine(0, (), "/a:b/c\u2028d\x85e", False)]
    assert parse_proc_cgroup("\nnot a line\nx:cpu:/a\n0::/ok\n") == [
        CgroupLine(0, (), "/ok", False)
    ]


def write_cgroup(proc: Path, pid: int, text: str) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_bytes(text.encode("utf-8", "surrogateescape"))


def test_callers_agree_on_one_file(tmp_path: Path) -> None:
    """GPU naming and exit placement read the same text the same way, a removed cgroup and a
    missing file included."""
    proc = str(tmp_path)
    write_cgroup(tmp_path, 1, HYBRID)
    write_cgroup(tmp_path, 2, "2:cpuacct:/\n0::/gone.scope (deleted)\n")
    write_cgroup(tmp_path, 3, "4:cpu,cpuacct:/a\n")
    write_cgroup(tmp_path, 4, "0::/b\udcff\n")  # a byte that is not UTF-8
    assert read_proc_cgroup(1, proc) == HYBRID
    assert read_proc_cgroup(9, proc) is None
    assert task_cgroup(proc, 1, "v2") == "/system.slice/docker.service"
    assert task_cgroup(proc, 1, "v1") == "/docker/abc"
    assert task_cgroup(proc, 2, "v2") == pid_cgroup(2, proc) == "/gone.scope"
    assert live_cgroup(proc, 2, "v2") == "/gone.scope"
    assert task_cgroup(proc, 3, "v1") == pid_cgroup(3, proc) == "/a"
    assert task_cgroup(proc, 3, "v2") is None
    assert task_cgroup(proc, 4, "v2") == pid_cgroup(4, proc) == "/b\udcff"
    for pid in (1, 2, 3, 4):
        assert cgroup_of(read_proc_cgroup(pid, proc) or "") == pid_cgroup(pid, proc)
    assert task_cgroup(proc, 9, "v2") is None
    assert task_cgroup(proc, 9, "v1") is None
    assert pid_cgroup(9, proc) is None
