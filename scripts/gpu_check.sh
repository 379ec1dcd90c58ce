#!/usr/bin/env bash
# GPU tests and benchmarks in one go; the tables of each part are printed last.
#
#   scripts/gpu_check.sh [PART ...]     (default: tests kernels latency throughput)
#
# Parts: tests      GPU tests ($TESTS, default tests/gpu; the tensor-parallel ones need 2+ GPUs)
#        kernels    kernel benchmarks
#        latency    batch-1/8 decode on the Llama-3-8B shape, CUDA graphs vs eager vs transformers
#        throughput ShareGPT-like requests on the Llama-3-8B shape vs transformers
#        w4a16      decode with random 4-bit AWQ weights (Llama-3-8B shape) vs bf16
#        kvint8     int8 (online and calibrated scales) vs bf16 KV cache at a KV-bound batch
#                   (Llama-2-7B shape)
#        graphs     saturation throughput with the steps that carry prompt chunks launched
#                   eagerly vs replayed as CUDA graphs in pieces (Llama-2-7B shape, bf16)
#        tp         tp=1/2/4 batch-1 decode on the Llama-3-8B shape (as many GPUs as there are)
#        tpstep     all-reduce micro-benchmark, and where a tp=2 step's time goes (NCCL vs one-shot)
#        serving    bench_serving.py through the Ray Serve app vs the in-process engine
#        ab         batch-1 decode (tp=1, and tp=2 where there are 2 GPUs) of the tree in
#                   .ab_base/ (scripts/ab_base.sh REV) against this checkout, interleaved,
#                   $AB_ROUNDS rounds (default 2); carry .ab_base/ to the GPU machine.
#                   AB_BATCHES="1 8 16": other batch sizes; AB_WEIGHTS=awq: the 4-bit
#                   workspace (tp=1)
#        clean      remove the random workspaces ($BENCH_DIR, default /tmp/tpserve-bench)
#
# Logs go to $OUT (or ./gpu_logs). A machine without network can get Ray from a
# folder of wheels at .whl/ or a tarball of site-packages at .raysite/ray-site.tar.xz
# (either goes to /tmp/site).
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
if ! python3 -c "import ray" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  elif [ -f .raysite/ray-site.tar.xz ]; then
    mkdir -p /tmp/site && tar -xJf .raysite/ray-site.tar.xz -C /tmp/site
  fi
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD/scripts:${PYTHONPATH:-}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests kernels latency throughput)
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
echo "$gpus GPU(s)"

# random workspaces (16 GB each) are kept here between calls; `clean` removes them
scratch=${BENCH_DIR:-/tmp/tpserve-bench}
mkdir -p "$scratch"
workspace() {  # workspace NAME ARGS...: a random workspace, made once
  local ws="$scratch/$1"; shift
  [ -d "$ws" ] || python3 scripts/bench_common.py "$ws" "$@" > "$out/ws_$(basename "$ws").log" 2>&1
  echo "$ws"
}
summary=()
note() { summary+=("$1"); }
# a KV budget of ~20 GB next to a 7B model whatever the card, so that the batch at
# saturation is bound by the cache: the --cache-max-entry-count fraction that gives it
kv_budget() {
  python3 -c "import torch; f,_=torch.cuda.mem_get_info(); print(round(20e9/(f-14e9),3))"
}

