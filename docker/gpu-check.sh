#!/usr/bin/env bash
# End-to-end check of both TensorRT-LLM backends on a machine with one NVIDIA GPU.
#
# Needs: TensorRT-LLM 1.2.1 (the docker/Dockerfile image, or pip install --extra-index-url
# https://pypi.nvidia.com/ 'backfill[trtllm]'), TensorRT-LLM's examples/ tree ($TRTLLM_EXAMPLES;
# preset in the image), a small Llama-family HF checkpoint and a smaller draft that shares its
# tokenizer (e.g. TinyLlama-1.1B-Chat as the model and a 2-layer distillation of it, or any
# Llama pair with identical tokenizer.json).
#
#   docker/gpu-check.sh MODEL_DIR DRAFT_DIR [WORK_DIR]
#   docker run --rm --gpus all -v /models:/models backfill:gpu check /models/tinyllama /models/draft
#
# trtllm: builds INT8 and INT4 engines, each with the draft (QUANTS="int8 int4" to change; KV
# cache dtype KV=auto|int8|fp8). trtllm-llmapi (LLMAPI=0 skips it): writes engine directories
# for the checkpoint itself, plain and with the draft (draft-target inside TensorRT-LLM). Runs the
# GPU tests against each, then the benchmarks, and prints the numbers. Exit status: 0 all
# passed, 1 something failed, 2 missing prerequisites.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
MODEL="$1"
DRAFT="$2"
WORK="${3:-${TMPDIR:-/tmp}/backfill-gpu-check}"
QUANTS="${QUANTS:-int8 int4}"
LLMAPI="${LLMAPI:-1}"
KV="${KV:-auto}"
MAX_DRAFT_LEN="${MAX_DRAFT_LEN:-4}"
PY="${PYTHON:-python}"
REPO="$(cd "$(dirname "$0")/.." 2>/dev/null && pwd)"
[[ -f "$REPO/pyproject.toml" ]] || REPO=/opt/backfill  # inside the image

say() { printf '\n== %s\n' "$*"; }

say "prerequisites"
nvidia-smi -L || { echo "no NVIDIA GPU visible (nvidia-smi -L failed)"; exit 2; }
"$PY" -c "import tensorrt_llm; print('tensorrt_llm', tensorrt_llm.__version__)" \
  || { echo "tensorrt_llm is not importable: use nvcr.io/nvidia/tensorrt-llm/release:1.2.1" \
       "or pip install --extra-index-url https://pypi.nvidia.com/ 'backfill[trtllm]'"; exit 2; }
for d in "$MODEL" "$DRAFT"; do
  [[ -f "$d/config.json" && -f "$d/tokenizer.json" ]] || { echo "$d: not an HF checkpoint"; exit 2; }
done
mkdir -p "$WORK"
cd "$REPO"

status=0
declare -a built=()
for quant in $QUANTS; do
  out="$WORK/engine-$quant"
  say "build $quant (kv $KV, draft K=$MAX_DRAFT_LEN) -> $out"
  start=$(date +%s)
  if "$PY" -m engine_builder build --backend trtllm --model "$MODEL" --output "$out" --force \
      --quant "$quant" --kv-cache-dtype "$KV" --draft "$DRAFT" --max-draft-len "$MAX_DRAFT_LEN" \
      --max-batch-size 32 --max-seq-len 2048 --max-num-tokens 4096; then
    echo "built $quant in $(( $(date +%s) - start ))s"
    built+=("$out")
  else
    echo "BUILD FAILED: $quant"; status=1
  fi
done

declare -a written=()
if [[ "$LLMAPI" != "0" ]]; then
  for variant in plain draft; do
    out="$WORK/llmapi-$variant"
    flags=()
    [[ "$variant" == draft ]] && flags=(--speculative draft_target --draft "$DRAFT" \
                                        --max-draft-len "$MAX_DRAFT_LEN")
    say "trtllm-llmapi engine directory ($variant) -> $out"
    if "$PY" -m engine_builder build --backend trtllm-llmapi --model "$MODEL" --output "$out" \
        --force --max-batch-size 32 --max-seq-len 2048 --max-num-tokens 4096 "${flags[@]}"; then
      written+=("$out")
    else
      echo "WRITE FAILED: llmapi $variant"; status=1
    fi
  done
fi

for out in "${built[@]}"; do
  say "gpu tests (trtllm) on $out"
  BACKFILL_GPU_ENGINE="$out" "$PY" -m pytest tests/gpu/test_trtllm_gpu.py -m gpu -q -rs \
    || status=1
done
for out in "${written[@]}"; do
  say "gpu tests (trtllm-llmapi) on $out"
  BACKFILL_GPU_LLMAPI_ENGINE="$out" "$PY" -m pytest tests/gpu/test_llmapi_gpu.py -m gpu -q -rs \
    || status=1
done

for out in "${built[@]}" "${written[@]}"; do
  say "server benchmark on $out"
  if [[ -f benchmarks/bench_scheduler.py ]]; then
    "$PY" -m benchmarks.bench_scheduler --engine "$out" --max-prompt-tokens 512 \
      --max-output-tokens 128 --offline-output-tokens 256 \
      --json-out "$out/bench_scheduler.json" | tee "$out/bench_scheduler.txt" || status=1
  else
    echo "benchmarks/bench_scheduler.py not found; skipped"; status=1
  fi
  if [[ -f benchmarks/bench_gpu.py ]]; then
    "$PY" -m benchmarks.bench_gpu --engine "$out" --json-out "$out/bench_gpu.json" \
      | tee "$out/bench_gpu.txt" || status=1
  fi
done

say "summary"
for out in "${built[@]}" "${written[@]}"; do
  echo "$out:"
  "$PY" -m engine_builder inspect "$out" 2>/dev/null | sed 's/^/  /' || true
  for f in "$out"/bench_*.txt; do [[ -f "$f" ]] && sed 's/^/  /' "$f"; done
done
exit "$status"
