"""SHA-256 of large files, computed once per version of a file and remembered on disk.

Hashing SAM ViT-H (2.5 GB) takes seconds to minutes, and every command and every torchrun rank
verifies the same file. The digest is remembered in a small JSON file (``memo_path()``) keyed by
the file's resolved path, with its size, modification and change times; any change to the file
(a rewrite, a copy over it, a truncation) changes one of them and the file is hashed again.

Two deliberate limits:
- A file modified less than ``RACY_NS`` before hashing began is hashed but not remembered: the
  file system's clock is coarse (milliseconds), so a same-size rewrite right after hashing could
  keep the same times ("racy git"). It is remembered the next time it is hashed.
- The memo guards against corrupt, truncated and wrong files, not against someone who can rewrite
  both a file and its timestamps.

The memo never fails a caller: one that cannot be read or written only means hashing again.
Concurrent writers (ranks) replace the file atomically; the last one wins, and an entry lost
that way is recomputed later.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

MEMO_FORMAT = "sam-compress/sha256-memo-v1"
RACY_NS = 2_000_000_000  # files modified this recently (ns) before hashing are not remembered


def memo_path() -> Path:
    """The memo file, beside torch hub's checkpoints folder (``$TORCH_HOME/hub``)."""
    return Path(torch.hub.get_dir()) / "sam_compress_sha256.json"


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(stat: os.stat_result) -> dict[str, int]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _read_memo(memo: Path) -> dict[str, dict]:
    try:
        data = json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != MEMO_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _matches(entry: object, stat: os.stat_result) -> bool:
    """Whether a memo entry was made from this very version of the file."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return False
    return {k: entry.get(k) for k in ("size", "mtime_ns", "ctime_ns")} == _fingerprint(stat)


def _still_current(key: str, entry: object) -> bool:
    try:
        return _matches(entry, os.stat(key))
    except OSError:
        return False


def _remember(memo: Path, key: str, entry: dict) -> None:
    """Add `entry` to the memo, drop entries of files that changed or are gone, replace atomically."""
    files = {k: v for k, v in _read_memo(memo).items() if k != key and _still_current(k, v)}
    files[key] = entry
    tmp = memo.with_name(f".{memo.name}.tmp{os.getpid()}")  # the pattern of atomic_torch_save
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": MEMO_FORMAT, "files": files}, indent=1, sort_keys=True))
        os.replace(tmp, memo)
    except OSError:  # read-only home, full disk: the digest is simply not remembered
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at `path`, from the memo when the file has not changed since."""
    path = Path(path).resolve()
    key = str(path)
    stat = path.stat()
    memo = memo_path()
    entry = _read_memo(memo).get(key)
    if _matches(entry, stat):
        return entry["sha256"]
    started_ns = time.time_ns()
    digest = _hash_file(path)
    if stat.st_mtime_ns < started_ns - RACY_NS and _fingerprint(path.stat()) == _fingerprint(stat):
        _remember(memo, key, {**_fingerprint(stat), "sha256": digest})
    return digest
