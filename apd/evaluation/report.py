"""The Markdown report of `python -m apd.evaluate`: metrics tables and the pictures beside them.

`write(out_dir, results)` (results: step -> the step's results.json record) writes
OUT_DIR/report.md: the metrics of every evaluated checkpoint, then, for the latest one, the
inpainting table per mask family and method, bits/dim per path, the sample grids, the pictures
of other sampling plans found in `pictures_dir` (WORKDIR/report/, where the main job puts them),
and what produced the numbers. Values are "mean ± std over seeds" (the std needs two seeds or more).
"""

import json
import os
from typing import Any

from apd.evaluation import masks

REPORT = "report.md"


def fmt(entry: dict[str, Any] | None, digits: int = 2) -> str:
    """'mean ± std' (or the mean alone for one seed); '-' when missing."""
    if not entry:
        return "-"
    out = f"{entry['mean']:.{digits}f}"
    if entry.get("std") is not None:
        out += f" ± {entry['std']:.{digits}f}"
    return out


def _generation_and_likelihood_rows(results: dict[int, dict]) -> tuple[list[str], list[str]]:
    paths = sorted(
        {
            name.split("/")[1]
            for r in results.values()
            for name in r["summary"]
            if name.startswith("likelihood/")
        }
    )
    header = ["step", "generation FID", "generation KID"] + [f"bits/dim ({p})" for p in paths]
    rows = []
    for step in sorted(results):
        summary = results[step]["summary"]
        cells = [
            str(step),
            fmt(summary.get("generation/fid")),
            fmt(summary.get("generation/kid"), 4),
        ]
        cells += [fmt(summary.get(f"likelihood/{p}/bits_per_dim"), 3) for p in paths]
        rows.append("| " + " | ".join(cells) + " |")
    return header, rows


def _table(header: list[str], rows: list[str]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *rows,
    ]


def inpainting_rows(summary: dict[str, dict]) -> list[tuple[str, str, dict[str, Any]]]:
    """(family, method, {metric: entry}) for every inpainting setting in a summary."""
    settings: dict[tuple[str, str], dict[str, Any]] = {}
    for name, entry in summary.items():
        parts = name.split("/")
        if parts[0] == "inpainting" and len(parts) == 4:
            settings.setdefault((parts[1], parts[2]), {})[parts[3]] = entry

    def order(item):
        (family, method), _ = item
        rank = masks.FAMILIES.index(family) if family in masks.FAMILIES else len(masks.FAMILIES)
        return rank, family, method != "apd", method

    return [(f, m, metrics) for (f, m), metrics in sorted(settings.items(), key=order)]


def sample_pictures(out_dir: str, pictures_dir: str | None) -> list[str]:
    """Markdown for the `apd.sample` / `apd.levels` outputs under pictures_dir (the main job
    writes them to WORKDIR/report/): each plan's grid with what produced it."""
    if not pictures_dir or not os.path.isdir(pictures_dir):
        return []
    lines = []
    for name in sorted(os.listdir(pictures_dir)):
        folder = os.path.join(pictures_dir, name)
        info_path = os.path.join(folder, "sample_info.json")
        if os.path.exists(info_path) and os.path.exists(os.path.join(folder, "samples.png")):
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
            options = ", ".join(f"{k}={v}" for k, v in info.get("plan_options", {}).items())
            caption = (
                f"{name}: plan {info['plan']}{' (' + options + ')' if options else ''}, "
                f"{info['steps']} steps, input guidance {info['input_guidance']}, "
                f"{info['network_calls']['total']} network calls"
            )
            rel = os.path.relpath(os.path.join(folder, "samples.png"), out_dir)
            lines += [f"**{caption}**", "", f"![{name}]({rel})", ""]
    levels = os.path.join(pictures_dir, "levels", "levels_all.png")
    if os.path.exists(levels):
        rel = os.path.relpath(levels, out_dir)
        lines += ["**Training level samplers (histograms, `python -m apd.levels`)**", ""]
        lines += [f"![level samplers]({rel})", ""]
    if lines:
        lines = ["## Sampling plans", "", *lines]
    return lines