for part in "${parts[@]}"; do
  echo "=== $part"
  case $part in
  tests)
    timeout -k 10 "${TESTS_TIMEOUT:-1200}" python3 -m pytest ${TESTS:-tests/gpu} -q -rs 2>&1 | tee "$out/gpu_tests.log" | tail -8
    note "tests: $(tail -1 "$out/gpu_tests.log")";;
  kernels)
    python3 scripts/bench_kernels.py 2>&1 | tee "$out/bench_kernels.log" | tail -40;;
  clean)
    rm -rf "$scratch";;
  latency)
    ws=$(workspace l3 --shape llama3-8b)
    python3 scripts/bench_latency.py --workspace "$ws" --batch 1 8 --out-len 128 --label eager \
      --eager-mode --no-baseline --json "$out/latency_eager.json" 2>&1 | tail -4
    python3 scripts/bench_latency.py --workspace "$ws" --batch 1 8 --out-len 128 --label sync \
      --no-async-scheduling --no-baseline --json "$out/latency_sync.json" 2>&1 | tail -4
    python3 scripts/bench_latency.py --workspace "$ws" --batch 1 8 --out-len 128 \
      --json "$out/latency.json" 2>&1 | tee "$out/bench_latency.log" | tail -7;;
  throughput)
    ws=$(workspace l3 --shape llama3-8b)
    python3 scripts/bench_throughput.py --workspace "$ws" --num-prompts 256 --hf-prompts 32 \
      --json "$out/throughput.json" 2>&1 | tee "$out/bench_throughput.log" | tail -5;;
  w4a16)
    ws=$(workspace l3 --shape llama3-8b)
    awq=$(workspace l3awq --shape llama3-8b --awq-group 128)
    python3 scripts/bench_latency.py --workspace "$ws" --batch 1 8 64 --out-len 128 --label bf16 \
      --no-baseline --json "$out/latency_bf16.json" 2>&1 | tail -5
    python3 scripts/bench_latency.py --workspace "$awq" --awq-group 128 --batch 1 8 64 \
      --out-len 128 --label w4a16 --no-baseline --json "$out/latency_w4a16.json" 2>&1 | tail -5;;
  kvint8)
    ws=$(workspace l2 --shape llama2-7b)
    frac=$(kv_budget)
    # the same weights with (placeholder) calibrated int8-KV parameters: hard links
    static="$scratch/l2kv"
    [ -d "$static" ] || { cp -al "$ws" "$static" && python3 scripts/bench_common.py "$static" \
      --kv-qparams > "$out/ws_l2kv.log" 2>&1; }
    # KV_REPEAT=N runs the three N times, interleaved; KV_PROMPTS requests a run (2048:
    # long enough that most of it runs at the cache's capacity, not ramping up or draining)
    for i in $(seq "${KV_REPEAT:-1}"); do
      for run in "0 $ws bf16" "8 $ws int8-online" "8 $static int8-calibrated"; do
        set -- $run
        python3 scripts/bench_throughput.py --shape llama2-7b --workspace "$2" \
          --num-prompts "${KV_PROMPTS:-2048}" --max-batch-size 512 \
          --cache-max-entry-count "$frac" \
          --quant-policy "$1" --label "kv $3" --no-baseline --json "$out/kv_$3_$i.json" 2>&1 \
          | tail -1
      done
    done;;
  graphs)
    ws=$(workspace l2 --shape llama2-7b)
    frac=$(kv_budget)
    # steps with prompt chunks launched eagerly against replayed in pieces, interleaved
    for i in 1 2; do
      for flag in --no-mixed-graphs ""; do
        python3 scripts/bench_throughput.py --shape llama2-7b --workspace "$ws" \
          --num-prompts 1024 --max-batch-size 512 --cache-max-entry-count "$frac" \
          --label "bf16 ${flag:-graphs}" --no-baseline $flag 2>&1 | tail -1
      done
    done;;
  tp)
    ws1=$(workspace l3 --shape llama3-8b)
    python3 scripts/bench_latency.py --workspace "$ws1" --batch 1 8 --out-len 128 --label tp=1 \
      --no-baseline --json "$out/tp1.json" 2>&1 | tail -4
    for tp in 2 4; do
      [ "$gpus" -ge $tp ] || continue
      ws=$(workspace l3tp$tp --shape llama3-8b --tp $tp)
      timeout -k 10 400 python3 scripts/bench_latency.py --workspace "$ws" --tp $tp --batch 1 8 --out-len 128 \
        --label tp=$tp --no-baseline --json "$out/tp$tp.json" 2>&1 | tail -4
      timeout -k 10 400 python3 scripts/bench_latency.py --workspace "$ws" --tp $tp --batch 1 8 --out-len 128 \
        --label "tp=$tp sync" --no-async-scheduling --no-baseline --json "$out/tp${tp}_sync.json" 2>&1 | tail -4
    done;;
  tpstep)
    [ "$gpus" -ge 2 ] || { echo "tpstep needs 2 GPUs"; continue; }
    ws1=$(workspace l3 --shape llama3-8b)
    ws2=$(workspace l3tp2 --shape llama3-8b --tp 2)
    mkdir -p "$scratch/bench_tp"  # the same random weights as the tp part
    ln -sfn "$ws1" "$scratch/bench_tp/llama3-8b-32l-tp1"
    ln -sfn "$ws2" "$scratch/bench_tp/llama3-8b-32l-tp2"
    timeout -k 10 120 python3 scripts/bench_all_reduce.py 2>&1 | grep -v Warn | tail -4
    for ar in ${ALLREDUCE_MODES:-nccl auto}; do  # NCCL only, then with the one-shot all-reduce
      echo "all-reduce: $ar"
      TPSERVE_ALLREDUCE=$ar timeout -k 10 200 python3 scripts/bench_tp.py --tp 2 --layers 32 \
        --profile --workspace-dir "$scratch/bench_tp" > "$out/bench_tp_$ar.log" 2>&1
      grep "kernels\|tp=" "$out/bench_tp_$ar.log"
    done;;
  ab)
    [ -f .ab_base/REVISION ] || { echo "ab: no .ab_base/; run scripts/ab_base.sh REV first"; continue; }
    echo "base: $(cat .ab_base/REVISION)"
    mkdir -p /tmp/tpserve-ab/base /tmp/tpserve-ab/new
    ln -sfn "$PWD/.ab_base" /tmp/tpserve-ab/base/tpserve
    ln -sfn "$PWD" /tmp/tpserve-ab/new/tpserve
    # AB_WEIGHTS=awq: the random 4-bit workspace instead (tp=1 only)
    case ${AB_WEIGHTS:-bf16} in bf16|awq) ;;
      *) echo "ab: AB_WEIGHTS must be bf16 or awq, not '$AB_WEIGHTS'"; continue;; esac
    if [ "${AB_WEIGHTS:-bf16}" = awq ]; then
      ws1=$(workspace l3awq --shape llama3-8b --awq-group 128); tps="1"; extra="--awq-group 128"
    else
      ws1=$(workspace l3 --shape llama3-8b); tps="1 2"; extra=""
      [ "$gpus" -ge 2 ] && ws2=$(workspace l3tp2 --shape llama3-8b --tp 2)
    fi
    for i in $(seq "${AB_ROUNDS:-2}"); do
      for tree in base new; do
        for tp in $tps; do
          [ $tp -eq 1 ] && ws=$ws1 || { [ "$gpus" -ge 2 ] || continue; ws=$ws2; }
          PYTHONPATH=/tmp/tpserve-ab/$tree:$PYTHONPATH timeout -k 10 400 python3 \
            scripts/bench_latency.py --workspace "$ws" $extra --tp $tp \
            --batch ${AB_BATCHES:-1} --out-len 128 --label "$tree tp=$tp" --no-baseline \
            --json "$out/ab_${tree}_tp${tp}_$i.json" 2>&1 | tail -"$(echo ${AB_BATCHES:-1} | wc -w)"
        done
      done
    done;;
  serving)
    ws=$(workspace l3 --shape llama3-8b)
    timeout -k 10 330 python3 scripts/bench_serving_compare.py --workspace "$ws" --json "$out/serving.json" 2>&1 \
      | tee "$out/bench_serving.log" | tail -12;;
  *) echo "unknown part $part";;
  esac
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
