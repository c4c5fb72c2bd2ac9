from __future__ import annotations

import hashlib
import json
import os
import time

from student_models import hashing

OLD_NS = 1_600_000_000 * 10**9  # a modification time well in the past (September 2020)


def old_file(path, content: bytes):
    path.write_bytes(content)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    return path


def test_digest_is_the_files_sha256(tmp_path):
    path = old_file(tmp_path / "w.bin", b"weights" * 1000)
    assert hashing.sha256_file(path) == hashlib.sha256(b"weights" * 1000).hexdigest()


def test_second_call_is_served_from_the_memo(tmp_path, hash_calls, private_hash_memo):
    path = old_file(tmp_path / "w.bin", b"abc")
    assert hashing.sha256_file(path) == hashing.sha256_file(tmp_path / "." / "w.bin")
    assert len(hash_calls) == 1
    entry = json.loads(private_hash_memo.read_text())["files"][str(path.resolve())]
    assert entry["size"] == 3 and entry["mtime_ns"] == OLD_NS and entry["sha256"] == hashlib.sha256(b"abc").hexdigest()


def test_a_same_size_rewrite_with_its_old_mtime_restored_is_hashed_again(tmp_path, hash_calls):
    path = old_file(tmp_path / "w.bin", b"abc")
    first = hashing.sha256_file(path)
    time.sleep(0.05)  # past the file system's coarse clock tick, so the change time moves
    old_file(path, b"abd")  # same size, same mtime (as `cp -p` or `rsync -t` would leave it)
    assert hashing.sha256_file(path) == hashlib.sha256(b"abd").hexdigest() != first
    assert len(hash_calls) == 2


def test_a_file_modified_just_now_is_not_remembered(tmp_path, hash_calls, private_hash_memo):
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"abc")  # its mtime may still share a clock tick with a rewrite to come
    hashing.sha256_file(path)
    hashing.sha256_file(path)
    assert len(hash_calls) == 2 and not private_hash_memo.exists()


def test_a_broken_or_unwritable_memo_only_means_hashing_again(tmp_path, monkeypatch, hash_calls, private_hash_memo):
    path = old_file(tmp_path / "w.bin", b"abc")
    private_hash_memo.parent.mkdir()
    private_hash_memo.write_text("{not json")
    assert hashing.sha256_file(path) == hashlib.sha256(b"abc").hexdigest()
    assert json.loads(private_hash_memo.read_text())["files"]  # rewritten whole

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(hashing, "memo_path", lambda: tmp_path / "a_file" / "memo.json")  # cannot be created
    assert hashing.sha256_file(path) == hashlib.sha256(b"abc").hexdigest()
    assert len(hash_calls) == 2 and not list(tmp_path.rglob(".memo.json.tmp*"))


def test_entries_of_changed_or_deleted_files_are_dropped(tmp_path, private_hash_memo):
    gone = old_file(tmp_path / "gone.bin", b"1")
    kept = old_file(tmp_path / "kept.bin", b"2")
    hashing.sha256_file(gone)
    hashing.sha256_file(kept)
    gone.unlink()
    hashing.sha256_file(old_file(tmp_path / "new.bin", b"3"))
    files = json.loads(private_hash_memo.read_text())["files"]
    assert sorted(files) == sorted(str(p.resolve()) for p in (kept, tmp_path / "new.bin"))
