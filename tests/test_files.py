"""State files: replaced whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from carbond.runtime.files import write_atomically


def test_write_atomically_leaves_no_temp_files(tmp_path):
    target = tmp_path / "x.json"
    write_atomically(target, "one")
    write_atomically(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_write_atomically_cleans_up_on_failure(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomically(tmp_path / "x.json", "data")
    assert list(tmp_path.iterdir()) == []


def test_state_files_are_not_world_readable(tmp_path):
    write_atomically(tmp_path / "state" / "x.json", "{}")
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "x.json").st_mode) == 0o640
