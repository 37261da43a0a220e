"""Sampler costs, side by side in one process: per-step overhead, guided steps, adaptive plans.

1. Per-step overhead of `apd.sampling.sample` over the network alone, at batch B on the
   `unet-small` U-Net (28x28x1; a small flax conv net when apd.models is missing):
     forward       one jitted network call (its dispatch included)
     scan          a lax.scan whose step is only the network call (the loop floor)
     sampler       sample() on a synchronous plan: per-step time = total / steps
   Target: sampler / forward - 1 < 5%.
2. A guided step (classifier-free + input guidance, 4 branches in one call at batch 4B) against
   one forward at batch B and one at batch 4B. Target: <= 4.2x the batch-B forward.
3. Adaptive vs synchronous plans on an exactly solvable problem: inpainting Gaussian data
   x ~ N(mu, S) on an 8x8 grid with the exact denoiser and eta = 0, where the sampler maps the
   start noise affinely, so its output distribution is known exactly. Difficulty = each unknown
   token's exact posterior variance given the known tokens (what a perfect uncertainty head
   would report), min-max normalised per image. Reported: network calls, mean steps per token,
   and KL(sampled || exact conditional) at equal network calls.

Timings are medians of --reps runs, variants interleaved round-robin.

    python benchmarks/sampling.py [--batch 16] [--steps 20] [--reps 7] [--out FILE.json]
"""

import argparse
import functools
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import report

from apd import plans, sampling
from apd.schedules import RectifiedFlow

SHAPE = (28, 28, 1)
NUM_CLASSES = 10


class ConvNet(nn.Module):
    """Stand-in backbone: residual conv blocks with per-pixel FiLM from the level map."""

    width: int = 64
    blocks: int = 4
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, z, levels, labels):
        levels = jnp.broadcast_to(levels, z.shape[:-1])[..., None]
        cond = nn.silu(nn.Dense(32)(jnp.concatenate([levels, jnp.sin(3.0 * levels)], -1)))
        if labels is not None:
            cond = cond + nn.Embed(self.num_classes + 1, 32)(labels)[:, None, None, :]
        h = nn.Conv(self.width, (3, 3))(jnp.concatenate([z, levels], -1))
        for _ in range(self.blocks):
            scale, shift = jnp.split(nn.Dense(2 * self.width)(cond), 2, -1)
            r = nn.GroupNorm(8)(h) * (1 + scale) + shift
            h = h + nn.Conv(self.width, (3, 3))(nn.silu(nn.Conv(self.width, (3, 3))(nn.silu(r))))
        return nn.Conv(z.shape[-1], (3, 3))(nn.silu(nn.GroupNorm(8)(h)))


def backbone() -> tuple[nn.Module, str]:
    try:
        from apd import models

        return models.build("unet-small", num_classes=NUM_CLASSES), "apd.models unet-small"
    except (ImportError, ValueError) as err:
        return ConvNet(), f"benchmark ConvNet (apd.models unavailable: {err})"


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved so drifting load hits all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(median_time(fn, 1))
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# 1-2. Timings on a network
# ---------------------------------------------------------------------------------------------


