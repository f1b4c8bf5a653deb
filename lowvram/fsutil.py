"""The one place that writes files: atomically (temp file in the same folder, fsync, rename).

A reader never sees a half-written file; a killed writer leaves at most a `.tmp-*` file that is ignored and cleaned.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lowvram.errors import LowvramError

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`, else removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    except OSError as e:
        raise (_user_write_error(path, e) or e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        user_error = _user_write_error(path, e)
        if user_error is not None:
            raise user_error from None
        raise


# A full disk or a read-only folder is the user's to fix: one line, not a traceback (the temp file is gone already).
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def _user_write_error(path: Path, err: BaseException) -> LowvramError | None:
    code = getattr(err, "errno", None)
    if code is None and "No space left on device" in str(err):  # safetensors wraps the OS error in its own
        code = errno.ENOSPC
    if code not in _WRITE_ERRNOS:
        return None
    hint = "free disk space or choose another folder" if code in (errno.ENOSPC, errno.EDQUOT) else (
        "choose a writable folder")
    return LowvramError(f"cannot write {path}: {_WRITE_ERRNOS[code]}; {hint}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` through a temp file + rename."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def clean_stale_temp_files(folder: str | os.PathLike) -> int:
    """Remove temp files a killed writer left behind in `folder` (not recursive). Returns how many."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed += 1
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: some filesystems refuse directory fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
