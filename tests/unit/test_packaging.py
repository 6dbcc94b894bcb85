"""The built wheel carries what a user's machine needs: the shipped trace with its notice, and
the console scripts next to the ``python -m`` forms."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.unit.test_no_outside_paths import checked_files

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "backfill": "client.cli:main",
    "backfill-server": "server.__main__:main",
    "backfill-build": "engine_builder.cli:main",
    "backfill-plan": "server.planner.cli:main",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """A wheel built from a copy of the checkout's files (the checkout itself stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for path in checked_files(ROOT):
        target = src / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    out = tmp_path_factory.mktemp("dist")
    build = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
    subprocess.run([sys.executable, "-c", build, str(out)], cwd=src, check=True,
                   capture_output=True)
    (path,) = out.glob("backfill-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_ships_the_trace_and_its_notice(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    trace = "client/bench/data/AzureLLMInferenceTrace_conv.csv"
    assert trace in names and "client/bench/data/NOTICE.md" in names
    assert wheel.read(trace) == (ROOT / trace).read_bytes()
    notice = wheel.read("client/bench/data/NOTICE.md").decode()
    assert "CC-BY 4.0" in notice and "Splitwise" in notice


def test_the_wheel_declares_the_console_scripts(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == SCRIPTS


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_console_script_runs(script: str) -> None:
    """The installed scripts (in this environment's bin) answer --help."""
    path = Path(sys.executable).parent / script
    if not path.exists():
        pytest.skip(f"{script} is not installed in this environment")
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
