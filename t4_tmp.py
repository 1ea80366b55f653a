from afsplit.planner.cli import plan_parser, build_planner
from afsplit.planner import layouts as L
args=plan_parser().parse_args("--model deepseek-v3 --profile /tmp/prof.json --gpus 64 --tpot-ms 50".split())
pl,shape,b=build_planner(args)
print(b.fits())
for lay in [L.colocated(8,8), L.af_per_node(4,4,8), L.af_across_nodes(4,4,8)]:
  for B in [8,64,256]:
    r=pl.sm.decode_step(lay,B,2,pl.wl.mean_context)
    print(lay.label(),B, round(r.step_s*1e3,2), round(r.tokens_per_s_per_gpu), r.bottleneck, {k:round(v*1e3,3) for k,v in r.parts.items()})
