"""Why input guidance helps or not: the one-step error of the guided prediction, by level.

    python benchmarks/input_guidance.py --workdir=W [--workdir=W2 ...] [--num=160]
        [--families=extrema,square,thin,wide,half,perlin] [--mask_seed=0]
        [--levels=0.1,0.2,...,1.0] [--scales=0,0.5,1,1.5,2,4] [--context=match]
        [--batch=64] [--seed=0] [--out=FILE.json] [--plot=FILE.png]

Each W is a pixel-space training run (`apd.train`; several: one per training seed). For the first
--num test images and the evaluation's masks of each family (`apd.evaluation.masks`, seed
--mask_seed), the pixels to generate are noised to one level t (the known pixels stay clean, as in
apd's inpainting plan), and the run's EMA model predicts the clean image twice through the
sampler's own guidance code (`apd.sampling.guidance.guided_prediction`): unguided (x0) and with
input guidance of scale 1 (x1), the noisier context at --context ('match': the level of the
generated pixels). Input guidance of scale w predicts x0 + w d with d = x1 - x0, so over the
generated pixels, with r = x - x0 the unguided prediction's error,

    MSE(w) = (|r|^2 - 2 w <r, d> + w^2 |d|^2) / n,    minimised at  w* = <r, d> / |d|^2,

exactly (the guided prediction is affine in w). w* is an oracle: the best scale along guidance's
direction given the true image. The unguided prediction of a well-trained denoiser is the
posterior mean, the minimiser of the expected squared error, so w* near 0 says that guidance has
nothing to add to one step's prediction; a w* well above 0 would say that the model under-uses
its context and guidance corrects it. cos(r, d) is how much of the error guidance's direction
explains.

Prints, per family and level, MSE(w) / MSE(0) for each --scales value, w* and cos(r, d) (mean and
95% t-interval over the runs when there are several), writes JSON (`report.write`) and, with
--plot, a figure: w* against the level per family, and MSE(w) / MSE(0) against the level per
scale (mean over the families). One step's
error bounds what guidance can do for fidelity (PSNR); a sample's realism (FID, KID) is measured
by `experiments/sampling_settings.py`.
"""

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import report

from apd import corruption, run_sampler, runs
from apd.evaluation import masks
from apd.sampling import ddim, guidance
from apd.sampling import images as images_lib
from apd.sweeps import table

FAMILIES = ("extrema", "square", "thin", "wide", "half", "perlin")


