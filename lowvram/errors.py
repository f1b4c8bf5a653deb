"""User-facing errors: one clear line, a chosen exit code, no traceback.

Anything raised as a `LowvramError` is printed by the CLI as a single line; everything else is a bug.
"""

from __future__ import annotations


class LowvramError(Exception):
    """A failure the user can fix. `str(err)` is the one line shown; `exit_code` is 1 (runtime) or 2 (usage)."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(LowvramError):
    """Bad input from the user: unknown key, wrong type, impossible value, unknown profile (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or a config value is wrong."""
