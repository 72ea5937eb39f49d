"""The report of a toy run: ``report.md``, ``report.json``, ``metrics_plot.png`` and ``grids/``."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .distill import VARIANTS, engine_overrides
from .evaluate import comparison_grid, load_images
from .plot import plot_panels
from .presets import PRESETS, RESOLUTION, T5_MAX_LENGTH, TEXT_WIDTHS, Preset, scale_label
from .stages import write_json_atomic

logger = logging.getLogger(__name__)

COLUMNS = ["Method", "Steps", "NFE", "FD ↓", "Colour ↑", "Shape ↑", "Position ↑", "Attributes ↑", "Scene ↑"]
METRIC_KEYS = ["fd", "color", "shape", "position", "attributes", "scene"]
FD_RATIO_GOAL = 1.25
ATTRIBUTE_GAP_GOAL = 5.0


def busy_seconds(records) -> float:
    """Wall-clock seconds covered by the stages (the union of their intervals, so stages that ran side by
    side, like the parallel distillation variants, count once)."""
    spans = []
    for r in records:
        if "spans" in r:
            spans += [tuple(span) for span in r["spans"]]
        elif "finished" in r and "seconds" in r:  # a record of a run before spans were recorded
            end = time.mktime(time.strptime(r["finished"], "%Y-%m-%d %H:%M:%S"))
            spans.append((end - float(r["seconds"]), end))
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _fmt_fd(v, se=None) -> str:
    """FD to 3 significant digits, with its bootstrap standard error when known."""
    if v is None or not math.isfinite(v):
        return "–"
    text = f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return text if se is None or not math.isfinite(se) else f"{text} ± {se:.2g}"


def _pct(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def _row(label: str, steps, nfe, m: dict) -> list[str]:
    return [
        label,
        "–" if steps is None else str(steps),
        "–" if nfe is None else str(nfe),
        _fmt_fd(m["fd"], m.get("fd_se")),
        *[_pct(m[k]) for k in ("color", "shape", "position", "attributes", "scene")],
    ]


def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(["---"] * len(columns)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def goal_check(results: dict[str, dict]) -> dict:
    """The issue's goal for the full SenseFlow student against the teacher."""
    full = results["senseflow"]["metrics"]
    many = results["teacher_many"]["metrics"]
    four = results["teacher_4"]["metrics"]
    ratio = full["fd"] / many["fd"] if many["fd"] > 0 else float("inf")
    gap = 100 * (many["attributes"] - full["attributes"])
    beats = full["fd"] < four["fd"] and full["attributes"] >= four["attributes"]
    out = {
        "fd_ratio_to_teacher_many": ratio,
        "fd_ratio_goal": FD_RATIO_GOAL,
        "fd_goal_met": bool(ratio <= FD_RATIO_GOAL),
        "attribute_gap_points": gap,
        "attribute_gap_goal": ATTRIBUTE_GAP_GOAL,
        "attribute_goal_met": bool(gap <= ATTRIBUTE_GAP_GOAL),
        "fd_vs_teacher_4": [full["fd"], four["fd"]],
        "attributes_vs_teacher_4": [full["attributes"], four["attributes"]],
        "beats_teacher_4": bool(beats),
    }
    if "teacher_many_dm" in results:  # the teacher at the DM loss's guidance: the students' target
        dm = results["teacher_many_dm"]["metrics"]
        out["fd_ratio_to_teacher_many_dm"] = full["fd"] / dm["fd"] if dm["fd"] > 0 else float("inf")
        out["attribute_gap_points_to_teacher_many_dm"] = 100 * (dm["attributes"] - full["attributes"])
    return out


def curves(results: dict[str, dict], variants: Sequence[str] = tuple(VARIANTS)) -> dict[str, list[dict]]:
    """Metrics of each variant over iterations, starting with the shared initial generator (iteration 0)."""
    start = {"iter": 0, **results["teacher_4_x0"]["metrics"]}
    return {name: [start, *results[name].get("curve", [])] for name in variants}


