"""``python -m engine_builder inspect DIR [--json]``: the manifest and the memory footprint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engine_builder.footprint import Footprint, footprint, human_bytes
from engine_builder.manifest import Manifest, ManifestError
from engine_builder.usage import UsageError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="print an engine's manifest and memory footprint")
    p.add_argument("engine_dir", type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def _lines(prefix: str, value: object) -> list[str]:
    if isinstance(value, dict):
        out = []
        for key, sub in value.items():
            out.extend(_lines(f"{prefix}.{key}" if prefix else key, sub))
        return out
    return [f"  {prefix:<34} {json.dumps(value)}"]


def format_report(manifest: Manifest, fp: Footprint) -> str:
    lines = [f"engine {manifest.name} ({manifest.backend}, schema v{manifest.schema_version})"]
    data = manifest.to_json()
    for section in ("architecture", "quantization", "limits", "tokenizer", "files", "draft",
                    "speculative", "profile", "provenance"):
        lines.extend(_lines(section, data[section]))
    lines.append("memory footprint")
    for dtype, n in fp.weight_bytes_by_dtype.items():
        lines.append(f"  weights {dtype:<26} {human_bytes(n):>12}  ({n} bytes)")
    lines.append(f"  {'weights total':<34} {human_bytes(fp.weight_bytes):>12}  "
                 f"({fp.weight_bytes} bytes)")
    limits = manifest.limits
    lines.append(f"  {'kv cache':<34} {human_bytes(fp.kv_cache_bytes):>12}  "
                 f"({limits.num_kv_blocks} blocks x {limits.tokens_per_block} tokens x "
                 f"{fp.kv_bytes_per_token} bytes, {manifest.quantization.kv_cache_dtype})")
    if fp.draft_bytes:
        lines.append(f"  {'draft engine (weights + kv)':<34} {human_bytes(fp.draft_bytes):>12}  "
                     f"({fp.draft_bytes} bytes)")
    lines.append(f"  {'total':<34} {human_bytes(fp.total_bytes):>12}  ({fp.total_bytes} bytes)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        manifest = Manifest.load(args.engine_dir)
    except ManifestError as exc:
        raise UsageError("DIR", str(exc)) from exc
    fp = footprint(manifest, args.engine_dir)
    if args.json:
        print(json.dumps({"manifest": manifest.to_json(), "footprint": fp.to_json()}, indent=2))
    else:
        print(format_report(manifest, fp))
    return 0
