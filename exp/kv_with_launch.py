# bench_throughput with an int8 decode launch given as block_n,warps,stages,dequant
import sys, runpy, torch
from tpserve.kernels import attention_decode as ad
ad.LAUNCH[torch.int8] = ad.DecodeLaunch(*map(int, sys.argv[1].split(",")))
print("int8 decode launch", ad.LAUNCH[torch.int8], flush=True)
sys.argv = ["bench_throughput.py"] + sys.argv[2:]
runpy.run_path("scripts/bench_throughput.py", run_name="__main__")
