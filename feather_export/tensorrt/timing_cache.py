"""The tactic timing cache file shared by engine builds (``--timing-cache``).

Pure file handling; the TensorRT side (``create_timing_cache``, ``combine``, ``serialize``) is in
``build.py``. Why not polygraphy's ``load_timing_cache``/``save_timing_cache`` paths: polygraphy
(0.49-0.53, ``EngineBytesFromNetwork``) opens ``<cache>.lock`` *after* the engine is built,
outside any ``try``, so a cache in a directory that does not exist raises ``FileNotFoundError``
and the finished engine is lost; and it deliberately never deletes that ``.lock`` file (deleting a
lock file other processes may hold is unsafe), so one is left beside every cache.

Here: ``prepare`` creates the directories and refuses a place that cannot hold the cache before
any build starts; ``save`` merges with what is on disk and replaces the file atomically, under an
exclusive ``flock`` on the cache's *directory* (no lock file of its own); file errors are
``FeatherError``.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

from feather_export.errors import FeatherError

try:
    import fcntl
except ImportError:                      # not POSIX: builds sharing a cache are not serialized
    fcntl = None


class TimingCacheFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    def prepare(self) -> None:
        """Create the parent directories; refuse a directory, or a place we cannot write."""
        if self.path.is_dir():
            raise FeatherError(f"timing cache {self.path} is a directory; give a file path "
                               f"(e.g. {self.path / 'timing.cache'})")
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FeatherError(f"cannot create the timing cache directory {parent}: "
                               f"{exc.strerror or exc}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise FeatherError(f"cannot write the timing cache in {parent} (permission denied); "
                               "pass --timing-cache with a writable path")
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            raise FeatherError(f"cannot read and write the timing cache {self.path} "
                               "(permission denied)")

    def read(self) -> bytes | None:
        """The cache's bytes, or None when there is none yet (or it is empty)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FeatherError(f"cannot read the timing cache {self.path}: {exc.strerror or exc}") from None
        return data or None

    def save(self, merged: Callable[[bytes | None], bytes]) -> None:
        """Write ``merged(bytes on disk now)`` atomically (temp file + rename), while holding the
        directory lock, so concurrent builds sharing the cache combine instead of overwriting."""
        parent = self.path.parent
        tmp = parent / f".{self.path.name}.{os.getpid()}.tmp"
        try:
            with _directory_lock(parent):
                data = merged(self.read())
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
        except OSError as exc:
            raise FeatherError(f"cannot write the timing cache {self.path}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _directory_lock(directory: Path):
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # released when fd is closed
        yield
    finally:
        os.close(fd)
