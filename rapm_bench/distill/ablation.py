"""The tiny-world ablation behind the `tiny` defaults (results/tiny/rapm.md).

    python -m rapm_bench.distill.ablation --out results/tiny --runs runs/ablation --num-images 1024
    python -m rapm_bench.distill.ablation --steps --num-images 512 --jobs 12 --device cuda   # N = 1, 2

Every variant is the default `rapm-bench distill` with a few fields changed, evaluated
with `rapm-bench eval --model lora:PATH --steps 4` on the first `num_images` pairs of the
`tiny` protocol (same captions and seeds for every row). The default also runs as a
budget series (50 … 800 iterations: one run resumed, which equals separate runs
because the LR is constant after warm-up and every iteration is seeded by (seed, step)).
Finished variants are skipped, so the command resumes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import DistillConfig, override, resolve_distill

VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    # the default: both positions, both discriminators at λ = 0.1, regression 1, rank 1, M 4, w 2, lr 1e-3, 200 it
    ("default", "λ_abs = λ_rel = 0.1 (discriminators), λ_reg = 1", {}),
    ("seed-1", "the default, seed 1 (run-to-run noise)", {"seed": 1}),
    ("seed-2", "the default, seed 2 (run-to-run noise)", {"seed": 2}),
    # which positions: one discriminator at a time, then neither
    ("abs-only", "absolute position only (λ_rel = 0)", {"lambda_rel": 0.0}),
    ("rel-only", "relative position only (λ_abs = 0)", {"lambda_abs": 0.0}),
    ("reg-only", "no discriminators (λ_abs = λ_rel = 0): regression only", {"lambda_abs": 0.0, "lambda_rel": 0.0}),
    # the regression term and the adversarial weight
    ("no-reg", "no regression (λ_reg = 0)", {"lambda_reg": 0.0}),
    ("lambda-1", "discriminators at λ_abs = λ_rel = 1", {"lambda_abs": 1.0, "lambda_rel": 1.0}),
    ("gan-only-1", "discriminators at 1, no regression", {"lambda_abs": 1.0, "lambda_rel": 1.0, "lambda_reg": 0.0}),
    # a discriminator vs a plain L2 on the same targets
    ("l2", "plain L2 instead of the discriminators (same targets, same λ)", {"distance": "l2"}),
    ("l2-only-1", "plain L2 on both targets at 1, no regression (vs gan-only-1)",
     {"distance": "l2", "lambda_abs": 1.0, "lambda_rel": 1.0, "lambda_reg": 0.0}),
    # the rest of the defaults, one at a time
    ("rank-4", "LoRA rank 4", {"rank": 4}),
    ("M-1", "M = 1 teacher sub-step per slot (4-step teacher)", {"substeps": 1}),
    ("M-2", "M = 2 teacher sub-steps per slot (8-step teacher)", {"substeps": 2}),
    ("M-8", "M = 8 teacher sub-steps per slot (32-step teacher)", {"substeps": 8}),
    ("w-1.5", "teacher CFG w = 1.5", {"guidance": 1.5}),
    ("w-3", "teacher CFG w = 3 (the teacher's own sampling default)", {"guidance": 3.0}),
    ("w-5", "teacher CFG w = 5", {"guidance": 5.0}),
    ("lr-3e-4", "LoRA learning rate 3e-4", {"lr": 3e-4}),
    ("lr-3e-3", "LoRA learning rate 3e-3", {"lr": 3e-3}),
)
BUDGETS = (50, 100, 200, 400, 800)

# Do the discriminators matter where regression blurs? The same objective at N = 1 and 2 slots (`--steps`), where
# one jump spans 500-1000 timesteps and a regression target is an average of many images (issue 13, item 5).
STEP_VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("default", "λ_abs = λ_rel = 0.1 (discriminators), λ_reg = 1", {}),
    ("reg-only", "adversarial off (λ_abs = λ_rel = 0): regression only", {"lambda_abs": 0.0, "lambda_rel": 0.0}),
    ("lambda-0.3", "discriminators at λ_abs = λ_rel = 0.3", {"lambda_abs": 0.3, "lambda_rel": 0.3}),
    ("lambda-1", "discriminators at λ_abs = λ_rel = 1", {"lambda_abs": 1.0, "lambda_rel": 1.0}),
    ("no-reg", "regression off (λ_reg = 0): discriminators alone", {"lambda_reg": 0.0}),
    ("l2", "plain L2 instead of the discriminators (same targets, same λ)", {"distance": "l2"}),
)
STEP_COUNTS = (1, 2)
STEP_SEEDS = (0, 1, 2)


def evaluate_lora(lora: Path, out: Path, num_images: int, device: str, steps: int = 4) -> dict[str, Any]:
    """`rapm-bench eval --model lora:PATH --steps N --num-images K` (cached in `out`)."""
    from ..config import EvalConfig, WorldConfig
    from ..eval.engine import evaluate

    done = out / f"lora-lora-{steps}step-tiny.json"
    if done.is_file() and json.loads(done.read_text())["num_images"] == num_images:
        return json.loads(done.read_text())
    result = evaluate(EvalConfig(world=WorldConfig(preset="tiny", device=device), model=f"lora:{lora}", steps=steps,
                                 num_images=num_images, out=str(out)))
    assert result is not None
    return result


def evaluate_teacher(steps: int, guidance: float, out: Path, num_images: int, device: str) -> dict[str, Any]:
    """`rapm-bench eval --model teacher --steps S --guidance W --num-images N`, cached in `out`."""
    from ..config import EvalConfig, WorldConfig
    from ..eval.engine import evaluate

    done = out / f"teacher-{steps}step-tiny.json"
    if done.is_file() and json.loads(done.read_text())["num_images"] == num_images:
        return json.loads(done.read_text())
    result = evaluate(EvalConfig(world=WorldConfig(preset="tiny", device=device), model="teacher", steps=steps,
                                 guidance=guidance, num_images=num_images, out=str(out)))
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
    return {"summary": summary, "eval": evaluate_lora(out / "lora.safetensors", evals, num_images, device, cfg.slots)}


TEACHER_ROWS = ((4, 3.0), (50, 3.0), (4, 2.0), (50, 2.0), (4, 1.0), (50, 1.0))  # (steps, CFG): the world's w 3, the
# trajectories' w 2, and none


def budget_job(runs: str, num_images: int, device: str, done: dict[str, Any]) -> dict[str, Any]:
    """The default run extended through BUDGETS (one run, resumed), evaluated at each budget not in `done`."""
    base = resolve_distill("tiny", device=device)
    rows: dict[str, Any] = {}
    for budget in BUDGETS:
        if str(budget) in done:
            continue
        before = max((v["train_seconds"] for k, v in (done | rows).items() if int(k) < budget), default=0.0)
        cfg = replace(base, out=str(Path(runs) / "budget"), iters=budget)
        r = run_variant(cfg, Path(runs) / "budget" / f"eval-{budget}", num_images, device)
        rows[str(budget)] = _brief(r["eval"]) | {"train_seconds": round(before + r["summary"]["train_seconds"], 2),
                                                 "machine": r["summary"]["machine"]}
    return rows


def variant_job(runs: str, name: str, num_images: int, device: str) -> dict[str, Any]:
    """Distil and evaluate one variant of the default."""
    what, overrides = next((w, o) for n, w, o in VARIANTS if n == name)
    cfg = override(resolve_distill("tiny", device=device), out=str(Path(runs) / name), **overrides)
    r = run_variant(cfg, Path(runs) / name / "eval", num_images, device)
    return {"what": what, "overrides": overrides, **_brief(r["eval"]),
            "train_seconds": r["summary"]["train_seconds"],
            "trajectory_seconds": r["summary"]["trajectories"]["seconds"], "machine": r["summary"]["machine"]}


def step_job(runs: str, n: int, name: str, seed: int, num_images: int, device: str) -> dict[str, Any]:
    """Distil and evaluate one step variant at N slots and one training seed."""
    _, overrides = next((w, o) for v, w, o in STEP_VARIANTS if v == name)
    key = f"n{n}-{name}-seed{seed}"
    cfg = override(resolve_distill("tiny", device=device), out=str(Path(runs) / "steps" / key), slots=n, seed=seed,
                   **overrides)
    r = run_variant(cfg, Path(runs) / "steps" / key / "eval", num_images, device)
    return {"key": key, **_brief(r["eval"]), "kid": (r["eval"].get("kid") or {}).get("mean"),
            "fid_ci": r["eval"].get("fid_ci"), "train_seconds": r["summary"]["train_seconds"],
            "machine": r["summary"]["machine"]}


def run_steps(out: Path, runs: Path, num_images: int, device: str, jobs: int) -> dict[str, Any]:
    """The step ablation (STEP_VARIANTS × STEP_COUNTS × STEP_SEEDS); resumable; writes rapm_ablation_steps.*."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from ..files import atomic_write_bytes

    path = out / "rapm_ablation_steps.json"
    rows: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if rows and rows.get("num_images") != num_images:
        raise SystemExit(f"{path} holds rows for {rows['num_images']} images; pass --num-images accordingly")
    rows = {"num_images": num_images, "runs": rows.get("runs", {})}
    todo = [(n, v, s) for n in STEP_COUNTS for v, _, _ in STEP_VARIANTS for s in STEP_SEEDS
            if f"n{n}-{v}-seed{s}" not in rows["runs"]]
    if todo and not _stats_cached(num_images):  # the first in this process: it builds the reference statistics
        n, v, s = todo.pop(0)
        rows["runs"][f"n{n}-{v}-seed{s}"] = step_job(str(runs), n, v, s, num_images, device)
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_threads,
                                initargs=(jobs,)) if jobs > 1 else _Inline() as pool:
        futures = [pool.submit(step_job, str(runs), n, v, s, num_images, device) for n, v, s in todo]
        for fut in cf.as_completed(futures):
            r = fut.result()
            rows["runs"][r["key"]] = r
            atomic_write_bytes(path, (json.dumps(rows, indent=2) + "\n").encode())
            print(f"ablation steps: {r['key']} done ({len(rows['runs'])})", flush=True)
    atomic_write_bytes(path, (json.dumps(rows, indent=2) + "\n").encode())
    write_steps_table(rows, out / "rapm_ablation_steps.md")
    return rows


