"""Command-line input: the error a subcommand raises for it (``main`` turns it into exit 2), and
what the GPU builders share in reading their flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

# The main build parser's flags a GPU builder takes as they are (None when not given).
SHARED_BUILD_FLAGS = ("quant", "kv_cache_dtype", "max_batch_size", "max_seq_len",
                      "max_num_tokens", "tokens_per_block")


class UsageError(ValueError):
    """Bad command-line input. ``flag`` names it (``--group-size``, ``DIR``) in the message."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def backend_flags(args: argparse.Namespace, add_arguments: Callable[[Any], None],
                  backend: str) -> argparse.Namespace:
    """``args.extra_args`` parsed with a backend's own flags; a flag the main parser already
    took (it may add them for --help) keeps its value. ValueError for an unknown flag."""
    parser = argparse.ArgumentParser(prog=f"build --backend {backend}", add_help=False)
    add_arguments(parser)
    try:
        extra = parser.parse_args(list(getattr(args, "extra_args", None) or []))
    except SystemExit:
        raise ValueError(f"unrecognized {backend} build flags (see the message above)") from None
    for name, value in vars(extra).items():
        if value is None and getattr(args, name, None) is not None:
            setattr(extra, name, getattr(args, name))
    return extra


def given(args: argparse.Namespace, extra: argparse.Namespace,
          names: Iterable[str]) -> dict[str, Any]:
    """The shared build flags and the backend's ``names`` that were given (not None)."""
    values = {name: getattr(args, name, None) for name in SHARED_BUILD_FLAGS}
    values.update({name: getattr(extra, name) for name in names})
    return {k: v for k, v in values.items() if v is not None}


def check_positive(flags: Iterable[tuple[str, int]]) -> None:
    """ValueError naming the first flag below 1."""
    for flag, value in flags:
        if value < 1:
            raise ValueError(f"{flag}: must be >= 1, got {value}")
