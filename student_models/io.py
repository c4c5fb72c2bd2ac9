"""Files that a kill, a full disk or a crash never leave half-written.

`atomic_write` opens a temporary file beside the target (same folder, so the final rename stays on
one filesystem), and only when the block ends without an error flushes it to disk and renames it
over the target: a reader sees the old file or the new one, never a mix. An error removes the
temporary file. A process killed mid-write leaves its temporary file behind; its name carries the
writer's pid (``.<name>.tmp<pid>``, the same pattern as `atomic_torch_save`), so
`remove_stale_temp_files` can tell leftovers of dead writers from files being written now.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name this process writes `path` under: ``.<name>.tmp<pid>`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every platform can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: `path` appears complete when the block ends, or not at all.

    `mode` is "w" (text, `encoding` defaults to UTF-8) or "wb". The folder must exist.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = temp_path(path)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:  # e.g. a pid out of range
        return False
    return True


def remove_stale_temp_files(folder: str | os.PathLike, pattern: str = ".*.tmp*") -> list[Path]:
    """Delete temporary files (``.<name>.tmp<pid>``) in `folder` whose writer is no longer running.

    `pattern` is a glob relative to `folder` ("*/.*.tmp*" for one level of subfolders). The pid is
    checked on this machine only: call it before this job's writers start, not while another
    machine may write into the same folder. Returns the files removed.
    """
    removed = []
    for candidate in sorted(Path(folder).glob(pattern)):
        match = _TEMP_NAME.match(candidate.name)
        if match and candidate.is_file() and not _alive(int(match["pid"])):
            with contextlib.suppress(OSError):  # gone already, or a read-only folder: nothing to clean there
                candidate.unlink()
                removed.append(candidate)
    return removed


def writable_folder(folder: str | os.PathLike, what: str = "output folder", flag: str = "--out") -> Path:
    """Create `folder` and write a file in it, or raise OSError with one line that says why (before any long step).

    `what` names the folder in the message ("output folder", "teacher-cache folder") and `flag` the option
    that chooses it. Where the failure is at another path (a parent that cannot be created), it is named too.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OSError(f"cannot use {folder} as the {what}: it is a file; {flag} must name a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(folder) else ""
        raise OSError(
            f"cannot write to the {what} {folder}: {exc.strerror or exc}{where}; choose another {flag}"
        ) from None
    return folder
