"""The equal-budget comparison of the methods `reproduce` trains: per student step count N, each method's scores
over training seeds (mean ± sd), each seed's bootstrap interval, and a verdict per pair of methods.

The verdict is Welch's t-test over training seeds (scipy.stats.ttest_ind, equal_var=False, two-sided,
α = 0.05) on FID and on KID: a difference counts only when it is larger than the seed-to-seed noise. With
one seed there is no test; with 2-3 seeds the test has little power, and "within noise" is then no evidence
of a tie, only of no demonstrated difference.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..eval.metrics import MetricSpec, metrics
from .results import comparable_metrics

ALPHA = 0.05
TEST = ("Welch's t-test over training seeds (scipy.stats.ttest_ind, equal_var=False), two-sided, "
        f"alpha = {ALPHA}")


def metric_names() -> tuple[str, ...]:
    """The scores a comparison records per run: every registered metric (rapm_bench.eval.metrics)."""
    return tuple(metrics())


def tested() -> tuple[str, ...]:
    """The metrics the verdicts test: the lower-is-better ones (the shipped: FID and KID)."""
    return tuple(name for name, m in metrics().items() if m.better == "lower")


def _shown(record: dict[str, Any]) -> list[MetricSpec]:
    """The metrics with a column: the shipped ones always, a plug-in's where some run or teacher row holds it."""
    held = [run for g in record["by_steps"].values() for m in g["methods"].values() for run in m["runs"]]
    held += list(record["teacher"].values())
    return [m for name, m in metrics().items() if m.always or any(h.get(name) is not None for h in held)]


def _listing(words: list[str]) -> str:
    """'FID', 'FID and KID', 'FID, KID and X'."""
    return " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words) or "no metric"


def _num(value: float | None, m: MetricSpec) -> str:
    """A value in comparison.md's unit and digits, or a dash."""
    return "–" if value is None else format(value * m.scale, f".{m.digits}f")


def _stat(xs: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None where undefined)."""
    return {"mean": statistics.fmean(xs) if xs else None, "sd": statistics.stdev(xs) if len(xs) > 1 else None}


def welch(a: list[float], b: list[float]) -> dict[str, Any]:
    """Welch's t-test of two seed samples: difference of means (a − b), p-value and a plain verdict."""
    diff = statistics.fmean(a) - statistics.fmean(b) if a and b else None
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "p": None, "verdict": "one seed: no test (run --seeds 3 or more)"}
    from scipy.stats import ttest_ind

    p = float(ttest_ind(a, b, equal_var=False).pvalue)
    if math.isnan(p):  # no spread at all on either side
        return {"diff": diff, "p": None, "verdict": "identical" if diff == 0 else "no spread: no test"}
    few = min(len(a), len(b)) < 4
    if p < ALPHA:
        verdict = "differs"
    else:
        verdict = "within seed noise" + (" (too few seeds to call a tie)" if few else "")
    return {"diff": diff, "p": p, "verdict": verdict}


def collect(plan: Any, dcfgs: dict[str, Any], out: Path, protocol: str) -> dict[str, Any]:
    """The comparison record from the plan's result JSONs and run summaries."""
    from ..eval.engine import result_name

    by_steps: dict[str, dict[str, Any]] = {}
    raw: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (steps, method) -> its result JSONs
    num_images = None
    for step in plan.distills:
        folder = out if step.seed == 0 else out / "seeds" / f"seed{step.seed}"
        r = json.loads((folder / result_name(step.model, step.steps, protocol)).read_text())
        summary_path = Path(dcfgs[step.key].out) / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        num_images = r["num_images"]
        raw.setdefault((str(step.steps), step.model), []).append(r)
        group = by_steps.setdefault(str(step.steps), {"methods": {}, "pairs": []})
        m = group["methods"].setdefault(step.model, {"objective": step.objective, "iters": dcfgs[step.key].iters,
                                                     "runs": []})
        train_s = summary.get("train_seconds")
        m["runs"].append({"seed": step.seed, **{k: spec.value(r) for k, spec in metrics().items()},
                          "fid_ci": r.get("fid_ci"), "kid_std": (r.get("kid") or {}).get("std"),
                          "clip_score_ci": r.get("clip_score_ci"),
                          "train_seconds": train_s,
                          "seconds_per_iteration": None if train_s is None else train_s / max(summary["iters"], 1),
                          "machine": summary.get("machine")})
    for steps, group in by_steps.items():
        for m in group["methods"].values():
            for k in (*metric_names(), "seconds_per_iteration"):
                m[k] = _stat([run[k] for run in m["runs"] if run.get(k) is not None])
        names = list(group["methods"])
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                for metric in tested():
                    xa = [run[metric] for run in group["methods"][a]["runs"] if run[metric] is not None]
                    xb = [run[metric] for run in group["methods"][b]["runs"] if run[metric] is not None]
                    if not (xa and xb):
                        continue
                    if all(comparable_metrics(ra, rb).get(metric) for ra in raw[steps, a] for rb in raw[steps, b]):
                        group["pairs"].append({"a": a, "b": b, "metric": metric, **welch(xa, xb)})
                    else:
                        group["pairs"].append({"a": a, "b": b, "metric": metric, "diff": None, "p": None,
                                               "verdict": "not comparable: the metric's definition differs"})
    teacher = {}
    for ev in plan.evals:
        if ev.model == "teacher":
            path = out / result_name("teacher", ev.steps, protocol)
            if path.is_file():
                r = json.loads(path.read_text())
                teacher[str(ev.steps)] = {k: spec.value(r) for k, spec in metrics().items()} | {
                    "fid_ci": r.get("fid_ci"), "guidance": r["guidance"]}
    seeds = len({s.seed for s in plan.distills})
    return {"preset": plan.preset, "protocol": protocol, "num_images": num_images, "seeds": seeds, "test": TEST,
            "by_steps": dict(sorted(by_steps.items(), key=lambda kv: int(kv[0]))), "teacher": teacher}