def timings(batch: int, steps: int, reps: int) -> dict:
    model, model_name = backbone()
    key = jax.random.key(0)
    z = jax.random.normal(key, (batch, *SHAPE))
    levels = jax.random.uniform(key, (batch, *SHAPE[:2]))
    labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
    params = model.init(key, z, levels, labels)["params"]
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))

    def denoise(z, levels, labels):
        return model.apply({"params": params}, z, levels, labels)

    forward = jax.jit(denoise)
    z4, levels4 = jnp.concatenate([z] * 4), jnp.concatenate([levels] * 4)
    labels4 = jnp.concatenate([labels] * 4)

    @jax.jit
    def scan_only(z):
        def step(z, k):
            t = jnp.broadcast_to(1.0 - k / steps, levels.shape)
            return denoise(z, t, labels), None

        return jax.lax.scan(step, z, jnp.arange(steps, dtype=jnp.float32))[0]

    plan = plans.synchronous(steps, batch, SHAPE[:2])
    mask = np.zeros((batch, *SHAPE[:2]), np.float32)
    mask[:, :, : SHAPE[1] // 2] = 1.0  # left half known
    guided_plan = plans.inpaint(mask, steps)
    x_known = np.asarray(z)
    run = functools.partial(sampling.sample, denoise, schedule=RectifiedFlow(), eta=0.25)
    fns = {
        "forward": lambda: forward(z, levels, labels),
        "forward_4b": lambda: forward(z4, levels4, labels4),
        "scan": lambda: scan_only(z),
        "sampler": lambda: run(plan, key, channels=1, labels=labels, num_classes=NUM_CLASSES),
        "guided": lambda: run(
            guided_plan,
            key,
            x_known=x_known,
            labels=labels,
            num_classes=NUM_CLASSES,
            cfg_scale=1.5,
            input_guidance=1.5,
        ),
    }
    t = round_robin(fns, reps)
    per_step = {name: t[name] / steps for name in ("scan", "sampler", "guided")}
    guided_cost = sampling.sample_cost(guided_plan, cfg_scale=1.5, input_guidance=1.5)
    return {
        "model": model_name,
        "params": int(n_params),
        "batch": batch,
        "steps": steps,
        "seconds": {
            "forward": t["forward"],
            "forward_4b": t["forward_4b"],
            "scan_step": per_step["scan"],
            "sampler_step": per_step["sampler"],
            "guided_step": per_step["guided"],
        },
        "ratios": {
            "sampler_step / forward": per_step["sampler"] / t["forward"],
            "sampler_step / scan_step": per_step["sampler"] / per_step["scan"],
            "guided_step / forward": per_step["guided"] / t["forward"],
            "guided_step / forward_4b": per_step["guided"] / t["forward_4b"],
        },
        "guided_batch_per_call": guided_cost.batch_per_call,
    }


# ---------------------------------------------------------------------------------------------
# 3. Adaptive vs synchronous on Gaussian inpainting (exact)
# ---------------------------------------------------------------------------------------------


def gaussian_problem(n: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    d = n * n
    ij = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(d, 2)
    dist2 = np.sum(np.square(ij[:, None] - ij[None]), -1)
    cov = np.exp(-dist2 / (2 * 2.0**2)) + 0.02 * np.eye(d)
    mu = rng.normal(size=d) * 0.5
    known = np.zeros((n, n), bool)
    known[:, : n // 2] = True  # left half known
    x = rng.multivariate_normal(mu, cov)
    return mu, cov, known, x


def exact_denoiser(mu, cov, schedule, d):
    mu, cov = jnp.asarray(mu, jnp.float32), jnp.asarray(cov, jnp.float32)

    def denoise(z, levels, labels):
        b = z.shape[0]
        alpha, sigma = schedule.alpha_sigma(levels.reshape(b, d))
        m = alpha[:, :, None] * cov[None] * alpha[:, None, :] + jax.vmap(jnp.diag)(sigma**2)
        gain = jnp.linalg.solve(m, alpha[:, :, None] * cov[None])
        x_hat = mu + jnp.einsum("bi,bij->bj", z.reshape(b, d) - alpha * mu, gain)
        return x_hat.reshape(z.shape)

    return denoise


def gaussian_kl(m0, c0, m1, c1) -> float:
    """KL(N(m0, c0) || N(m1, c1))."""
    inv = np.linalg.inv(c1)
    diff = m1 - m0
    logdet = np.linalg.slogdet(c1)[1] - np.linalg.slogdet(c0)[1]
    return 0.5 * float(np.trace(inv @ c0) + diff @ inv @ diff - len(m0) + logdet)


def adaptive_vs_synchronous(budgets=((8, 32), (16, 64), (32, 128))) -> list[dict]:
    n, schedule = 8, RectifiedFlow()
    d = n * n
    mu, cov, known, x = gaussian_problem(n)
    k, u = known.reshape(d), ~known.reshape(d)
    solve = np.linalg.solve(cov[np.ix_(k, k)], cov[np.ix_(k, u)])
    target_mean = mu[u] + solve.T @ (x[k] - mu[k])
    target_cov = cov[np.ix_(u, u)] - cov[np.ix_(u, k)] @ solve
    post_var = np.zeros(d)
    post_var[u] = np.diag(target_cov)

    denoise = exact_denoiser(mu, cov, schedule, d)
    batch = int(u.sum()) + 1
    noise = np.zeros((batch, d), np.float32)
    noise[np.arange(1, batch), np.flatnonzero(u)] = 1.0  # zero, then each unknown unit vector
    noise = noise.reshape(batch, n, n, 1)
    x_known = np.broadcast_to(x.reshape(1, n, n, 1), noise.shape).astype(np.float32)
    start = np.broadcast_to(np.where(known, 0.0, 1.0), (batch, n, n)).astype(np.float32)

    def kl(plan) -> float:
        out = sampling.sample(
            denoise,
            plan,
            jax.random.key(0),
            schedule=schedule,
            prediction="x",
            eta=0.0,
            x_known=x_known,
            noise=noise,
        )
        out = np.asarray(out, np.float64).reshape(batch, d)[:, u]
        columns = out[1:] - out[0]
        return gaussian_kl(out[0], columns.T @ columns, target_mean, target_cov)

    difficulty = jnp.asarray(post_var.reshape(1, n, n))

    def uncertainty_fn(s):
        log_var = jnp.log(jnp.broadcast_to(difficulty, s.shape) + 1e-12)
        return plans.difficulty_from_log_error(log_var, s > 0)

    rows = []
    for n_min, n_max in budgets:
        sync = plans.inpaint(1.0 - start, n_max)
        row = {
            "budget": [n_min, n_max],
            "synchronous_calls": sampling.sample_cost(sync).network_calls,
            "kl_synchronous": kl(sync),
        }
        for align in plans.ALIGNS:
            adaptive = plans.adaptive(uncertainty_fn, (n_min, n_max), start, align=align)
            row[f"adaptive_{align}_calls"] = sampling.sample_cost(adaptive).network_calls
            row[f"kl_adaptive_{align}"] = kl(adaptive)
        steps = mean_steps(adaptive)
        sync_mean = plans.inpaint(1.0 - start, round(steps))
        row.update(
            adaptive_mean_steps_per_token=steps,
            synchronous_at_mean_steps_calls=sync_mean.steps,
            kl_synchronous_at_mean_steps=kl(sync_mean),
        )
        rows.append(row)
    return rows


def mean_steps(plan: plans.Plan) -> float:
    """Mean number of steps in which an updated token's level changes."""
    lv = np.broadcast_to(np.asarray(plan.levels), (plan.steps + 1, *plan.shape))
    taken = np.sum(lv[1:] != lv[:-1], axis=0)
    return float(taken[np.asarray(plan.update)].mean())


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "sampling.json"))
    args = parser.parse_args()

    timing = timings(args.batch, args.steps, args.reps)
    adaptive = adaptive_vs_synchronous()

    s, r = timing["seconds"], timing["ratios"]
    print(
        f"model: {timing['model']}, {timing['params']:,} params, batch {args.batch}, "
        f"{args.steps} steps, {jax.devices()[0].device_kind}"
    )
    print(f"{'':28s}{'ms':>10s}{'ratio':>10s}")
    print(f"{'forward (batch B)':28s}{1e3 * s['forward']:10.2f}{1.0:10.3f}")
    print(
        f"{'scan of forwards, per step':28s}{1e3 * s['scan_step']:10.2f}"
        f"{s['scan_step'] / s['forward']:10.3f}"
    )
    print(
        f"{'sampler, per step':28s}{1e3 * s['sampler_step']:10.2f}"
        f"{r['sampler_step / forward']:10.3f}   (target < 1.05; "
        f"{r['sampler_step / scan_step']:.3f} x the scan step)"
    )
    print(
        f"{'forward (batch 4B)':28s}{1e3 * s['forward_4b']:10.2f}"
        f"{s['forward_4b'] / s['forward']:10.3f}"
    )
    print(
        f"{'guided 4-branch, per step':28s}{1e3 * s['guided_step']:10.2f}"
        f"{r['guided_step / forward']:10.3f}   (target <= 4.2; "
        f"{r['guided_step / forward_4b']:.3f} x forward at 4B)"
    )
    print()
    print(
        f"{'budget':>10s}{'calls':>7s}{'KL sync':>9s}{'KL adapt end':>14s}{'KL adapt start':>16s}"
        f"{'steps/token':>13s}{'sync@steps':>12s}{'KL':>8s}"
    )
    for row in adaptive:
        assert row["adaptive_end_calls"] == row["adaptive_start_calls"] == row["synchronous_calls"]
        print(
            f"{tuple(row['budget'])!s:>10s}{row['synchronous_calls']:7d}"
            f"{row['kl_synchronous']:9.4f}{row['kl_adaptive_end']:14.4f}"
            f"{row['kl_adaptive_start']:16.4f}{row['adaptive_mean_steps_per_token']:13.1f}"
            f"{row['synchronous_at_mean_steps_calls']:12d}"
            f"{row['kl_synchronous_at_mean_steps']:8.4f}"
        )

    print()
    report.write(args.out, {"timing": timing, "adaptive_vs_synchronous": adaptive}, args)


if __name__ == "__main__":
    main()
