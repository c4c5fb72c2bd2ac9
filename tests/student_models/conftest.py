from __future__ import annotations

import pytest

from student_models import hashing


@pytest.fixture(autouse=True)
def private_hash_memo(tmp_path, monkeypatch):
    """Each test remembers file hashes in its own memo, never in the user's torch hub folder."""
    memo = tmp_path / "memo" / "sha256.json"
    monkeypatch.setattr(hashing, "memo_path", lambda: memo)
    return memo
