#!/usr/bin/env bash
# Entry point of the GPU image:
#   serve ENGINE_DIR [server flags]           python -m server --engine ENGINE_DIR --host 0.0.0.0
#   build HF_DIR ENGINE_DIR [builder flags]   python -m engine_builder build --backend trtllm ...
#   llmapi HF_DIR ENGINE_DIR [builder flags]  ... --backend trtllm-llmapi (serve the checkpoint)
#   check [gpu-check.sh args]                 the operator's end-to-end check (docker/gpu-check.sh)
#   anything else                             run as a command
set -euo pipefail

case "${1:-serve}" in
  serve)
    shift || true
    engine="${1:-/engines/default}"
    shift || true
    exec python -m server --engine "$engine" --host 0.0.0.0 "$@"
    ;;
  build)
    shift
    model="$1"; out="$2"; shift 2
    exec python -m engine_builder build --backend trtllm --model "$model" --output "$out" "$@"
    ;;
  llmapi)
    shift
    model="$1"; out="$2"; shift 2
    exec python -m engine_builder build --backend trtllm-llmapi --model "$model" --output "$out" "$@"
    ;;
  check)
    shift
    exec gpu-check.sh "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