def _floats(text: str, name: str, lo: float | None = None, hi: float | None = None) -> list:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--{name} takes comma-separated numbers such as 0.5,1; got {text!r}."
        ) from None
    for v in values:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"--{name} values must lie in [{lo}, {hi}]; got {v}.")
    return values


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", required=True, help="run (repeatable)")
    parser.add_argument("--num", type=int, default=160, help="test images per family")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--mask_seed", type=int, default=0, help="the evaluation seed's masks")
    parser.add_argument(
        "--levels",
        type=lambda s: _floats(s, "levels", 0.0, 1.0),
        default=[round(0.1 * i, 1) for i in range(1, 11)],
    )
    parser.add_argument(
        "--scales", type=lambda s: _floats(s, "scales"), default=[0.0, 0.5, 1.0, 1.5, 2.0, 4.0]
    )
    parser.add_argument("--context", default="match", help="'match' or a level in [0, 1]")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the noise's seed")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "input_guidance.json"),
    )
    parser.add_argument("--plot", default=None, help="a PNG of w* and MSE(w) / MSE(0)")
    args = parser.parse_args()
    for name in ("num", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if 0.0 in args.levels:
        parser.error("--levels must be above 0 (a pixel at level 0 is not generated).")
    args.families = args.families.split(",")
    unknown = sorted(set(args.families) - set(masks.FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {unknown}; the families are {masks.FAMILIES}.")
    if args.context != "match":
        try:
            args.context = _floats(args.context, "context", 0.0, 1.0)[0]
        except argparse.ArgumentTypeError as err:
            parser.error(f"--context must be 'match' or a level in [0, 1]: {err}")
    return parser, args


def error_terms(
    denoise,
    x: jax.Array,
    known: jax.Array,
    labels: jax.Array | None,
    level: jax.Array,
    key: jax.Array,
    *,
    schedule,
    prediction: str,
    num_classes: int,
    context: float | None,
) -> jax.Array:
    """Per image [B, 4]: |r|^2, <r, d>, |d|^2 over the generated pixels and their count (pixels x
    channels), for the unguided prediction x0 (r = x - x0) and d = x1 - x0, x1 guided at scale 1.

    Args:
      denoise: (z, levels, labels) -> the network's prediction (`images.denoiser`).
      x: [B, H, W, C] clean images; known: [B, H, W], 1 = known; labels: [B] or None.
      level: scalar, the level of the generated pixels; key: the noise and the context's noise.
      context: None for 'match', else the noisier context's level.
    """
    update = known == 0
    t = jnp.where(update, level, 0.0)
    key_noise, key_context = jax.random.split(key)
    z = ddim.noised(x, t, jax.random.normal(key_noise, x.shape, jnp.float32), schedule)

    def clean_image(scale, branches):
        pred = guidance.guided_prediction(
            denoise,
            z,
            t,
            update,
            labels,
            key_context,
            branches=branches,
            num_classes=num_classes,
            cfg_scale=jnp.float32(0.0),
            input_scale=jnp.float32(scale),
            level=context,
            schedule=schedule,
        )
        return corruption.to_x_eps(pred, z, t, schedule, prediction)[0]

    x0 = clean_image(0.0, guidance.Branches())
    x1 = clean_image(1.0, guidance.Branches(input=True))
    weight = update[..., None].astype(jnp.float32) * jnp.ones_like(x)
    r, d = x - x0, x1 - x0
    axes = tuple(range(1, x.ndim))
    return jnp.stack(
        [jnp.sum(weight * v, axis=axes) for v in (r * r, r * d, d * d, jnp.ones_like(x))], axis=-1
    )


def summarise(terms: np.ndarray, scales: list[float]) -> dict:
    """From error terms pooled over images [4]: MSE(w) / MSE(0) per scale, w* and cos(r, d)."""
    rr, rd, dd, _ = (float(v) for v in terms)
    ratio = {f"{w:g}": (rr - 2 * w * rd + w * w * dd) / rr for w in scales}
    return {
        "mse": rr / float(terms[3]),
        "mse_ratio": ratio,
        "w_star": rd / dd if dd > 0 else 0.0,
        "cos": rd / np.sqrt(rr * dd) if dd > 0 else 0.0,
    }


def measure(workdir: str, args: argparse.Namespace) -> dict:
    """{family: {level: summary}} for one run."""
    run = runs.load(workdir)
    if run.latent:
        raise ValueError(f"{workdir} is a latent run; this check takes pixel-space runs.")
    sampler = run_sampler.Sampler(run, batch=min(args.batch, args.num))
    x, data_labels = runs.first_images(run, "test", args.num)
    labels = run_sampler.resolve_labels(
        run.config.evaluate.inpainting.labels,
        run.num_classes,
        args.num,
        args.mask_seed,
        data_labels,
    )
    fn = jax.jit(
        functools.partial(
            error_terms,
            schedule=run.schedule,
            prediction=run.prediction,
            num_classes=run.num_classes,
            context=None if args.context == "match" else args.context,
        ),
        static_argnums=0,
    )
    denoise = images_lib.denoiser(run.model.apply, sampler.params)
    out = {}
    for family in args.families:
        known = masks.make_masks(family, args.mask_seed, args.num, run.image_shape[:2])
        out[family] = {}
        for level in args.levels:
            terms = sampler.map_chunks(
                lambda key, xb, kb, lb, lv=level: fn(denoise, xb, kb, lb, jnp.float32(lv), key),
                args.num,
                args.seed,
                x,
                known,
                labels,
            )
            out[family][f"{level:g}"] = summarise(terms.sum(axis=0), args.scales)
    return {"workdir": run.directory, "step": run.step, "families": out}


def across_runs(per_run: list[dict], args: argparse.Namespace) -> dict:
    """{family: {level: {metric: table.aggregate entry}}} over the runs."""
    out = {}
    for family in args.families:
        out[family] = {}
        for level in (f"{v:g}" for v in args.levels):
            cells = [r["families"][family][level] for r in per_run]
            entry = {
                name: table.aggregate([c[name] for c in cells], None)
                for name in ("mse", "w_star", "cos")
            }
            for w in args.scales:
                key = f"{w:g}"
                entry[f"mse_ratio_{key}"] = table.aggregate(
                    [c["mse_ratio"][key] for c in cells], None
                )
            out[family][level] = entry
    return out


def _cell(entry: dict, digits: int) -> str:
    if entry["error"] is None:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f}±{entry['error']:.{digits}f}"


def plot(summary: dict, args: argparse.Namespace, path: str) -> None:
    """w* per family and MSE(w) / MSE(0) per scale (mean over families) against the level."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120)
    left, right = fig.subplots(1, 2)
    levels = [f"{v:g}" for v in args.levels]
    for family, entries in summary.items():
        w = [entries[lv]["w_star"] for lv in levels]
        left.errorbar(
            args.levels,
            [e["mean"] for e in w],
            yerr=[e["error"] or 0.0 for e in w],
            marker="o",
            ms=3,
            capsize=2,
            label=family,
        )
    left.axhline(0.0, color="k", lw=0.8)
    left.set(xlabel="level t of the generated pixels", ylabel="oracle scale w*")
    left.set_title("best input-guidance scale for one step")
    left.legend(fontsize=7)
    for scale in (w for w in args.scales if w != 0):
        ratios = [
            np.mean([entries[lv][f"mse_ratio_{scale:g}"]["mean"] for entries in summary.values()])
            for lv in levels
        ]
        right.plot(args.levels, ratios, marker="o", ms=3, label=f"w = {scale:g}")
    right.axhline(1.0, color="k", lw=0.8)
    right.set_yscale("log")
    right.set(xlabel="level t of the generated pixels", ylabel="MSE(w) / MSE(0)")
    right.set_title("one-step error, mean over mask families")
    right.legend(fontsize=7)
    fig.suptitle(f"input guidance, context {args.context}, {len(args.workdir)} run(s)")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    parser, args = parse_args()
    per_run = []
    for workdir in args.workdir:
        try:
            per_run.append(measure(workdir, args))
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    summary = across_runs(per_run, args)
    scales = [w for w in args.scales if w != 0]
    print(
        f"{len(per_run)} run(s), {args.num} images per family, context {args.context}: "
        "MSE(w)/MSE(0) of the one-step clean prediction over the generated pixels"
    )
    header = f"{'family':9s}{'t':>5s}" + "".join(f"{'w=' + format(w, 'g'):>14s}" for w in scales)
    print(header + f"{'w*':>16s}{'cos(r,d)':>16s}")
    for family, levels in summary.items():
        for level, entry in levels.items():
            cells = "".join(f"{_cell(entry[f'mse_ratio_{w:g}'], 3):>14s}" for w in scales)
            print(
                f"{family:9s}{level:>5s}{cells}{_cell(entry['w_star'], 3):>16s}"
                f"{_cell(entry['cos'], 3):>16s}"
            )
    # The summary holds every run's values ("values", in --workdir order).
    record = {"runs": [{k: r[k] for k in ("workdir", "step")} for r in per_run], "summary": summary}
    report.write(args.out, record, args)
    if args.plot:
        plot(summary, args, args.plot)


if __name__ == "__main__":
    main()
