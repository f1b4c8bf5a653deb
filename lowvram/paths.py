"""Where files may go: paths from configs resolved once, and names lowvram derives kept inside what the user named.

The rule: a folder the user names (output_dir, cache_dir, dataset_dir, a checkpoint) is trusted as named and resolved
(`~` expanded, symlinks followed); anything lowvram builds *inside* it from data (a dataset id, a clip stem, a
checkpoint step, a row of a cache index) must stay inside it, even through `..` or a symlink. It does not sandbox
the process and does not refuse user-named folders anywhere on disk.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from lowvram.errors import LowvramError, UsageError

# One path component (what a dataset id becomes): no separators, no control characters, not '.' or '..'.
_UNSAFE_IN_NAME = re.compile(r"[/\\\x00-\x1f]")


def resolve_user_path(value: str | os.PathLike, *, what: str) -> Path:
    """A path the user named in a config or on the command line, absolute: `~` expanded, symlinks resolved.

    Refuses an empty value or one with a NUL byte (it would be cut short by the OS).
    """
    text = os.fspath(value)
    if not str(text).strip():
        raise UsageError(f"{what} is empty: give a folder or file path")
    if "\0" in str(text):
        raise UsageError(f"{what} contains a NUL byte: give a plain path")
    return Path(text).expanduser().resolve()


def is_inside(path: str | os.PathLike, base: str | os.PathLike) -> bool:
    """Whether `path`, with `..` and symlinks resolved, is `base` itself or somewhere below it."""
    real_base = Path(base).expanduser().resolve()
    real = Path(path).expanduser().resolve()
    return real == real_base or real_base in real.parents


def confine(base: str | os.PathLike, relative: str | os.PathLike, *, what: str) -> Path:
    """`base / relative`, refused (LowvramError) unless it resolves inside `base`.

    For names lowvram derives from data: an absolute `relative`, a `..` or a symlink pointing out of `base` fails.
    """
    base_path = Path(base).expanduser()
    candidate = base_path / relative
    if Path(relative).is_absolute() or not is_inside(candidate, base_path):
        raise LowvramError(
            f"{what} '{relative}' would leave {base_path}: lowvram only writes inside the folders you name"
        )
    return candidate


def check_inside(path: str | os.PathLike, base: str | os.PathLike, *, what: str) -> Path:
    """`path` itself, refused unless it resolves inside `base` (for paths read back from files lowvram wrote)."""
    if not is_inside(path, base):
        raise LowvramError(f"{what} '{path}' points outside {Path(base)}: the file was edited or moved; rebuild it")
    return Path(path)


def safe_name(name: str, *, what: str) -> str:
    """`name` if it is one harmless path component (it becomes a folder or file name), else UsageError."""
    if not name or name in (".", "..") or _UNSAFE_IN_NAME.search(name) or len(name) > 255:
        raise UsageError(f"{what} '{name}' cannot be used as a folder name: give a plain name without '/' or '..'")
    return name


def writable_dir(path: str | os.PathLike, *, what: str) -> Path:
    """Create `path` if needed and prove a file can be created in it; one-line LowvramError otherwise.

    Checked before hours of work start, so a read-only output folder fails at once. It writes a probe file and
    removes it (permission bits alone say nothing when running as root or on a read-only mount).
    """
    folder = resolve_user_path(path, what=what)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} {folder} is a file, not a folder: choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _probe_write(folder)
    except OSError as e:
        reason = e.strerror or str(e)
        raise LowvramError(f"{what} {folder} is not writable ({reason}): choose a writable folder") from None
    return folder


def _probe_write(folder: Path) -> None:
    fd, name = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
    os.close(fd)
    os.unlink(name)
