"""The one place that writes files: atomically (temp file in the same folder, fsync, rename).

A reader never sees a half-written file; a killed writer leaves at most a `.tmp-*` file that is ignored and cleaned.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
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
        tmp_path = _new_temp_file(path)
    except OSError as e:
        raise (_user_write_error(path, e) or e) from None
    try:
        created_mode = stat.S_IMODE(tmp_path.stat().st_mode)  # 0666 less the umask, as the kernel applied it
        yield tmp_path
        if stat.S_IMODE(tmp_path.stat().st_mode) != created_mode:
            os.chmod(tmp_path, created_mode)  # safetensors replaces the file with its own 0600 temporary
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


def _new_temp_file(path: Path) -> Path:
    """An empty new file beside `path`, created with mode 0666 so the kernel applies the user's umask (and a
    folder's default ACL). `tempfile.mkstemp` creates 0600: a ComfyUI service running as another user could not
    read the LoRA."""
    for _ in range(100):
        tmp = path.parent / f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def make_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new empty folder `.tmp-NAME.xxxx` in `parent`, mode 0777 less the umask (`tempfile.mkdtemp` makes 0700)."""
    parent = Path(parent)
    for _ in range(100):
        tmp = parent / f"{TMP_PREFIX}{name}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir(mode=0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {parent}")


# A full disk or a read-only folder is the user's to fix: one line, not a traceback (the temp file is gone already).
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is larger than this file system (or the process's file-size limit) allows",
}
_HINTS = {
    errno.ENOSPC: "free disk space or choose another folder",
    errno.EDQUOT: "free disk space or choose another folder",
    # FAT32 caps a file at 4 GiB: a real LoRA checkpoint or latent cache passes that on a USB drive.
    errno.EFBIG: "FAT32-formatted drives cap files at 4 GiB: write to an NTFS, exFAT, ext4 or APFS drive "
    "(or raise `ulimit -f`)",
}
# safetensors (Rust) wraps the OS error in its own exception: "... File too large (os error 27)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _user_write_error(path: Path, err: BaseException) -> LowvramError | None:
    code = getattr(err, "errno", None)
    if code is None:
        match = _RUST_OS_ERROR.search(str(err))
        code = int(match.group(1)) if match else (errno.ENOSPC if "No space left on device" in str(err) else None)
    if code not in _WRITE_ERRNOS:
        return None
    return LowvramError(f"cannot write {path}: {_WRITE_ERRNOS[code]}; {_HINTS.get(code, 'choose a writable folder')}")


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