def _threads(jobs: int) -> None:
    """A worker's share of the CPU threads (`jobs` runs side by side)."""
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def write_steps_table(rows: dict[str, Any], path: Path) -> None:
    """The step ablation as Markdown: per N and variant, mean ± sd over seeds, and Welch's t against the default."""
    import statistics

    from ..report.comparison import welch

    lines = [f"RAPM at N = 1 and 2 steps (`tiny` protocol, first {rows['num_images']} pairs, each student sampled at "
             "its N with DDIM trailing, guidance 1); mean ± sd over training seeds "
             f"{', '.join(map(str, STEP_SEEDS))}; p: Welch's t-test over seeds against the default (two-sided).", ""]
    for n in STEP_COUNTS:
        lines += [f"### N = {n}", "", "| variant | what changes | seeds | FID ↓ | KID×10³ ↓ | CLIP ↑ | p (FID vs default) "
                  "| verdict |", "|---|---|---|---|---|---|---|---|"]
        base = [r["fid"] for k, r in rows["runs"].items() if k.startswith(f"n{n}-default-")]
        for name, what, _ in STEP_VARIANTS:
            rs = [r for k, r in rows["runs"].items() if k.startswith(f"n{n}-{name}-seed")]
            if not rs:
                continue

            def ms(xs: list[float], scale: float = 1.0) -> str:
                xs = [x * scale for x in xs if x is not None]
                if not xs:
                    return "–"
                return f"{statistics.fmean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")

            fids = [r["fid"] for r in rs]
            w = welch(fids, base) if name != "default" else {"p": None, "verdict": "–"}
            pv = "–" if w["p"] is None else f"{w['p']:.3f}"
            lines.append(f"| {name} | {what} | {len(rs)} | {ms(fids)} | {ms([r['kid'] for r in rs], 1e3)} | "
                         f"{ms([r['clip_score'] for r in rs])} | {pv} | {w['verdict']} |")
        lines.append("")
    machines = sorted({r["machine"] for r in rows["runs"].values()})
    lines += [f"Trained on {', '.join(machines)}, runs side by side (`--jobs`).", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Run every variant, the budget series and the teacher baselines; write JSON, table and curves."""
    import concurrent.futures as cf
    import multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/tiny"), help="folder for rapm_ablation.{json,md,png}")
    p.add_argument("--runs", type=Path, default=Path("runs/ablation"), help="folder for the run folders")
    p.add_argument("--num-images", type=int, default=2000, help="eval pairs per row (> 128, the feature size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, one process each (a GPU: the tiny UNet is launch-bound, so ~8 fit one card)")
    p.add_argument("--grid", type=Path, default=None, metavar="LORA",
                   help="only write OUT/rapm_grid.png: teacher vs this student LoRA on the first 10 eval captions")
    p.add_argument("--steps", action="store_true",
                   help="only the step ablation: the RAPM variants at N = 1 and 2, seeds 0-2 (rapm_ablation_steps.md)")
    args = p.parse_args(argv)
    if args.steps:
        run_steps(args.out, args.runs, args.num_images, args.device, args.jobs)
        return
    if args.grid is not None:
        comparison_grid(args.grid, args.out / "rapm_grid.png", device=args.device)
        return
    only = set(args.only.split(",")) if args.only else None

    rows: dict[str, Any] = {"num_images": args.num_images, "variants": {}, "budget": {}, "teacher": {}}
    out_json = args.out / "rapm_ablation.json"
    if out_json.is_file():
        rows = json.loads(out_json.read_text())
        if rows["num_images"] != args.num_images:
            raise SystemExit(f"{out_json} holds rows for {rows['num_images']} images; pass --num-images accordingly")

    def save() -> None:
        from ..files import atomic_write_bytes

        atomic_write_bytes(out_json, (json.dumps(rows, indent=2) + "\n").encode())

    # One teacher row first, in this process: it builds the cached reference statistics every job reads.
    teacher_todo = [(st, w) for st, w in TEACHER_ROWS if f"{st}@w{w:g}" not in rows["teacher"]]
    if teacher_todo and not _stats_cached(args.num_images):
        st, w = teacher_todo.pop(0)
        rows["teacher"][f"{st}@w{w:g}"] = _brief(evaluate_teacher(st, w, args.runs / "teacher" / f"w{w:g}",
                                                                  args.num_images, args.device))
        save()
    todo = [n for n, _, _ in VARIANTS if (only is None or n in only) and n not in rows["variants"]]
    need_budget = only is None and any(str(b) not in rows["budget"] for b in BUDGETS)
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) if args.jobs > 1 else _Inline() as pool:
        futures = {pool.submit(budget_job, str(args.runs), args.num_images, args.device, rows["budget"]): "budget"
                   } if need_budget else {}  # the longest job first
        futures |= {pool.submit(variant_job, str(args.runs), n, args.num_images, args.device): n for n in todo}
        futures |= {pool.submit(evaluate_teacher, st, w, args.runs / "teacher" / f"w{w:g}", args.num_images,
                                args.device): f"teacher {st}@w{w:g}" for st, w in teacher_todo}
        for fut in cf.as_completed(futures):
            name = futures[fut]
            if name == "budget":
                rows["budget"] |= fut.result()
            elif name.startswith("teacher "):
                rows["teacher"][name.split()[1]] = _brief(fut.result())
            else:
                rows["variants"][name] = fut.result()
            save()
            print(f"ablation: {name} done ({len(rows['variants'])}/{len(VARIANTS)} variants)", flush=True)
    rows["teacher"] = {f"{st}@w{w:g}": rows["teacher"][f"{st}@w{w:g}"] for st, w in TEACHER_ROWS}  # table order
    rows["variants"] = {n: rows["variants"][n] for n, _, _ in VARIANTS if n in rows["variants"]}  # table order
    save()
    write_table(rows, args.out / "rapm_ablation.md")
    plot_curves(args.runs, [n for n in ("default", "no-reg", "reg-only", "l2", "lambda-1", "gan-only-1")
                            if n in rows["variants"]], rows, args.out / "rapm_curves.png")


def _stats_cached(num_images: int) -> bool:
    """Whether the tiny protocol's reference statistics are already in the cache (built once, read by all jobs)."""
    from ..eval.protocols import get_protocol
    from ..files import default_cache_dir

    return any(default_cache_dir().glob(f"tiny-{get_protocol('tiny').hash()}-*.fid.npz"))


class _Inline:
    """A stand-in executor that runs each job when submitted (--jobs 1: one process, easy to debug)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Any, *args: Any) -> Any:
        import concurrent.futures as cf

        fut: cf.Future[Any] = cf.Future()
        fut.set_result(fn(*args))
        return fut


def comparison_grid(lora: Path, path: Path, n: int = 10, device: str = "cpu") -> None:
    """Eval captions 0..n-1, seeds 0..n-1: the teacher at 50 and 4 steps (CFG 3, no CFG) and the student."""
    from ..generate import generate_batch
    from ..sampling import DDIM_TRAILING
    from ..tiny.train import save_grid_png
    from ..worlds.shapes import eval_captions
    from ..worlds.tiny import load_tiny_world

    world = load_tiny_world(device)
    prompts, seeds = eval_captions(n), list(range(n))
    rows = [(f"teacher {s} {'CFG ' + format(w, 'g') if w > 1 else 'no CFG'}",
             generate_batch(world, prompts, seeds, DDIM_TRAILING, s, w)) for s, w in ((50, 3.0), (4, 3.0), (4, 1.0))]
    world.load_lora(lora)
    rows.append(("RAPM 4, no CFG", generate_batch(world, prompts, seeds, DDIM_TRAILING, 4, 1.0)))
    save_grid_png(rows, path)


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """The scores of an eval result."""
    return {k: result[k] for k in ("fid", "clip_score", "retrieval_accuracy", "num_images", "device")}


def write_table(rows: dict[str, Any], path: Path) -> None:
    """The ablation as a Markdown table."""
    lines = [f"Eval: `tiny` protocol, first {rows['num_images']} pairs, 4 steps DDIM trailing, guidance 1 "
             "(teacher rows: DDIM trailing with or without CFG, as labelled).", "",
             "| variant | what changes | FID ↓ | CLIP ↑ | retrieval ↑ | train s * |", "|---|---|---|---|---|---|"]
    for key, t in rows["teacher"].items():
        steps, w = key.split("@w")
        lines.append(f"| teacher {steps}-step | {'CFG ' + w if float(w) > 1 else 'no CFG'} | {t['fid']:.2f} | "
                     f"{t['clip_score']:.2f} | {t['retrieval_accuracy']:.3f} | – |")
    for name, v in rows["variants"].items():
        lines.append(f"| {name} | {v['what']} | {v['fid']:.2f} | {v['clip_score']:.2f} | "
                     f"{v['retrieval_accuracy']:.3f} | {v['train_seconds']:.0f} |")
    lines += ["", "Budget (the default, iterations):", "", "| iterations | FID ↓ | CLIP ↑ | retrieval ↑ | train s |",
              "|---|---|---|---|---|"]
    for it, b in sorted(rows["budget"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {it} | {b['fid']:.2f} | {b['clip_score']:.2f} | {b['retrieval_accuracy']:.3f} | "
                     f"{b['train_seconds']:.0f} |")
    machines = sorted({v["machine"] for v in [*rows["variants"].values(), *rows["budget"].values()]})
    lines += ["", f"\\* wall seconds of each run's training loop on {', '.join(machines)}; the runs shared the "
              "device (`--jobs`), so compare them only within this table."]
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
    for key, t in rows["teacher"].items():
        steps, w = key.split("@w")
        axes[2].axhline(t["fid"], ls="--" if steps == "4" else ":", lw=1.2,
                        color={"3": "black", "2": "tab:green", "1": "tab:orange"}.get(w, "gray"),
                        label=f"teacher {steps}-step, {'CFG ' + w if float(w) > 1 else 'no CFG'}")
    axes[2].set(title=f"FID ({rows['num_images']} pairs) vs iterations", xlabel="iterations", xscale="log")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _smooth(values: list[float], k: int = 5) -> list[float]:
    """Trailing moving average."""
    return [sum(values[max(0, i - k + 1) : i + 1]) / (i - max(0, i - k + 1) + 1) for i in range(len(values))]


if __name__ == "__main__":
    main()
