"""Training level samplers: which level maps a model sees during training (method.md §5).

A level map gives every token of an image its own noise level, [B, *grid] float32 in [0, 1]
(0 clean, 1 pure noise). By Lemmas 1-2 every sampler has the same optimum; they differ in which
states a finite model learns well, seen in three statistics: the spatial scale of regions sharing
a level, the image mean tbar, and the spread (max - min).

- synchronous: one t ~ U(0, 1) per image. tbar uniform, zero spread (ordinary diffusion).
- independent: t_i ~ U(0, 1) per token. tbar concentrates at 1/2 with std 1/sqrt(12 N) (N tokens),
  so near-clean, near-noise and "clean next to noisy" states are almost never seen.
- patchwise(patch_sizes, patch_probs): a grid size K per image (by default, as for asyncpatch,
  uniform over the powers of two up to the grid), one U(0, 1) level per patch of the K x K grid;
  tbar std 1/sqrt(12 K^2) given K.
- perlin(scale, threshold, octaves) (RAD, Kim et al. 2024): a binary Perlin mask m, t ~ U(0, 1)
  and b ~ Bernoulli(1/2) per image, levels t m + (1 - m) b: the background is all clean or all
  noise. tbar is U-shaped; suited to inpainting.
- asyncpatch(t_min, t_max, delta_max, patch_sizes, patch_probs, p_synchronous) (the paper's):
  tbar ~ U(t_min, t_max), delta = min(tbar - t_min, t_max - tbar, delta_max), a grid size K per
  image, each patch ~ U(tbar - delta, tbar + delta). tbar about uniform; the spread is widest
  mid-way and vanishes near clean and near pure noise.

    levels = apd.levels.sample("asyncpatch", key, batch_size, grid=32, delta_max=0.3)

`apd.levels.stats` holds the diagnostics (image mean, spread, summary with a KS statistic);
`python -m apd.levels --sampler=NAME --out=DIR` plots them (the paper's Fig. 3).
"""

from apd.levels import stats
from apd.levels.samplers import DEFAULTS, NAMES, resolve_params, sample

__all__ = ["DEFAULTS", "NAMES", "resolve_params", "sample", "stats"]
