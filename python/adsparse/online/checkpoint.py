"""Safe, atomic, verified checkpoints of an online run, written at every period end.

A checkpoint is one file, ``online.pt``:

* **Only data.** It holds tensors and plain Python values (state dicts, numbers, strings,
  lists, dicts) and is read with ``torch.load(weights_only=True)``, so a file crafted to run
  code when unpickled is refused instead of executed. Models are stored as state dicts plus
  their block patterns, never as pickled modules.
* **Verified.** The file starts with a header line and the SHA-256 of the payload that
  follows; a truncated, zeroed or otherwise damaged file is reported as such (with its path and
  what to do), never resumed with other numbers.
* **Atomic.** It is written to a temporary file in the same directory, flushed, fsynced and
  then ``os.replace``-d, so a crash while writing leaves the previous checkpoint intact and a
  resumed run restarts at a period boundary that was fully completed. Temporary files left by
  an interrupted write are removed at the next write.
* **One run at a time.** :class:`CheckpointLock` holds an exclusive ``flock`` on
  ``DIR/.lock`` for the whole run; a second run on the same directory is refused at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "CheckpointLock", "load_checkpoint",
           "require_keys", "save_checkpoint"]

CHECKPOINT_NAME = "online.pt"
LOCK_NAME = ".lock"
_MAGIC = b"ADSPARSE-CHECKPOINT 1\n"
_DIGEST_LINE = 64 + 1  # hex SHA-256 and a newline
_TMP_PREFIX, _TMP_SUFFIX = ".online-", ".tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, foreign, from other settings, or in use)."""


def _encode(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def _decode(path: Path, blob: bytes) -> dict[str, Any]:
    fix = f"delete {path} to start the run afresh, or use another --checkpoint-dir"
    if not blob.startswith(_MAGIC):
        raise CheckpointError(f"{path} is not an adsparse checkpoint (no header); {fix}")
    head = len(_MAGIC) + _DIGEST_LINE
    digest, payload = blob[len(_MAGIC):head - 1].decode("ascii", "replace"), blob[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path} is damaged (checksum mismatch: truncated or altered); "
                              f"{fix}")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
        # weights_only refuses anything but tensors and plain data: a payload that would run
        # code ends here, with its checksum intact.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} holds something other than tensors and plain data "
                              f"({first}); {fix}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a run's state; {fix}")
    return state


def _remove_stale_temporaries(directory: Path) -> None:
    # Only one run writes here (the lock), so any temporary file is left from a killed write.
    for tmp in directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and plain data only) to ``directory/online.pt`` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    path = directory / CHECKPOINT_NAME
    blob = _encode(state)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The saved state, or ``None`` when ``directory`` holds no checkpoint yet.

    Raises :class:`CheckpointError` (one line: which file, what is wrong, what to do) for a
    file that is damaged, is not an adsparse checkpoint, or holds anything but data.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    return _decode(path, path.read_bytes())


def require_keys(state: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Raise :class:`CheckpointError` naming the first of ``keys`` missing from ``state``."""
    for key in keys:
        if key not in state:
            raise CheckpointError(f"the checkpoint lacks {where}{key!r} (written by another "
                                  "version?); use another --checkpoint-dir")


class CheckpointLock:
    """Exclusive use of a checkpoint directory for the life of a run (``with`` block).

    The lock is an ``flock`` on ``DIR/.lock``: the kernel drops it when the process dies, so a
    killed run never leaves the directory locked.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._fd: int | None = None

    def __enter__(self) -> CheckpointLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(f"{self.directory} is in use by another run (pid {owner}); "
                                  "wait for it to finish or use another --checkpoint-dir"
                                  ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
