from __future__ import annotations

import pytest

from student_models import hashing


@pytest.fixture(autouse=True)
def private_hash_memo(tmp_path, monkeypatch):
    """Each test remembers file hashes in its own memo, never in the user's torch hub folder."""
    memo = tmp_path / "memo" / "sha256.json"
    monkeypatch.setattr(hashing, "memo_path", lambda: memo)
    return memo


@pytest.fixture
def hash_calls(monkeypatch):
    """Counts the files actually read and hashed (hash-memo hits do not count)."""
    calls = []
    real = hashing._hash_file

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(hashing, "_hash_file", counting)
    return calls
