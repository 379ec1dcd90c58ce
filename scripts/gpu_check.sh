#!/usr/bin/env bash
# One GPU session's work: GPU tests, then the kernel, latency and throughput
# benchmarks on the Llama-3-8B shape; a short table of each is printed last.
# Logs go to $OUT (or ./gpu_logs).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# no install needed (the machine may lack network and build tools): the tpserve.*
# names resolve through a link to this checkout
if ! python3 -c "import tpserve.engine" 2>/dev/null; then
  mkdir -p /tmp/tpserve-path && ln -sfn "$PWD" /tmp/tpserve-path/tpserve
  export PYTHONPATH=/tmp/tpserve-path:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest tests/gpu -q -x 2>&1 | tee "$out/gpu_tests.log" | tail -3
python3 scripts/bench_kernels.py 2>&1 | tee "$out/bench_kernels.log" | tail -25
# one random workspace (16 GB) shared by both benchmarks, removed at the end
ws=$(mktemp -d /tmp/tpserve-bench-XXXXXX)/ws
trap 'rm -rf "$(dirname "$ws")"' EXIT
ws_args=()
python3 scripts/bench_common.py "$ws" --shape llama3-8b 2>&1 | tee "$out/workspace.log" | tail -2 &&
  ws_args=(--workspace "$ws")
python3 scripts/bench_latency.py --shape llama3-8b --batch 1 8 --out-len 128 "${ws_args[@]}" \
  --json "$out/latency.json" 2>&1 | tee "$out/bench_latency.log" | tail -8
python3 scripts/bench_throughput.py --shape llama3-8b --num-prompts 256 --hf-prompts 32 \
  "${ws_args[@]}" --json "$out/throughput.json" 2>&1 | tee "$out/bench_throughput.log" | tail -5
