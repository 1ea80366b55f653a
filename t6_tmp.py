from afsplit.planner.cli import plan_parser, build_planner
from afsplit.planner import layouts as L
args=plan_parser().parse_args("--model deepseek-v3 --profile /tmp/prof.json --gpus 16 --tpot-ms 100".split())
pl,shape,b=build_planner(args)
for lay in [L.colocated(8,2), L.af_per_node(3,5,2)]:
  for B in [64, 192,512]:
   for m in [1,2,4]:
    r=pl.sm.decode_step(lay,B,m,pl.wl.mean_context)
    print(lay.label(),B,m, round(r.step_s*1e3,2), round(r.tokens_per_s_per_gpu), r.bottleneck, {k:round(v*1e3,3) for k,v in r.parts.items()}, pl.point_problem(lay,m,B))