def _cell(stat: dict[str, Any], fmt: str, scale: float = 1.0) -> str:
    """`mean ± sd` (or the mean alone, or a dash)."""
    if stat["mean"] is None:
        return "–"
    return format(stat["mean"] * scale, fmt) + ("" if stat["sd"] is None else " ± " + format(stat["sd"] * scale, fmt))


def _ci(ci: list[float] | None) -> str:
    """`[lo, hi]`."""
    return "" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def markdown(record: dict[str, Any]) -> str:
    """comparison.md."""
    k = record["seeds"]
    shown = _shown(record)
    verdicts = _listing([m.label for m in shown if m.better == "lower"])
    lines = [f"# Equal-budget comparison ({record['preset']}, protocol {record['protocol']}, "
             f"{record['num_images']} images, {k} training seed{'s' if k > 1 else ''})", "",
             "Each method distilled by the same engine from the same teacher trajectories for each student step count "
             "N: batch 1, rank-1 LoRA, the same iterations and device; each sampled with its own recipe at N. Scores "
             "are mean ± sample standard deviation over training seeds; the brackets are each seed's 95 % bootstrap "
             "interval of FID (resampled images, reference fixed: image noise only). KID × 10³ is torchmetrics' "
             "KernelInceptionDistance on the protocol's features (mean over seeds of its subset mean).", "",
             f"Verdicts: {record['test']}, on {verdicts} per pair of methods. "
             + ("One seed: no seed-noise test is possible, so nothing here ranks the methods; run "
                "`rapm-bench reproduce --seeds 3` (or see `sweep/comparison.md`)." if k < 2 else
                f"{k} seeds give the test little power: 'within seed noise' means no difference was shown, not "
                "that the methods tie." if k < 4 else ""), ""]
    heads = [f"{m.unit_label} {'↓' if m.better == 'lower' else '↑'}" for m in shown]
    for n, group in record["by_steps"].items():
        lines += [f"## {n} step{'s' if n != '1' else ''}", "",
                  "| method | seeds | " + " | ".join(heads) + " | s / iteration | FID per seed [95 % CI] |",
                  "|---|---|" + "---|" * len(shown) + "---|---|"]
        for name, m in group["methods"].items():
            per_seed = "; ".join(f"{run['fid']:.2f} {_ci(run['fid_ci'])}".strip() for run in m["runs"])
            cells = " | ".join(_cell(m[spec.name], f".{spec.digits}f", spec.scale) for spec in shown)
            lines.append(f"| {name} | {len(m['runs'])} | {cells} | {_cell(m['seconds_per_iteration'], '.2f')} | "
                         f"{per_seed} |")
        t = record["teacher"].get(n)
        if t is not None:
            cells = " | ".join(_num(t.get(spec.name), spec) for spec in shown)
            lines.append(f"| teacher, {n} step{'s' if n != '1' else ''}, CFG {t['guidance']:g} | – | {cells} | – | "
                         f"{_ci(t['fid_ci'])} |")
        if group["pairs"]:
            lines += ["", "| pair | metric | difference (a − b) | p (Welch) | verdict |", "|---|---|---|---|---|"]
            for pr in group["pairs"]:
                spec = metrics()[pr["metric"]]
                diff = "–" if pr["diff"] is None else f"{pr['diff'] * spec.scale:+.2f}"
                pv = "–" if pr["p"] is None else f"{pr['p']:.3f}"
                lines.append(f"| {pr['a']} vs {pr['b']} | {spec.unit_label} | {diff} | {pv} | {pr['verdict']} |")
        lines.append("")
    if record["teacher"]:
        summary = [spec for spec in shown if spec.headline]
        lines += ["## The teacher (its CFG)", "",
                  "| steps | " + " | ".join(h for h, spec in zip(heads, shown, strict=True) if spec.headline)
                  + " | FID 95 % CI |", "|---|" + "---|" * len(summary) + "---|"]
        for n, t in record["teacher"].items():
            lines.append(f"| {n} | " + " | ".join(_num(t.get(spec.name), spec) for spec in summary)
                         + f" | {_ci(t['fid_ci'])} |")
        lines.append("")
    machines = sorted({str(run["machine"]) for g in record["by_steps"].values() for m in g["methods"].values()
                       for run in m["runs"] if run["machine"]})
    lines += [f"Training machine: {'; '.join(machines) or 'unknown (run summaries not present)'}.", ""]
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """FID and KID against the student's steps: one line per method (mean over seeds, band ± sd), the teacher."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    specs = [m for m in _shown(record) if m.better == "lower"]  # the tested metrics (FID, KID)
    fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs), 4), squeeze=False)
    methods = sorted({name for g in record["by_steps"].values() for name in g["methods"]})
    for ax, spec in zip(axes[0], specs, strict=True):
        metric, scale = spec.name, spec.scale
        label = f"{spec.label} × {spec.scale_label}" if spec.scale_label else spec.label
        for name in methods:
            pts = [(int(n), g["methods"][name][metric]) for n, g in record["by_steps"].items()
                   if name in g["methods"] and g["methods"][name][metric]["mean"] is not None]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            mean = [s["mean"] * scale for _, s in pts]
            sd = [(s["sd"] or 0.0) * scale for _, s in pts]
            ax.plot(xs, mean, marker="o", label=name)
            ax.fill_between(xs, [m - d for m, d in zip(mean, sd, strict=True)],
                            [m + d for m, d in zip(mean, sd, strict=True)], alpha=0.2)
        tpts = [(int(n), t[metric] * scale) for n, t in record["teacher"].items() if t.get(metric) is not None]
        if tpts:
            ax.plot([n for n, _ in tpts], [v for _, v in tpts], "k--", marker=".", label="teacher (CFG)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog" if spec.signed else "log")  # KID is unbiased: it can fall below 0
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(f"{label} (lower is better)")
        ax.set_title(f"{label}: mean ± sd over {record['seeds']} seed(s)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def write_comparison(plan: Any, dcfgs: dict[str, Any], out: Path, protocol: str) -> dict[str, Any] | None:
    """comparison.json, comparison.md and comparison.png; None (nothing written) when a run with fewer seeds would
    replace an earlier comparison of more seeds over the same step counts."""
    from ..files import atomic_write_bytes

    record = collect(plan, dcfgs, out, protocol)
    old_path = out / "comparison.json"
    if old_path.is_file():
        try:
            old = json.loads(old_path.read_text())
        except ValueError:
            old = {}
        if old.get("seeds", 0) > record["seeds"] and set(record["by_steps"]) <= set(old.get("by_steps", {})):
            return None
    atomic_write_bytes(out / "comparison.json", (json.dumps(record, indent=2) + "\n").encode())
    atomic_write_bytes(out / "comparison.md", markdown(record).encode())
    plot(record, out / "comparison.png")
    return record


def write_step_grids(plan: Any, out: Path, protocol: str, num_prompts: int, device: str) -> list[Path]:
    """samples-<N>step.png per student step count: the same captions and seeds through every method (seed 0) and
    the teacher at N."""
    from ..eval.engine import result_name
    from .plots import sample_grid
    from .results import read_result

    if num_prompts < 1:
        return []
    paths = []
    for n in sorted({s.steps for s in plan.distills}):
        files = [out / result_name(m, n, protocol) for m in ("teacher", *dict.fromkeys(s.model for s in plan.distills))]
        results = [read_result(f) for f in files if f.is_file()]
        if results:
            paths.append(out / f"samples-{n}step.png")
            sample_grid(results, paths[-1], num_prompts, device)
    return paths