def write(
    out_dir: str, results: dict[int, dict], title: str, pictures_dir: str | None = None
) -> str:
    """Writes OUT_DIR/report.md from the results of every evaluated step; returns its path."""
    lines = [f"# {title}", ""]
    if not results:
        lines.append("No checkpoint evaluated yet.")
    else:
        latest = max(results)
        record = results[latest]
        prov = record["provenance"]
        header, rows = _generation_and_likelihood_rows(results)
        lines += ["## Metrics by checkpoint", "", *_table(header, rows), ""]
        inpainting = inpainting_rows(record["summary"])
        if inpainting:
            lines += [f"## Inpainting (checkpoint {latest})", ""]
            header = [
                "mask family",
                "method",
                "calls",
                "FID",
                "KID",
                "PSNR (dB)",
                "SSIM",
                "LPIPS",
                "known px",
            ]
            rows = []
            for family, method, m in inpainting:
                exact = m.get("known_max_abs_error")
                known = "-" if exact is None else "exact" if exact["max"] == 0 else "NOT exact"
                calls = m.get("evaluations_per_image")
                cells = [
                    family,
                    method,
                    "-" if calls is None else f"{calls['mean']:g}",
                    fmt(m.get("fid")),
                    fmt(m.get("kid"), 4),
                    fmt(m.get("psnr")),
                    fmt(m.get("ssim"), 3),
                    fmt(m.get("lpips"), 3),
                    known,
                ]
                rows.append("| " + " | ".join(cells) + " |")
            lines += [*_table(header, rows), ""]
            count = record["provenance"]["evaluate"]["inpainting"]["num_images"]
            lines += [
                f"FID here is over {count} completed images per family: Fréchet distances are "
                "biased upwards at small counts, so compare them only at equal counts (not with "
                "the generation FID above when its sample count differs); KID is unbiased. "
                "calls: network evaluations per image (guidance branches count).",
                "",
            ]
        recon = {
            k.removeprefix("reconstruction/"): v
            for k, v in record["summary"].items()
            if k.startswith("reconstruction/")
        }
        if recon:
            lines += [f"## The autoencoder (checkpoint {latest})", ""]
            leaks = sorted(k for k in recon if k.startswith("leakage/"))
            header = [
                "PSNR (dB)",
                "PSNR unquantised",
                "SSIM",
                "LPIPS",
                "rFID",
                "rKID",
                "code usage",
                "perplexity",
                "leakage",
                *leaks,
            ]
            cells = [
                fmt(recon.get("psnr")),
                fmt(recon.get("psnr_unquantized")),
                fmt(recon.get("ssim"), 3),
                fmt(recon.get("lpips"), 3),
                fmt(recon.get("fid")),
                fmt(recon.get("kid"), 4),
                fmt(recon.get("code_usage"), 3),
                fmt(recon.get("code_perplexity"), 1),
                fmt(recon.get("leakage"), 4),
                *[fmt(recon.get(k), 4) for k in leaks],
            ]
            lines += [*_table(header, ["| " + " | ".join(cells) + " |"]), ""]
            lines += [
                "decode(encode(x)) of the inpainting inputs, no mask (rFID/rKID against the split "
                "without them); PSNR unquantised: the encoder's latents decoded without the "
                "quantiser (the gap is what it costs); code usage: the fraction of the code "
                "space their tokens use. "
                "leakage: how far the fully known tokens' latents move when the "
                "image is encoded with a hole (mean |z_masked - z_full| / std(z_full)), per mask "
                "family.",
                "",
            ]
        step_dir = f"step_{latest:08d}"
        pictures = [u for u in record["units"] if u.get("images")]
        first_seed = min((u["settings"]["seed"] for u in pictures), default=None)
        shown = [u for u in pictures if u["settings"]["seed"] == first_seed]
        if shown:
            lines += [f"## Pictures (checkpoint {latest}, seed {first_seed})", ""]
            lines += [
                "Inpainting panels: the input with the region to generate in grey | the "
                "result | the original.",
                "",
            ]
            for unit in shown:
                caption = unit["unit"].rsplit(".seed", 1)[0]
                lines += [f"**{caption}**", "", f"![{caption}]({step_dir}/{unit['images']})", ""]
        lines += sample_pictures(out_dir, pictures_dir)
        lines += ["## What produced these numbers", ""]
        lines += [f"- {k}: `{v}`" for k, v in _provenance_lines(prov)]
        lines += [
            "",
            f"Per-unit records: `{step_dir}/units/`; all of it: `{step_dir}/results.json`.",
        ]
    path = os.path.join(out_dir, REPORT)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _provenance_lines(prov: dict[str, Any]) -> list[tuple[str, Any]]:
    ev = prov["evaluate"]
    out = [
        ("checkpoint", f"{prov['workdir']} step {prov['checkpoint_step']} ({prov['params']})"),
        ("model", prov["model"]),
        ("precision", prov["precision"]),
        ("schedule / prediction", f"{prov['schedule']} / {prov['prediction']}"),
        ("sampler", f"DDIM, {ev['steps']} steps, eta {ev['eta']}"),
        ("seeds", ev["seeds"]),
    ]
    if prov.get("features"):
        feats = prov["features"]
        out.append(("FID features", f"{feats['name']} sha256 {feats['sha256'][:16]}"))
        ref = feats["reference"]
        out.append(
            (
                "reference statistics",
                f"{ref['dataset']}/{ref['split']}, {ref['count']} images, "
                f"sha256 {str(ref['stats_sha256'])[:16]}",
            )
        )
    out.append(("devices", prov["devices"]))
    out.append(("apd / jax", f"{prov['apd_version']} / {prov['jax_version']}"))
    return out
