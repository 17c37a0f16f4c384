"""The tiny-world ablation behind the `tiny` defaults (results/tiny/rapm.md).

    python -m rapm_bench.distill.ablation --out results/tiny --runs runs/ablation --num-images 1024

Every variant is the default `rapm-bench distill` with a few fields changed, evaluated
with `rapm-bench eval --model lora:PATH --steps 4` on the first `num_images` pairs of the
`tiny` protocol (same captions and seeds for every row). The default also runs as a
budget series (100, 200, 400, 800 iterations: one run resumed, which equals separate runs
because the LR is constant after warm-up and every iteration is seeded by (seed, step)).
Finished variants are skipped, so the command resumes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import DistillConfig, resolve_distill

VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    # the default: both positions, both discriminators at λ = 0.1, regression 1, rank 1, M 4, w 3, lr 1e-3
    ("default", "λ_abs = λ_rel = 0.1 (discriminators), λ_reg = 1", {}),
    # which loss terms (discriminator weights at the design's 1.0, then without each part)
    ("lambda-1", "discriminators at λ_abs = λ_rel = 1", {"lambda_abs": 1.0, "lambda_rel": 1.0}),
    ("abs-only", "absolute position only (λ_abs = 1, λ_rel = 0)", {"lambda_abs": 1.0, "lambda_rel": 0.0}),
    ("rel-only", "relative position only (λ_abs = 0, λ_rel = 1)", {"lambda_abs": 0.0, "lambda_rel": 1.0}),
    ("no-reg", "both discriminators at 1, no regression", {"lambda_abs": 1.0, "lambda_rel": 1.0, "lambda_reg": 0.0}),
    ("reg-only", "regression only (no discriminators)", {"lambda_abs": 0.0, "lambda_rel": 0.0}),
    # a discriminator vs a plain L2 on the same targets
    ("l2", "plain L2 on both targets (λ = 1, 1) + regression", {"distance": "l2", "lambda_abs": 1.0,
                                                               "lambda_rel": 1.0}),
    ("l2-no-reg", "plain L2 on both targets (λ = 1, 1), no regression",
     {"distance": "l2", "lambda_abs": 1.0, "lambda_rel": 1.0, "lambda_reg": 0.0}),
    # the rest of the defaults, one at a time around the default
    ("rank-4", "LoRA rank 4", {"rank": 4}),
    ("M-2", "M = 2 teacher sub-steps per slot (8-step teacher)", {"substeps": 2}),
    ("M-8", "M = 8 teacher sub-steps per slot (32-step teacher)", {"substeps": 8}),
    ("w-2", "teacher CFG w = 2", {"guidance": 2.0}),
    ("w-5", "teacher CFG w = 5", {"guidance": 5.0}),
    ("lr-3e-4", "LoRA learning rate 3e-4", {"lr": 3e-4}),
    ("seed-1", "the default with another seed (run-to-run noise)", {"seed": 1}),
)
BUDGETS = (100, 200, 400, 800)


def evaluate_lora(lora: Path, out: Path, num_images: int, device: str) -> dict[str, Any]:
    """`rapm-bench eval --model lora:PATH --steps 4 --num-images N` (cached in `out`)."""
    from ..config import EvalConfig, WorldConfig
    from ..eval.engine import evaluate

    done = out / "lora-lora-4step-tiny.json"
    if done.is_file() and json.loads(done.read_text())["num_images"] == num_images:
        return json.loads(done.read_text())
    result = evaluate(EvalConfig(world=WorldConfig(preset="tiny", device=device), model=f"lora:{lora}", steps=4,
                                 num_images=num_images, out=str(out)))
    assert result is not None
    return result


def evaluate_teacher(steps: int, out: Path, num_images: int, device: str) -> dict[str, Any]:
    """`rapm-bench eval --model teacher --steps S --num-images N` (the world's CFG), cached in `out`."""
    from ..config import EvalConfig, WorldConfig
    from ..eval.engine import evaluate

    done = out / f"teacher-{steps}step-tiny.json"
    if done.is_file() and json.loads(done.read_text())["num_images"] == num_images:
        return json.loads(done.read_text())
    result = evaluate(EvalConfig(world=WorldConfig(preset="tiny", device=device), model="teacher", steps=steps,
                                 num_images=num_images, out=str(out)))
    assert result is not None
    return result


def run_variant(cfg: DistillConfig, evals: Path, num_images: int, device: str) -> dict[str, Any]:
    """Distil (or resume) and evaluate one config."""
    from .engine import distill

    out = Path(cfg.out)
    summary_path = out / "summary.json"
    finished = summary_path.is_file() and json.loads(summary_path.read_text())["iters"] == cfg.iters
    if finished:
        summary = json.loads(summary_path.read_text())
    else:
        resume = (out / "config.json").is_file()
        summary = distill(cfg, resume=resume)
    return {"summary": summary, "eval": evaluate_lora(out / "lora.safetensors", evals, num_images, device)}


def main(argv: list[str] | None = None) -> None:
    """Run every variant, the budget series and the teacher baselines; write JSON, table and curves."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/tiny"), help="folder for rapm_ablation.{json,md,png}")
    p.add_argument("--runs", type=Path, default=Path("runs/ablation"), help="folder for the run folders")
    p.add_argument("--num-images", type=int, default=1024, help="eval pairs per row (> 128, the feature size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None

    rows: dict[str, Any] = {"num_images": args.num_images, "variants": {}, "budget": {}, "teacher": {}}
    out_json = args.out / "rapm_ablation.json"
    if out_json.is_file():
        rows = json.loads(out_json.read_text()) | {"num_images": args.num_images}

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(rows, indent=2) + "\n")

    base = resolve_distill("tiny", device=args.device)
    for budget in BUDGETS:
        if str(budget) in rows["budget"]:
            continue
        cfg = replace(base, out=str(args.runs / "budget"), iters=budget)
        r = run_variant(cfg, args.runs / "budget" / f"eval-{budget}", args.num_images, args.device)
        rows["budget"][str(budget)] = _brief(r["eval"]) | {"train_seconds": r["summary"]["train_seconds"]}
        save()
    for name, what, overrides in VARIANTS:
        if (only is not None and name not in only) or name in rows["variants"]:
            continue
        cfg = replace(base, out=str(args.runs / name), **overrides)
        r = run_variant(cfg, args.runs / name / "eval", args.num_images, args.device)
        rows["variants"][name] = {"what": what, "overrides": overrides, **_brief(r["eval"]),
                                  "train_seconds": r["summary"]["train_seconds"],
                                  "trajectory_seconds": r["summary"]["trajectories"]["seconds"]}
        save()
    for steps in (4, 50):
        rows["teacher"][str(steps)] = _brief(evaluate_teacher(steps, args.runs / "teacher", args.num_images,
                                                              args.device))
        save()
    write_table(rows, args.out / "rapm_ablation.md")
    plot_curves(args.runs, [n for n, _, _ in VARIANTS if (only is None or n in only)], rows, args.out / "rapm_curves.png")


def comparison_grid(lora: Path, path: Path, n: int = 10, device: str = "cpu") -> None:
    """Eval captions 0..n-1, seeds 0..n-1: teacher 50-step and 4-step (CFG), RAPM 4-step (guidance 1)."""
    from ..generate import generate_batch
    from ..sampling import DDIM_TRAILING
    from ..worlds.shapes import eval_captions
    from ..worlds.tiny import load_tiny_world
    from ..worlds.tiny_train import save_grid_png

    world = load_tiny_world(device)
    prompts, seeds = eval_captions(n), list(range(n))
    w = world.default_guidance
    rows = [(f"teacher 50 w{w:g}", generate_batch(world, prompts, seeds, DDIM_TRAILING, 50, w)),
            (f"teacher 4 w{w:g}", generate_batch(world, prompts, seeds, DDIM_TRAILING, 4, w))]
    world.load_lora(lora)
    rows.append(("RAPM 4 w1", generate_batch(world, prompts, seeds, DDIM_TRAILING, 4, 1.0)))
    save_grid_png(rows, path)


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """The scores of an eval result."""
    return {k: result[k] for k in ("fid", "clip_score", "retrieval_accuracy", "num_images", "device")}


def write_table(rows: dict[str, Any], path: Path) -> None:
    """The ablation as a Markdown table."""
    lines = [f"Eval: `tiny` protocol, first {rows['num_images']} pairs, 4 steps DDIM trailing, guidance 1 "
             "(teacher rows: the world's CFG).", "",
             "| variant | what changes | FID ↓ | CLIP ↑ | retrieval ↑ | train s |", "|---|---|---|---|---|---|"]
    for steps, t in sorted(rows["teacher"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| teacher {steps}-step | CFG {3.0:g} | {t['fid']:.2f} | {t['clip_score']:.2f} | "
                     f"{t['retrieval_accuracy']:.3f} | – |")
    for name, v in rows["variants"].items():
        lines.append(f"| {name} | {v['what']} | {v['fid']:.2f} | {v['clip_score']:.2f} | "
                     f"{v['retrieval_accuracy']:.3f} | {v['train_seconds']:.0f} |")
    lines += ["", "Budget (the default, iterations):", "", "| iterations | FID ↓ | CLIP ↑ | retrieval ↑ | train s |",
              "|---|---|---|---|---|"]
    for it, b in sorted(rows["budget"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {it} | {b['fid']:.2f} | {b['clip_score']:.2f} | {b['retrieval_accuracy']:.3f} | "
                     f"{b['train_seconds']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def plot_curves(runs: Path, names: list[str], rows: dict[str, Any], path: Path) -> None:
    """Training curves (MSE to the teacher's points, discriminator accuracy) and FID against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in names:
        log = runs / name / "train_log.jsonl"
        if not log.is_file():
            continue
        data = [json.loads(line) for line in log.read_text().splitlines()]
        steps = [d["step"] for d in data]
        axes[0].plot(steps, _smooth([d["mse_abs"] for d in data]), label=name, lw=1)
        if "acc_abs" in data[0]:
            axes[1].plot(steps, _smooth([d["acc_abs"] for d in data]), label=f"{name} abs", lw=1)
        if "acc_rel" in data[0]:
            axes[1].plot(steps, _smooth([d["acc_rel"] for d in data]), "--", label=f"{name} rel", lw=1)
    axes[0].set(title="MSE(z^φ_n, z̃_n), slot mean (smoothed)", xlabel="iteration", yscale="log")
    axes[0].legend(fontsize=7)
    axes[1].set(title="discriminator accuracy (smoothed)", xlabel="iteration")
    axes[1].legend(fontsize=6, ncol=2)
    budget = sorted((int(k), v["fid"]) for k, v in rows["budget"].items())
    if budget:
        axes[2].plot(*zip(*budget, strict=True), "o-", label="RAPM 4-step (default)")
    for steps, t in rows["teacher"].items():
        axes[2].axhline(t["fid"], ls="--", color="gray" if steps == "4" else "black", label=f"teacher {steps}-step")
    axes[2].set(title=f"FID ({rows['num_images']} pairs) vs iterations", xlabel="iterations", xscale="log")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _smooth(values: list[float], k: int = 5) -> list[float]:
    """Trailing moving average."""
    return [sum(values[max(0, i - k + 1) : i + 1]) / (i - max(0, i - k + 1) + 1) for i in range(len(values))]


if __name__ == "__main__":
    main()
