"""Progress bars for long work (fetching, building, profiling, batch jobs), drawn on stderr only
when it is a terminal: logs, pipes and CI output stay clean. ``TQDM_DISABLE=1`` turns them off.

>>> import io
>>> out = io.StringIO()  # not a terminal
>>> with progress(total=3, desc="steps", file=out) as bar:
...     bar.update(3)
>>> out.getvalue()
''
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


def progress(
    *,
    total: float | None,
    desc: str,
    unit: str = "it",
    unit_scale: bool = False,
    file: TextIO | None = None,
) -> tqdm[Any]:
    """A tqdm bar on ``file`` (default: stderr at call time); a no-op unless it is a TTY."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        file=sys.stderr if file is None else file,
        disable=None,  # tqdm's switch: draw only when file.isatty()
        dynamic_ncols=True,
    )
