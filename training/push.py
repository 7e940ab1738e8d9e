"""Atomic pushes of SavedModel versions into a TF Serving model base path.

A model server polls `<base>/<name>/` for integer directories and loads any it sees, so a
version directory must never be visible half-written. A push therefore copies the export into
a staging directory whose name is not an integer (the server ignores it), on the same
filesystem, writing saved_model.pb last, then renames it into place: one atomic step.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from serving.tfserving.versions import GRAPH_FILE, latest_version

STAGING_PREFIX = ".push-"
HIGH_WATER = ".highest-version"  # numbers are never reused, even after a rollback removed one
LOCK = ".push.lock"  # pushers take numbers one at a time (flock: same host, or a shared volume)
STALE_AFTER_SECONDS = 24 * 3600
ANY = object()


class LatestChanged(RuntimeError):
    """Another version was pushed (or the latest removed) since the candidate was judged."""

    def __init__(self, latest: int | None):
        super().__init__(f"the latest version is now {latest}")
        self.latest = latest


def push_version(export_dir: Path, model_dir: Path, expect_latest=ANY) -> int:
    """Copy `export_dir` into `model_dir` as the next integer version, atomically. Returns it.
    With `expect_latest` (a version, or None for none yet), push only if that is still the latest
    version when the number is taken, else raise LatestChanged: a candidate judged against one
    version must not land on top of another that was pushed meanwhile."""
    export_dir, model_dir = Path(export_dir), Path(model_dir)
    if not (export_dir / GRAPH_FILE).is_file():
        raise FileNotFoundError(f"{export_dir} holds no saved_model.pb")
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(model_dir)
    staging = model_dir / f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _copy_saved_model_last(export_dir, staging)  # the slow part, outside the lock
        with _locked(model_dir):
            if expect_latest is not ANY and (latest := latest_version(model_dir)) != expect_latest:
                raise LatestChanged(latest)
            while True:
                existing = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
                version = max(existing + [_high_water(model_dir)], default=0) + 1
                try:
                    # rename(2) of a directory onto a non-empty one fails, so a pusher that took
                    # this number first (one that does not share the lock) makes us try the next.
                    os.rename(staging, model_dir / str(version))
                    break
                except OSError:
                    if not (model_dir / str(version)).exists():
                        raise
            _record_high_water(model_dir, version)
            _fsync_dir(model_dir)
        return version
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _locked(model_dir: Path):
    """An exclusive flock on <model>/.push.lock. Read-only, so that a lock file another user made
    serves every pusher that may write the folder; a filesystem without locks gets a warning and
    no lock (the rename below still hands out distinct numbers; only the expect_latest check then
    stops being atomic)."""
    fd = os.open(model_dir / LOCK, os.O_RDONLY | os.O_CREAT, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: {model_dir} cannot be locked ({error.strerror}): pushing unlocked",
                  file=sys.stderr, flush=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def _high_water(model_dir: Path) -> int:
    try:
        return int((model_dir / HIGH_WATER).read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


def _record_high_water(model_dir: Path, version: int) -> None:
    if version <= _high_water(model_dir):
        return
    tmp = model_dir / f"{HIGH_WATER}.{os.getpid()}.tmp"
    tmp.write_text(f"{version}\n")
    os.replace(tmp, model_dir / HIGH_WATER)


def remove_stale_staging(model_dir: Path) -> None:
    """Remove staging directories left by pushes that were killed (their process is gone)."""
    host = socket.gethostname()
    for path in model_dir.glob(STAGING_PREFIX + "*"):
        parts = path.name[len(STAGING_PREFIX):].rsplit("-", 2)
        same_host_and_dead = (len(parts) == 3 and parts[0] == host and parts[1].isdigit()
                              and not _pid_alive(int(parts[1])))
        try:
            too_old = time.time() - path.stat().st_mtime > STALE_AFTER_SECONDS
        except FileNotFoundError:  # its push has just renamed it into a version, or another removed it
            continue
        if same_host_and_dead or too_old:
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_saved_model_last(src: Path, dst: Path) -> None:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(src) == Path(GRAPH_FILE))  # the graph goes last
    for path in files:
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())
    for folder in sorted({p.parent for p in dst.rglob("*")} | {dst}, reverse=True):
        _fsync_dir(folder)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
