"""A stderr that says it is a terminal, for testing what a user at a terminal sees."""

from __future__ import annotations

import io
import sys

import pytest


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def on_terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    """Makes stderr a terminal; call it in the test itself (pytest's capture resets stderr
    between a fixture's setup and the test)."""
    out = Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    return out
