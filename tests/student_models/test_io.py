"""Atomic writes and the clean-up of what a killed writer leaves."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from student_models.io import atomic_write, atomic_write_text, remove_stale_temp_files, temp_path, writable_folder


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"old": 1}')
    assert path.read_text() == '{"old": 1}'
    with pytest.raises(RuntimeError, match="disk full, say"):
        with atomic_write(path) as f:
            f.write('{"new": ')
            raise RuntimeError("disk full, say")
    assert path.read_text() == '{"old": 1}'  # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left
    with atomic_write(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_write(path, "a"):
            pass


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    stale = tmp_path / f".log.jsonl.tmp{dead}"
    mine = temp_path(tmp_path / "config.json")
    assert mine.name == f".config.json.tmp{os.getpid()}"
    keep = [mine, tmp_path / "notes.tmp123", tmp_path / ".hidden", tmp_path / "sub" / f".x.tmp{dead}"]
    (tmp_path / "sub").mkdir()
    for path in [stale, *keep]:
        path.write_text("x")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and all(p.exists() for p in keep)
    assert remove_stale_temp_files(tmp_path, "*/.*.tmp*") == [tmp_path / "sub" / f".x.tmp{dead}"]


def test_an_output_folder_that_is_a_file_is_named_as_such(tmp_path):
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    with pytest.raises(OSError, match=r"results\.json as the output folder: it is a file; --out must name a folder"):
        writable_folder(existing)
    assert existing.read_text() == "{}"
    assert writable_folder(tmp_path / "new" / "folder").is_dir()


def test_a_folder_that_cannot_be_made_is_named_with_its_role_and_option(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    message = rf"cannot write to the teacher-cache folder {blocker}/cache: Not a directory; choose another --cache-dir$"
    with pytest.raises(OSError, match=message):
        writable_folder(blocker / "cache", "teacher-cache folder", "--cache-dir")
    assert blocker.read_text() == "keep me"
