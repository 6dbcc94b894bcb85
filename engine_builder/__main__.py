"""``python -m engine_builder``: see engine_builder/cli.py."""

from __future__ import annotations

from engine_builder.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
