"""``LESIONSERVE_MODEL_WATCH=true``: reload when the model file is replaced by an atomic rename.

Polling ``os.stat`` every ``MODEL_WATCH_INTERVAL_S`` (no inotify dependency; works on NFS and on
Kubernetes volumes, whose updates are renames of a symlink, which ``stat`` follows). A file is
taken only when its identity changed (a new inode: ``mv new.onnx model.onnx`` or a symlink
swap) and then stayed the same for one more interval (debounce: several renames in a row give
one reload, of the last file). A file written in place (same inode) may be half-written at any
poll, so it is never loaded: the watcher logs a warning saying how to replace it. A file that
was refused is not tried again until it is replaced again.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import NamedTuple

from service.errors import ModelRejected, ReloadInProgress, ServiceError
from service.swap.reloader import Reloader

log = logging.getLogger(__name__)


class FileId(NamedTuple):
    device: int
    inode: int
    size: int
    mtime_ns: int


def file_id(path: Path) -> FileId | None:
    """The identity of the file at ``path`` (symlinks followed), or None while there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileId(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ModelWatcher:
    """A daemon thread that calls :meth:`Reloader.reload` when the model file is replaced.

    Args:
        reloader: the reloader (its ``path`` is the file watched; it follows API reloads of another file).
        interval_s: seconds between two looks at the file.
    """

    def __init__(self, reloader: Reloader, interval_s: float) -> None:
        self.reloader = reloader
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lesionserve-model-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("watching the model file", extra={"path": str(self.reloader.path), "interval_s": self.interval_s})

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval_s + 1)

    def _loop(self) -> None:
        path = self.reloader.path
        seen = file_id(path)  # the file being served
        warned: FileId | None = None
        while not self._stop.wait(self.interval_s):
            if self.reloader.path != path:  # an API reload took another file: watch that one from now on
                path, seen = self.reloader.path, file_id(self.reloader.path)
            now = file_id(path)
            if now is None or now == seen:
                continue  # no file (between an unlink and a rename) or nothing new
            if seen is not None and (now.device, now.inode) == (seen.device, seen.inode):
                if now != warned:
                    log.warning(
                        "the model file was modified in place and is not reloaded: write the new file beside it,"
                        " then rename it over the old one (mv), so that it is never read half-written",
                        extra={"path": str(path)},
                    )
                    warned = now
                seen = now
                continue
            if self._stop.wait(self.interval_s) or file_id(path) != now:
                continue  # replaced again within the interval: wait for the last one to settle
            if self._reload(path):
                seen = now

    def _reload(self, path: Path) -> bool:
        """Reload; False when it could not start (another reload running): try again at the next look."""
        log.info("the model file was replaced; reloading", extra={"path": str(path)})
        try:
            self.reloader.reload(trigger="watch")
        except ModelRejected:
            pass  # logged and counted by the reloader; the file is not retried until replaced again
        except ReloadInProgress:
            return False
        except ServiceError as exc:  # draining
            log.warning("model reload not started", extra={"trigger": "watch", "detail": exc.detail})
        except Exception:
            log.exception("model reload failed")
        return True