def _vfm_line(v: dict) -> str:
    """The setup line of the discriminator's DINOv2."""
    head = (
        f"- **Discriminator backbone**: Dinov2Model, width {v['width']}, {v['depth']} blocks, patch {v['patch']} "
        f"({RESOLUTION // v['patch']} x {RESOLUTION // v['patch']} tokens), {v['parameters'] / 1e6:.2f} M parameters, "
    )
    if not v["steps"]:
        return head + "random (not pre-trained)."
    before, after = v["heldout_before"], v["heldout_after"]
    return head + (
        f"pre-trained here by masked image modelling ({v['steps']} steps): held-out masked-patch L1 "
        f"{before['masked_l1']:.3f} -> {after['masked_l1']:.3f} (predicting the mean image: "
        f"{after['zero_prediction_l1']:.3f})."
    )


def _stage_seconds(records: dict[str, dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, rec in records.items():
        group = name.split("/")[0]
        out[group] = out.get(group, 0.0) + float(rec.get("seconds", 0.0))
    return out


def write_report(
    d: Path,
    out: Path,
    preset: Preset,
    device: torch.device,
    records: dict[str, dict],
    command: str,
    elapsed: float,
    variants: Sequence[str] = tuple(VARIANTS),
) -> dict:
    """Write the report files into ``d`` (the ``report`` stage) and return a summary (``variants``: the
    distillation variants trained, among them ``senseflow``)."""
    from .pipeline import methods

    table = methods(preset, variants)
    results = {m: records[f"eval/{m}"] for m in table}
    rows = []
    for m, info in table.items():
        label = info["label"]
        if m in VARIANTS:
            label += f" (iteration {results[m]['iteration']})"
        rows.append(_row(label, info["steps"], info["nfe"], results[m]["metrics"]))
    goal = goal_check(results)
    curve = curves(results, variants)
    stage_s = _stage_seconds({k: v for k, v in records.items() if k != "report"})

    # plot
    panels = []
    for key, title, scale in (
        ("fd", "Frechet distance (lower is better)", 1.0),
        ("attributes", "Attribute accuracy % (higher is better)", 100.0),
    ):
        panels.append(
            {
                "title": title,
                "series": [
                    {"label": VARIANTS[n][0], "x": [p["iter"] for p in c], "y": [scale * p[key] for p in c]}
                    for n, c in curve.items()
                ],
                "hlines": [
                    {"label": table[m]["label"], "y": scale * results[m]["metrics"][key]}
                    for m in ("teacher_many", "teacher_many_dm", "teacher_4")
                    if m in results
                ],
            }
        )
    backend = plot_panels(panels, d / "metrics_plot.png")

    # grids
    grids = d / "grids"
    grids.mkdir(exist_ok=True)
    sheet_rows = []
    for m in table:
        src = out / "eval" / m / "grid.png"
        if src.is_file():
            shutil.copyfile(src, grids / f"{m}.png")
        label = "Real images" if m == "real" else table[m]["label"]
        sheet_rows.append((label, load_images(out / "eval" / m / "images.npz")[: preset.grid_prompts]))
    comparison_grid(sheet_rows).save(grids / "comparison.png")

    # GPU estimate (the gpu preset), and what this run achieved per stage
    estimate = achieved = None
    if preset.name != "ci":
        from .estimate import H100_TFLOPS, OVERHEAD_S, achieved_tflops, estimate_seconds

        estimate = {
            "preset": "gpu",
            "assumed_tflops": H100_TFLOPS,
            "assumed_overheads_s": OVERHEAD_S,
            "seconds": estimate_seconds(PRESETS["gpu"]),
        }
        achieved = achieved_tflops(preset, stage_s)

    report = {
        "preset": preset.to_dict(),
        "device": str(device),
        "command": command,
        "seconds_this_invocation": elapsed,
        "stage_seconds": stage_s,
        "total_stage_seconds": sum(stage_s.values()),
        "wall_stage_seconds": busy_seconds(records.values()),
        "setup": {
            "data": records["data"],
            "vae": records["vae"],
            "teacher": records["teacher"],
            "backbones": records["backbones"],
            "featnet": records["featnet"],
            "classifiers": records["classifiers"],
            "distill_overrides": engine_overrides(preset, out, device),
            "variants": {
                n: {"label": VARIANTS[n][0], "switches": VARIANTS[n][1], **records[f"distill/{n}"]}
                for n in variants
            },
        },
        "methods": results,
        "table": {"columns": COLUMNS, "rows": rows},
        "curves": curve,
        "goal": goal,
        "gpu_estimate": estimate,
        "achieved_tflops": achieved,
        "plot_backend": backend,
    }
    write_json_atomic(d / "report.json", report)
    md = _markdown(report, preset, table, results, curve, out)
    tmp = d / ".report.md.tmp"
    tmp.write_text(md)
    tmp.replace(d / "report.md")
    logger.info("report: %s", d / "report.md")
    return {"report": str(d / "report.md"), "goal": goal, "variants": list(variants)}


def _fd_parts(table: dict, results: dict) -> list[str]:
    """Markdown lines: each generated row's FD split into its mean and covariance terms, and its features'
    total variance relative to the real images' (a student less varied than the data: below 1); none for
    results evaluated before the parts were recorded."""
    rows = []
    for m, info in table.items():
        x = results[m]["metrics"]
        if m not in ("real", "vae") and "fd_mean_term" in x:
            rows.append(
                [
                    info["label"],
                    _fmt_fd(x["fd"]),
                    _fmt_fd(x["fd_mean_term"]),
                    _fmt_fd(x["fd_cov_term"]),
                    f"{x['feature_variance_ratio']:.2f}",
                ]
            )
    if not rows:
        return []
    head = (
        "FD in parts: the mean term |μ − μ_real|² (the whole set shifted, e.g. every colour a little off) and the "
        "covariance term (another spread or shape), with the features' total variance relative to the real "
        "images' (below 1: less varied than the data, as a mode-seeking student)."
    )
    columns = ["Method", "FD", "Mean term", "Covariance term", "Variance / real's"]
    return [head, "", _md_table(columns, rows), ""]


def _markdown(report: dict, preset: Preset, table: dict, results: dict, curve: dict, out: Path) -> str:
    s = report["setup"]
    goal = report["goal"]
    t = s["teacher"]
    v = s["vae"]
    lines = [
        f"# SenseFlow toy benchmark: preset `{preset.name}`",
        "",
        f"Command: `{report['command']}` on `{report['device']}`; stages took "
        f"{report['wall_stage_seconds'] / 60:.1f} min of wall-clock time "
        f"({report['total_stage_seconds'] / 60:.1f} min summed over stages, parallel ones counted each; "
        "table at the end).",
        "",
        "## Results",
        "",
        f"{preset.num_eval} evaluation prompts with known attributes (one image each, the same initial noise "
        "for every method). FD: Frechet distance to the real images of the same prompts in the feature space "
        "of the feature net trained here; the real row compares an independent real set of *other* prompts "
        "(a reference point, not a floor: generated sets share the reference's prompts, so a good model "
        "can score below it; the VAE row, paired with the reference images, is near 0); ± its bootstrap standard "
        "error over the evaluation prompts (the evaluation's sampling noise only: retraining the same "
        "method moves FD by more). Colour / Shape / Position: % of prompted objects whose grid cell shows the prompted colour / "
        "shape / any object, read by the cell classifier trained here; Attributes: their mean; Scene: % of "
        "prompts with every cell exactly right (no missing, wrong or extra object). NFE: transformer "
        "evaluations per image (CFG costs two).",
        "",
        _md_table(report["table"]["columns"], report["table"]["rows"]),
        "",
        *_fd_parts(table, results),
        "## Goal of issue 9 (full SenseFlow student, 4 steps)",
        "",
        f"- FD ratio to the {preset.teacher_many_steps}-step teacher: **{goal['fd_ratio_to_teacher_many']:.2f}** "
        f"(goal ≤ {FD_RATIO_GOAL}): {'met' if goal['fd_goal_met'] else 'not met'}.",
        f"- Attribute accuracy gap to it: **{goal['attribute_gap_points']:+.1f} points** (goal ≤ {ATTRIBUTE_GAP_GOAL:g}): "
        f"{'met' if goal['attribute_goal_met'] else 'not met'}.",
        f"- Against the undistilled 4-step teacher: FD {goal['fd_vs_teacher_4'][0]:.3g} vs "
        f"{goal['fd_vs_teacher_4'][1]:.3g}, attributes {100 * goal['attributes_vs_teacher_4'][0]:.1f} % vs "
        f"{100 * goal['attributes_vs_teacher_4'][1]:.1f} %: {'better on both' if goal['beats_teacher_4'] else 'not better on both'}.",
    ]
    if "fd_ratio_to_teacher_many_dm" in goal:
        lines.append(
            f"- Against the teacher at the DM loss's guidance (the distribution it pulls towards; not a goal of "
            f"the issue): FD ratio {goal['fd_ratio_to_teacher_many_dm']:.2f}, attribute gap "
            f"{goal['attribute_gap_points_to_teacher_many_dm']:+.1f} points."
        )
    lines += [
        "",
        "## Metrics over distillation iterations",
        "",
        f"![metrics over iterations](metrics_plot.png) (drawn with {report['plot_backend']})",
        "",
    ]
    iters = sorted({p["iter"] for c in curve.values() for p in c})
    cols = ["Iteration"] + [f"{VARIANTS[n][0]}: FD / attr. %" for n in curve]
    rows = []
    for k in iters:
        row = [str(k)]
        for n in curve:
            p = next((p for p in curve[n] if p["iter"] == k), None)
            row.append("–" if p is None else f"{_fmt_fd(p['fd'])} / {_pct(p['attributes'])}")
        rows.append(row)
    lines += [_md_table(cols, rows), ""]
    lines += [
        "## Image grids",
        "",
        f"The first {preset.grid_prompts} evaluation prompts, one row per method (`grids/<method>.png` holds each "
        "method alone):",
        "",
        "![comparison](grids/comparison.png)",
        "",
    ]
    for i, caption in enumerate(_prompts(out)[: preset.grid_prompts]):
        lines.append(f"{i + 1}. {caption}")
    lines += [
        "",
        "## Setup",
        "",
        f"- **Data** (generated in code, seeded): {s['data']['num_train']} training scenes of 1-3 shapes (8 colours, "
        f"3 shapes, 2 sizes, 9 grid cells, 5 backgrounds plain or gradient) at {RESOLUTION} px, drawn at 2x and "
        f"box-filtered; {s['data']['num_engine_images']} of them as PNG + dataset.json for the engine; "
        f"{s['data']['num_eval']} evaluation prompts ({s['data']['eval_objects']} objects).",
        f"- **VAE** (trained here): AutoencoderKL, channels {v['channels']}, x4 down-sampling, 8 latent channels, "
        f"{v['parameters'] / 1e6:.2f} M parameters, {v['steps']} steps of batch {v['batch']} (L1 + L2 + 1e-6 KL); "
        f"scaling factor {v['scaling_factor']:.3f}, shift {v['shift_factor']:.3f}; PSNR on the evaluation images "
        f"{v['eval_psnr_db']:.1f} dB.",
        f"- **Text encoders**: CLIP-L and CLIP-G (2 layers, width {TEXT_WIDTHS[0]}/{TEXT_WIDTHS[1]}) and T5 "
        f"(2 layers, width {TEXT_WIDTHS[2]}), random but fixed (seeded, never trained); T5 length "
        f"{T5_MAX_LENGTH} (CLIP 77).",
        f"- **Teacher transformer** (trained here): SD3Transformer2DModel, {t['size']}, "
        f"{t['parameters'] / 1e6:.2f} M parameters; rectified flow, logit-normal levels on the shift-3 table, "
        f"10 % caption dropout, {t['steps']} steps of batch {t['batch']}, EMA {preset.ema_decay}; final loss "
        f"{t['final_loss']:.4f}.",
        "- **Feature net** (trained here, 64-d bottleneck = FD space): held-out background accuracy "
        + ", ".join(f"{k} {100 * a:.1f} %" for k, a in s["featnet"]["heldout_accuracy"].items())
        + ".",
        _vfm_line(s["backbones"]["dino"]),
        "- **Cell classifier** (trained here): held-out accuracy on occupied cells "
        + ", ".join(
            f"{k} {100 * a:.1f} %" for k, a in s["classifiers"]["heldout_accuracy_occupied_cells"].items()
        )
        + ".",
        f"- **Distillation**: `senseflow.engine.Engine`, base `configs/SD35/sd35_senseflow.yaml`; "
        f"{preset.distill_iters} iterations (generator every "
        f"{preset.distill_iters // max(1, s['variants']['senseflow']['generator_updates'])}: "
        f"{s['variants']['senseflow']['generator_updates']} generator updates), batch {preset.distill_batch}, "
        f"LR {preset.distill_lr:g} for every net and variant (warm-up {preset.distill_warmup}), the DM loss's "
        f"teacher CFG {scale_label(preset.dm_guidance)} (the toy teacher's; SD3.5 Medium's recipe: U(2, 8)); the GAN's heads "
        "(trained) read the toy DINOv2 below and a tiny random CLIP text tower (`discriminator.c_dim=16`). "
        "Shared overrides:",
        "",
        "  ```",
        *[f"  {o}" for o in s["distill_overrides"]],
        "  ```",
        "",
        "  Variant switches: "
        + "; ".join(
            f"{lab}: `{' '.join(sw) or '(none)'}`"
            for lab, sw in ((x["label"], x["switches"]) for x in s["variants"].values())
        )
        + ".",
        "",
        "## Stage times",
        "",
        _md_table(["Stage", "Seconds"], [[k, f"{sec:.1f}"] for k, sec in report["stage_seconds"].items()]),
        "",
    ]
    dist_rows = [
        [x["label"], f"{x['seconds']:.1f}", f"{x['seconds'] / x['iterations']:.3f}"]
        for x in s["variants"].values()
    ]
    lines += [_md_table(["Distillation run", "Seconds", "Seconds / iteration"], dist_rows), ""]
    if report["gpu_estimate"]:
        est = report["gpu_estimate"]
        lines += [
            "## Estimated time of the `gpu` preset on one H100",
            "",
            f"Counted FLOPs per stage at an assumed {est['assumed_tflops']:g} TFLOP/s sustained (bf16) plus a fixed "
            f"cost per step ({', '.join(f'{k} {1000 * x:.0f} ms' for k, x in est['assumed_overheads_s'].items())}); "
            "see `senseflow/toy/estimate.py`. `total` adds the stages up; `wall` counts the stages that need only "
            "the data (backbones, featnet, classifiers) beside the VAE and teacher, as they run on a GPU.",
            "",
            _md_table(["Stage", "Estimated seconds"], [[k, f"{x:.0f}"] for k, x in est["seconds"].items()]),
            "",
            "Sustained TFLOP/s this run achieved per stage (same FLOP count): "
            + ", ".join(f"{k} {x:.3f}" for k, x in (report["achieved_tflops"] or {}).items())
            + ".",
            "",
        ]
    return "\n".join(lines)


def _prompts(out: Path) -> list[str]:
    path = out / "data" / "eval.json"
    return json.loads(path.read_text())["captions"] if path.is_file() else []
