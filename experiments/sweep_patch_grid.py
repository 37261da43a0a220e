"""asyncpatch's patch grids: which grid sizes K (patches per axis) a training map draws from.

Each run is the sampler ablation's asyncpatch run (`experiments/ablation_samplers.py`) with
`levels.params.patch_sizes` changed and K uniform over them (`patch_probs` follows a new
`patch_sizes`: see `apd.cli.apply_level_overrides`). The grids: one K at a time (1: one level per
image around the mean, 4, 16: near pixel level on 28 x 28), coarse and fine mixtures, the
default (every power of two up to the grid; the ablation's asyncpatch run) and the default
without K = 1. Three training seeds. The default grid's point is the ablation's asyncpatch run
(the same config, seed for seed: tests/test_sweep.py checks it): link its workdirs rather than
train them again (or copy its archived results under this sweep's run names), as
`sweep_delta_max.py` does for delta_max = 0.5.

    mkdir -p runs/patch_grid
    for s in 0 1 2; do ln -sfn "$PWD/runs/ablation/sampler=asyncpatch,seed=$s" \
        "runs/patch_grid/patch_sizes=1_2_4_8_16,seed=$s"; done
    python -m apd.sweep --config=experiments/sweep_patch_grid.py --root=runs/patch_grid \
        --archive=benchmarks/results/patch_grid

Config arguments: steps (training steps of every run), smoke.
"""

from experiments import ablation_samplers

PATCH_GRIDS = ((1,), (4,), (16,), (1, 2, 4), (4, 8, 16), (1, 2, 4, 8, 16), (2, 4, 8, 16))
SEEDS = (0, 1, 2)


get_config = ablation_samplers.asyncpatch_config


def get_hyper(h):
    return h.product([h.sweep("levels.params.patch_sizes", PATCH_GRIDS), h.sweep("seed", SEEDS)])
