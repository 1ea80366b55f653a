"""Deployment planner: measure building blocks, model one decode step, search cluster layouts.

    afsplit profile --config FILE --out PROFILE.json        (GPU: measure; see profile_measure.py)
    afsplit plan --model PRESET_OR_DIR --profile PROFILE.json --gpus N --gpus-per-node G --tpot-ms 50
    afsplit plan validate --profile PROFILE.json DIR...     (predict recorded runs, print the error)

Files, one job each:

* ``shapes.py``       model sizes (bytes, FLOPs) from a preset, a checkpoint directory or a planner-only shape
* ``profile_data.py`` the profile JSON: load, check, and the time of each building block (tables + fits)
* ``fitting.py``      interpolation on measured grids and roofline fits (how a table is read beyond its grid)
* ``exchange.py``     padded dispatch/combine: bytes per link and time, direct and two_phase
* ``layouts.py``      one deployment layout (AF per node, AF across nodes, colocated, single GPU)
* ``step_model.py``   one decode step from the runtime's structure (per layer, per micro-batch, ping-pong)
* ``memory.py``       memory per GPU and KV capacity
* ``search.py``       candidate layouts x micro-batches x batch x transport, constraints with arithmetic
* ``simulate.py``     a recorded run replayed through the real scheduler, step by step
* ``validate.py``     ``afsplit plan validate``
* ``config_out.py``   the chosen plan as a config YAML that ``afsplit check-config`` accepts
* ``profile_measure.py``, ``system_runs.py``, ``links.py``  ``afsplit profile`` (GPU measurements)
* ``engine_runs.py``  single-GPU engine runs with a stats JSON (profile and launch/planner_runs.sh)
* ``synthetic.py``    profiles built from roofline parameters (tests with known answers; estimates)
* ``report.py``       Pareto frontier PNG + JSON for docs/benchmarks/planner-*
* ``cli.py``          argument parsing for ``afsplit profile`` and ``afsplit plan``
"""
