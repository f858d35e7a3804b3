"""Files of a run directory: atomic text writes, leftovers of killed writes, the run-directory lock
and the size + sha256 records of artifacts (docs/design.md §2.8). No torch here."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
from pathlib import Path

LOCK_NAME = ".m2mkd.lock"
_TEMP = re.compile(r"^\..+\.tmp\d+$")  # what temp_path names: .<name>.tmp<pid>


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit the run that loads it."""


class ArtifactError(CheckpointError):
    """A finished artifact does not match its done record (changed, truncated or corrupted)."""


class RunDirBusy(CheckpointError):
    """Another process holds the run directory's lock."""


def write_error(path, err: Exception) -> OSError:
    """An OSError naming the file (a full disk's error does not) for a failed write of ``path``."""
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC or "StorageFull" in str(err) or "No space left" in str(err):
        return OSError(errno.ENOSPC, f"cannot write {path}: no space left on the device")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OSError(code, f"cannot write {path}: {err.strerror} (read-only or no permission)")
    return OSError(code or errno.EIO, f"cannot write {path}: {getattr(err, 'strerror', None) or err}")


def temp_path(path: Path) -> Path:
    """The temporary file a write of ``path`` goes through (same folder, per process)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. directories on some file systems
        pass
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path``: temp file in the same folder, fsync, rename, fsync the folder.
    Raises OSError naming ``path`` when the disk is full or not writable."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as err:
        raise write_error(path, err) from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_leftovers(folder, recursive: bool = False) -> list[Path]:
    """Delete the temp files of writes killed midway (``.<name>.tmp<pid>``) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in (folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*"))
             if p.is_file() and _TEMP.match(p.name)]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def lock_run_dir(folder, shared: bool = False):
    """Lock ``folder`` (flock on ``folder/.m2mkd.lock``) until the returned file is closed or
    the process ends (the OS releases it, so a killed run never blocks the next one).

    ``shared``: several processes that each work on their own part of the folder may hold it
    together (independent ``distill --module i`` runs); an exclusive holder excludes everyone.
    Raises RunDirBusy naming the folder and the holder's pid."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    except OSError as err:
        raise write_error(path, err) from err
    try:
        fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunDirBusy(f"run directory {folder} is in use by process {holder} (lock {path}); "
                         "wait for it to finish or use another --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def file_record(path) -> dict:
    """{"size": bytes, "sha256": hex digest} of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": h.hexdigest()}


def verify_file(path, record: dict | None, redo: str):
    """Check ``path`` against its record ({"size", "sha256"}); raise ArtifactError naming the
    file and the command ``redo`` that rewrites it."""
    path = Path(path)
    if record is None:
        raise ArtifactError(f"{path} has no size/sha256 record in its done record; redo it: {redo}")
    if not path.is_file():
        problem = "is missing"
    elif path.stat().st_size != record["size"]:
        problem = f"has {path.stat().st_size} bytes, its done record says {record['size']}"
    elif file_record(path)["sha256"] != record["sha256"]:
        problem = "does not match the sha256 of its done record"
    else:
        return
    raise ArtifactError(f"{path} {problem}: it was changed or corrupted after it was written; redo it: {redo}")
