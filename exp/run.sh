set -u
export PYTHONPATH=/tmp/tpserve-path:$PWD/scripts NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/tpserve-path && ln -sfn $PWD /tmp/tpserve-path/tpserve
nvidia-smi -L
(python3 scripts/bench_common.py /tmp/tpserve-bench/l2 --shape llama2-7b > $OUT/ws.log 2>&1) &
timeout 120 python3 -m pytest tests/gpu/test_kernels_gpu.py -q 2>&1 | tail -2
timeout 170 python3 scripts/tune_kernels.py --quick --only decode > $OUT/tune.log 2>&1; tail -4 $OUT/tune.log
timeout 100 python3 exp/joined.py > $OUT/joined.log 2>&1; cat $OUT/joined.log | cut -c1-150
wait
best=$(grep "^int8 decode B=64" $OUT/tune.log | head -1 | grep -o "DecodeLaunch([^)]*)" | grep -o "[0-9]\+" | paste -sd,)
echo "best at B=64: $best"
ws=/tmp/tpserve-bench/l2
frac=$(python3 -c "import torch; f,_=torch.cuda.mem_get_info(); print(round(20e9/(f-14e9),3))")
args="--shape llama2-7b --workspace $ws --num-prompts 512 --max-batch-size 512 --cache-max-entry-count $frac --no-baseline"
timeout 100 python3 scripts/bench_throughput.py $args --quant-policy 0 --label bf16 2>&1 | tail -2
timeout 100 python3 exp/kv_with_launch.py 64,4,2,0 $args --quant-policy 8 --label "int8 old" 2>&1 | tail -2
[ -n "$best" ] && timeout 100 python3 exp/kv_with_launch.py $best $args --quant-policy 8 --label "int8 $best" 2>&1 | tail -2
