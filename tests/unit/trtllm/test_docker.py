"""docker/: the files parse, and what they name exists (metric families, ports, scripts).

Docker itself cannot run here; these checks catch the mistakes that would only show at
``docker compose up``: a typo in a metric name, a scrape port the server does not use, a
dashboard that is not valid JSON, a shell script with a syntax error.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from server.config import ServerConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "backfill.json"


def exposed_metric_names() -> set[str]:
    """Family names the server's metric modules register, as Prometheus exposes them."""
    source = "".join(p.read_text() for p in (ROOT / "server").glob("*metrics.py"))
    names = set(re.findall(r'"((?:backfill|nv_trt_llm)_[a-z_]+)"', source))
    exposed = set(names)
    for name in names:  # counters gain _total, histograms _bucket/_sum/_count
        exposed |= {f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return exposed


def test_dashboard_is_valid_json_with_the_asked_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("slots", "ttft", "tokens/s", "utilization", "cost"):
        assert topic in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_name_metrics_the_server_exports() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exported = exposed_metric_names()
    used = {name for panel in dash["panels"] for target in panel["targets"]
            for name in re.findall(r"\b((?:backfill|nv_trt_llm)_[a-z_]+)", target["expr"])}
    assert used, "no metric in the dashboard"
    assert used <= exported, f"not exported by the server: {sorted(used - exported)}"


def _yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml")  # not a project dependency; parse it where present
    return yaml.safe_load(path.read_text())


def test_compose_and_prometheus_agree_with_the_server() -> None:
    compose = _yaml(DOCKER / "compose.yaml")
    assert {"backfill", "backfill-gpu", "prometheus", "grafana"} <= set(compose["services"])
    port = ServerConfig().metrics_port
    assert f"{port}:{port}" in compose["services"]["backfill"]["ports"]
    prom = _yaml(DOCKER / "prometheus.yml")
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets and all(t.endswith(f":{port}") for t in targets)
    hosts = {t.split(":")[0] for t in targets}
    assert hosts <= set(compose["services"])
    for service in ("backfill", "backfill-gpu"):
        dockerfile = compose["services"][service]["build"]["dockerfile"]
        assert (ROOT / dockerfile).is_file()


def test_grafana_provisioning_points_at_the_mounted_paths() -> None:
    compose = _yaml(DOCKER / "compose.yaml")
    mounts = compose["services"]["grafana"]["volumes"]
    datasource = _yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yaml")
    provider = _yaml(DOCKER / "grafana/provisioning/dashboards/backfill.yaml")
    assert datasource["datasources"][0]["uid"] == json.loads(DASHBOARD.read_text())[
        "panels"][0]["datasource"]["uid"]
    dash_path = provider["providers"][0]["options"]["path"]
    assert any(m.endswith(f":{dash_path}:ro") for m in mounts)


def test_dockerfiles_use_the_pinned_base_and_server_entry() -> None:
    gpu = (DOCKER / "Dockerfile").read_text()
    assert "nvcr.io/nvidia/tensorrt-llm/release:1.2.1" in gpu
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", cpu, re.M)
    assert '"python", "-m", "server"' in cpu and '"0.0.0.0"' in cpu
    pinned = (ROOT / "pyproject.toml").read_text()
    assert 'tensorrt-llm==1.2.1' in pinned


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("script", ["gpu-check.sh", "gpu-entrypoint.sh"])
def test_shell_scripts_parse(script: str) -> None:
    path = DOCKER / script
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert path.stat().st_mode & 0o111, f"{script} is not executable"


def test_the_gpu_image_builds_without_a_gpu() -> None:
    """Importing tensorrt_llm loads CUDA: a RUN step must not, build hosts often have no GPU."""
    runs = " ".join(line for line in (DOCKER / "Dockerfile").read_text().splitlines()
                    if not line.lstrip().startswith("#"))
    assert "import tensorrt_llm" not in runs
    assert "version('tensorrt_llm')" in runs


def test_the_gpu_check_covers_both_backends() -> None:
    script = (DOCKER / "gpu-check.sh").read_text()
    assert "--backend trtllm " in script and "--backend trtllm-llmapi" in script
    assert "tests/gpu/test_trtllm_gpu.py" in script and "tests/gpu/test_llmapi_gpu.py" in script
    assert "BACKFILL_GPU_LLMAPI_ENGINE" in script
    for test in ("test_trtllm_gpu.py", "test_llmapi_gpu.py"):
        assert (ROOT / "tests" / "gpu" / test).is_file()
