"""Files of ``python -m client batch``: results written to an output and an error file (as the
OpenAI Batch API splits them) and resumed after an interruption; an upload progress bar.

>>> parse_window("24h"), parse_window("90m"), parse_window("45s"), parse_window("120")
(86400.0, 5400.0, 45.0, 120.0)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from backfill.progress import progress
from client.jobs import result_line
from client.types import BatchResult

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_window(text: str) -> float:
    """A duration such as ``24h``, ``90m``, ``45s`` or plain seconds, in seconds."""
    text = text.strip().lower()
    scale = _UNITS.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"completion window {text!r}: expected e.g. 24h, 90m or 3600") from None
    if seconds <= 0:
        raise ValueError(f"completion window must be positive, got {text!r}")
    return seconds


def errors_path_for(output: Path) -> Path:
    """``out.jsonl`` → ``out.errors.jsonl``."""
    return output.with_name(f"{output.stem}.errors{output.suffix or '.jsonl'}")


class ResultFiles:
    """Successful results go to ``output``, failed ones to ``errors``, one JSON line each, in
    the format each request came in. Opening resumes: whatever complete lines the files hold
    already are results ``0 .. n-1`` of the job (a line cut short by an interruption is
    dropped), so the next one to fetch is ``start_index``."""

    def __init__(self, job_id: str, output: Path, errors: Path) -> None:
        self.job_id = job_id
        self.paths = (output, errors)
        self.start_index = sum(_trim_and_count(path) for path in self.paths)
        self._check_belongs(job_id)
        self._files: list[IO[str]] = [open(p, "a", encoding="utf-8") for p in self.paths]  # noqa: SIM115

    def _check_belongs(self, job_id: str) -> None:
        """The last line of each file must be a result of this job before start_index."""
        for path in self.paths:
            last = _last_line(path)
            if last is None:
                continue
            index, owner = _index_and_job(last)
            if (owner is not None and owner != job_id) or index is None or (
                index >= self.start_index
            ):
                raise ValueError(
                    f"{path} holds lines that are not the first results of job {job_id}; "
                    "give another --output to start afresh"
                )

    def write(self, result: BatchResult) -> None:
        out = self._files[1 if result.error is not None else 0]
        out.write(json.dumps(result_line(self.job_id, result), ensure_ascii=False) + "\n")

    def flush(self) -> None:
        for f in self._files:
            f.flush()

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> ResultFiles:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _trim_and_count(path: Path) -> int:
    """Counts the file's complete lines, first cutting off an incomplete last one."""
    if not path.exists():
        return 0
    count = 0
    with open(path, "rb+") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
        size = f.tell()
        if size and not _ends_with_newline(f, size):
            f.truncate(_last_newline_end(f, size))
    return count


def _ends_with_newline(f: IO[bytes], size: int) -> bool:
    f.seek(size - 1)
    return f.read(1) == b"\n"


def _last_newline_end(f: IO[bytes], size: int) -> int:
    """The offset just past the file's last newline (0 when it has none)."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        f.seek(start)
        block = f.read(end - start)
        at = block.rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def _last_line(path: Path) -> str | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = _last_newline_end(f, size - 1) if size > 1 else 0
        f.seek(start)
        return f.read(size - start).decode("utf-8", errors="replace").strip() or None


def _index_and_job(line: str) -> tuple[int | None, str | None]:
    """A written result's index and job: Backfill's lines carry ``index``; OpenAI's carry
    ``batch_req_<job>-<index>`` as their id."""
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    if isinstance(obj.get("index"), int):
        return obj["index"], None
    ident = obj.get("id")
    if isinstance(ident, str) and ident.startswith("batch_req_") and "-" in ident:
        job, _, index = ident[len("batch_req_"):].rpartition("-")
        if index.isdigit():
            return int(index), job
    return None, None


Progress = Callable[[int], None]


def upload_progress(total_bytes: int | None) -> tuple[Progress | None, Callable[[], None]]:
    """(on_progress, close) for an upload: a progress bar on stderr when it is a terminal,
    nothing otherwise (logs stay clean)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    bar = progress(total=total_bytes, desc="uploading", unit="B", unit_scale=True)

    def on_progress(num_bytes: int) -> None:
        bar.update(num_bytes)

    return on_progress, bar.close
