import time, argparse
t=time.time()
from afsplit.planner.cli import plan_parser, build_planner
import afsplit.cuda_graphs
print("imports", time.time()-t)
for model in ["qwen3-30b-a3b","mixtral-8x7b","deepseek-v3"]:
  for n in [8,64,512,4096]:
    args=plan_parser().parse_args(f"--model {model} --profile /tmp/prof.json --gpus {n} --tpot-ms 50".split())
    t=time.time(); pl,_,_=build_planner(args); t1=time.time(); r=pl.search(50); t2=time.time()
    print(model, n, "build %.3f search %.3f evals %d" % (t1-t, t2-t1, r.evaluated), r.best.layout.label() if r.best else None, r.best and round(r.best.tokens_per_s_per_gpu), r.best and r.best.gain)
