"""asyncpatch's delta_max (the largest half-width of the patch levels around the image mean):
0 trains on synchronous maps only, 1 lets a patch span up to the whole [0, 1] mid-way.

Each run is the sampler ablation's asyncpatch run (`experiments/ablation_samplers.py`: the same
model, steps, batch, optimizer and evaluation) with delta_max changed; delta_max = 0.5 (the
paper's value, apd's default) is the ablation's asyncpatch run itself (the same config, seed for
seed: tests/test_sweep.py checks it), so link its workdirs rather than train them again; the
sweep finds them finished and archives them under its own run names. Where only the ablation's
archived results are left (its workdirs gone), copy those under this sweep's run names: an
archived run is finished. Three training seeds.

    mkdir -p runs/delta_max
    for s in 0 1 2; do ln -sfn "$PWD/runs/ablation/sampler=asyncpatch,seed=$s" \
        "runs/delta_max/delta_max=0.5,seed=$s"; done
    # or, from the archive: for s in 0 1 2; do cp \
    #   "benchmarks/results/ablation/sampler=asyncpatch,seed=$s.json" \
    #   "benchmarks/results/delta_max/delta_max=0.5,seed=$s.json"; done
    python -m apd.sweep --config=experiments/sweep_delta_max.py --root=runs/delta_max \
        --archive=benchmarks/results/delta_max

Config arguments: steps (training steps of every run), smoke.
"""

from experiments import ablation_samplers

DELTA_MAX = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
SEEDS = (0, 1, 2)


get_config = ablation_samplers.asyncpatch_config


def get_hyper(h):
    return h.product([h.sweep("levels.params.delta_max", DELTA_MAX), h.sweep("seed", SEEDS)])
