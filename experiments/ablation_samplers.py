"""The paper's Table 1 at small scale: one Fashion-MNIST run per training level sampler.

Every run is the embedded default (`experiments/fashion_mnist.py`: the same model, steps, batch,
optimizer and seed) with only the training level sampler changed, and every run is evaluated
the same way (two evaluation seeds, DDIM 25 steps, all six mask families), so the table compares
samplers and nothing else. RePaint on the synchronous model is the inpainting baseline.

    # the whole sweep, sequentially: train each sampler, evaluate each, assemble the table.
    # Relaunching resumes (finished runs and evaluation units are kept).
    python -m experiments.ablation_samplers --root=runs/ablation

    # where there are machines: one sampler per machine, then the table on any of them
    python -m experiments.ablation_samplers --root=runs/ablation --only=perlin
    python -m experiments.ablation_samplers --root=runs/ablation --stage=table

    # one run by hand (what the runner launches for each sampler)
    python -m apd.train --config=experiments/ablation_samplers.py:sampler=perlin \
        --workdir=runs/ablation/perlin
    python -m apd.evaluate --config=experiments/ablation_samplers.py:sampler=perlin \
        --workdir=runs/ablation/perlin

Output: ROOT/SAMPLER/ (each run and its eval/), ROOT/table.md and ROOT/table.json.

Config arguments: sampler (one of SAMPLERS), steps (training steps of every run), smoke.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import ml_collections as mc

from apd.evaluation import masks
from experiments import common, fashion_mnist

SAMPLERS = ("synchronous", "independent", "patchwise", "perlin", "asyncpatch")
BASELINE = "synchronous"  # the model RePaint runs on
STAGES = ("all", "train", "evaluate", "table")


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(arg, sampler="asyncpatch", steps=1200, smoke=False)
    if arg.sampler not in SAMPLERS:
        raise ValueError(f"sampler={arg.sampler!r}; the sweep's samplers are {SAMPLERS}.")
    config = fashion_mnist.get_config(f"sampler={arg.sampler},steps={arg.steps}")
    config.sample_every_steps = config.total_steps  # one grid at the end
    config.evaluate = common.evaluation(
        num_samples=500,
        num_images=160,
        steps=25,
        seeds=(0, 1),
        repaint=arg.sampler == BASELINE,
    )
    config.evaluate.evaluators = ("generation", "inpainting")
    config.evaluate.inpainting.repaint_steps = 25
    config.evaluate.inpainting.repaint_jump = 5
    config.evaluate.inpainting.repaint_resample = 3
    if arg.smoke:
        common.shrink_for_smoke(config)
        config.evaluate.seeds = (0, 1)
    return config


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def _config_arg(sampler: str, args) -> str:
    spec = f"sampler={sampler},steps={args.steps}" + (",smoke" if args.smoke else "")
    return f"--config={os.path.abspath(__file__)}:{spec}"


def _final_step(workdir: str) -> int | None:
    from apd.evaluate import checkpoint_steps

    steps = checkpoint_steps(workdir)
    return max(steps) if steps else None


def _run(cmd: list[str], log: str) -> None:
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    with open(log, "a", encoding="utf-8") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"ablation: the command failed with exit code {code}; see {log}.")


def train(sampler: str, args) -> None:
    workdir = os.path.join(args.root, sampler)
    total = get_config(f"sampler={sampler},steps={args.steps}" + (",smoke" if args.smoke else ""))
    if _final_step(workdir) == total.total_steps:
        print(f"{sampler}: trained ({total.total_steps} steps)", flush=True)
        return
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    _run(
        [sys.executable, "-m", "apd.train", _config_arg(sampler, args), f"--workdir={workdir}"],
        os.path.join(args.root, f"{sampler}.train.log"),
    )
    print(f"{sampler}: trained in {time.time() - t0:.0f} s", flush=True)


def evaluate(sampler: str, args) -> None:
    workdir = os.path.join(args.root, sampler)
    cmd = [sys.executable, "-m", "apd.evaluate", _config_arg(sampler, args), f"--workdir={workdir}"]
    if args.feature_dir:
        cmd.append(f"--feature_dir={args.feature_dir}")
    t0 = time.time()
    _run(cmd, os.path.join(args.root, f"{sampler}.eval.log"))
    print(f"{sampler}: evaluated in {time.time() - t0:.0f} s", flush=True)


def _results(root: str, sampler: str) -> dict | None:
    eval_dir = os.path.join(root, sampler, "eval")
    if not os.path.isdir(eval_dir):
        return None
    steps = sorted(n for n in os.listdir(eval_dir) if n.startswith("step_"))
    for name in reversed(steps):
        path = os.path.join(eval_dir, name, "results.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return None


def _cell(entry: dict | None, digits: int) -> str:
    if not entry:
        return "-"
    out = f"{entry['mean']:.{digits}f}"
    return out + (f" ± {entry['std']:.{digits}f}" if entry.get("std") is not None else "")


def table(root: str) -> str:
    """Assembles ROOT/table.md and ROOT/table.json from the runs' evaluation results."""
    results = {s: r for s in SAMPLERS if (r := _results(root, s)) is not None}
    if not results:
        sys.exit(f"ablation: no evaluation results under {root} yet.")
    present = {
        name.split("/")[1]
        for r in results.values()
        for name in r["summary"]
        if name.startswith("inpainting/")
    }
    families = [f for f in masks.FAMILIES if f in present]
    rows = []  # (label, summary prefix) per table row
    for sampler, r in results.items():
        rows.append((sampler, sampler, "apd"))
        if sampler == BASELINE and any("/repaint/" in n for n in r["summary"]):
            rows.append((f"RePaint on {sampler}", sampler, "repaint"))
    any_result = next(iter(results.values()))
    ev = any_result["provenance"]["evaluate"]
    lines = [
        "Generation FID_FMNIST and inpainting FID_FMNIST / PSNR (dB) per mask family; mean ± std "
        f"over evaluation seeds {ev['seeds']}. Step {any_result['step']}, "
        f"{ev['generation']['num_samples']} generated samples, {ev['inpainting']['num_images']} "
        f"test images per family, DDIM {ev['steps']} steps (eta {ev['eta']}); RePaint "
        f"{ev['inpainting']['repaint_steps']} steps, jump {ev['inpainting']['repaint_jump']}, "
        f"resample {ev['inpainting']['repaint_resample']}. Lower FID is better, higher PSNR.",
        "",
    ]
    header = ["training sampler", "generation FID"] + [f"{f} FID" for f in families]
    fid_lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    header = ["training sampler"] + [f"{f} PSNR" for f in families]
    psnr_lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    data = {}
    for label, sampler, method in rows:
        summary = results[sampler]["summary"]
        gen = summary.get("generation/fid") if method == "apd" else None
        fids = [summary.get(f"inpainting/{f}/{method}/fid") for f in families]
        psnrs = [summary.get(f"inpainting/{f}/{method}/psnr") for f in families]
        fid_lines.append(
            "| " + " | ".join([label, _cell(gen, 2)] + [_cell(e, 2) for e in fids]) + " |"
        )
        psnr_lines.append("| " + " | ".join([label] + [_cell(e, 2) for e in psnrs]) + " |")
        data[label] = {
            "generation_fid": gen,
            "inpainting": {
                f: {"fid": fid, "psnr": psnr}
                for f, fid, psnr in zip(families, fids, psnrs, strict=True)
            },
        }
    lines += ["FID_FMNIST (generation; inpainting per mask family):", "", *fid_lines, ""]
    lines += ["Inpainting PSNR (dB) per mask family:", "", *psnr_lines]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(root, "table.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(root, "table.json"), "w", encoding="utf-8") as f:
        json.dump({"evaluate": ev, "step": any_result["step"], "rows": data}, f, indent=2)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="directory of the sweep's runs")
    parser.add_argument("--stage", default="all", choices=STAGES)
    parser.add_argument("--only", default=None, choices=SAMPLERS, help="one sampler")
    parser.add_argument("--steps", type=int, default=1200, help="training steps of every run")
    parser.add_argument("--feature_dir", default=None, help="FMNIST feature network directory")
    parser.add_argument("--smoke", action="store_true", help="tiny runs (tests)")
    args = parser.parse_args(argv)
    args.root = os.path.abspath(args.root)
    os.makedirs(args.root, exist_ok=True)
    samplers = (args.only,) if args.only else SAMPLERS
    t0 = time.time()
    if args.stage in ("all", "train"):
        for sampler in samplers:
            train(sampler, args)
    if args.stage in ("all", "evaluate"):
        for sampler in samplers:
            evaluate(sampler, args)
    if args.stage in ("all", "table") and not args.only:
        print(table(args.root))
    print(f"ablation: {args.stage} done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
