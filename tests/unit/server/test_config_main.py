"""ServerConfig, the flags generated from it, serve_in_thread, and ``python -m server`` as a
process on the tiny engine with the real CPU executor (SIGTERM → drain → exit 0)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.__main__ import parse_args
from server.app import serve_in_thread
from server.config import ServerConfig, add_arguments
from tests.fakes import ScriptedExecutor
from tests.unit.server.conftest import tiny_capacity

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[3]


def test_every_field_has_a_flag_with_the_fields_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    for f in dataclasses.fields(ServerConfig):
        assert defaults[f.name] == f.default, f.name
    assert parse_args([]) == ServerConfig()


def test_flags_parse_into_the_config() -> None:
    config = parse_args(
        [
            "--engine",
            "/e",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--window-ms",
            "5",
            "--offline-reserve",
            "0.25",
            "--preemption",
            "off",
            "--policy",
            "fcfs",
            "--max-online-queue",
            "8",
            "--max-offline-queue",
            "9",
            "--price-per-hour",
            "2.5",
            "--drain-grace-s",
            "1",
            "--job-store",
            "/j.db",
            "--job-max-in-flight",
            "7",
            "--job-completion-window-s",
            "60",
            "--job-retention-s",
            "120",
            "--job-flush-ms",
            "10",
        ]
    )
    assert config == ServerConfig(
        engine="/e",
        port=0,
        metrics_port=-1,
        window_ms=5.0,
        offline_reserve=0.25,
        preemption="off",
        policy="fcfs",
        max_online_queue=8,
        max_offline_queue=9,
        price_per_hour=2.5,
        drain_grace_s=1.0,
        job_store="/j.db",
        job_max_in_flight=7,
        job_completion_window_s=60.0,
        job_retention_s=120.0,
        job_flush_ms=10.0,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "lifo"], "invalid choice"),
        (["--offline-reserve", "1.5"], "offline_reserve must be in [0, 1]"),
        (["--port", "70000"], "port must be in [0, 65535]"),
        (["--window-ms", "0"], "window_ms must be > 0"),
        (["--job-max-in-flight", "0"], "job_max_in_flight must be >= 1"),
        (["--job-retention-s", "-1"], "job_retention_s must be > 0"),
    ],
)
def test_bad_flags_exit_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_in_thread_for_sync_callers(tiny_engine: Path, tmp_path: Path) -> None:
    executor = ScriptedExecutor(tiny_capacity(tiny_engine))
    config = ServerConfig(engine=str(tiny_engine), port=0, metrics_port=0,
                          job_store=str(tmp_path / "jobs.db"))
    with serve_in_thread(config, executor=executor) as running:
        assert running.metrics_url is not None and running.metrics_url.endswith("/metrics")
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            req = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[1, 2]), sampling=pb.SamplingParams(max_tokens=4)
            )
            chunks = list(stub.Generate(req))
        report = running.stop(grace_s=1.0)
    assert sum(len(c.token_ids) for c in chunks) == 4
    assert report.unfinished_offline == 0


def test_python_m_server_serves_and_drains_on_sigterm(tiny_engine: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable,
        "-m",
        "server",
        "--engine",
        str(tiny_engine),
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--drain-grace-s",
        "5",
        "--job-store",
        str(tmp_path / "jobs.db"),
    ]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        address = line.split()[-1]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            req = pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=5))
            chunks = list(stub.Generate(req, timeout=60))
        assert sum(len(c.token_ids) for c in chunks) >= 1
        assert chunks[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        assert "offline requests unfinished" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
