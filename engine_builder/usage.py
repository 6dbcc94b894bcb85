"""The error a subcommand raises for bad command-line input; ``main`` turns it into exit 2."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad command-line input. ``flag`` names it (``--group-size``, ``DIR``) in the message."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
