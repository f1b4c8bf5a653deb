"""The rich console every command prints through.

Piped output (logs, CI, tests) would otherwise be cut to 80 columns and truncate names in tables.
"""

from __future__ import annotations


def make_console(quiet: bool = False):
    from rich.console import Console

    console = Console(quiet=quiet)
    return console if console.is_terminal else Console(width=160, quiet=quiet)
