"""`rapm-bench check`: fail CI when a score drifts past its tolerance from a committed baseline."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .results import comparable_metrics, read_result, read_results


@dataclass(frozen=True)
class Drift:
    """One compared score."""

    name: str
    metric: str
    baseline: float
    current: float
    tol: float

    @property
    def moved(self) -> bool:
        """Whether it drifted past the tolerance."""
        return abs(self.current - self.baseline) > self.tol


def rerun(baseline: dict[str, Any], workdir: Path, device: str = "auto") -> dict[str, Any]:
    """Evaluate again exactly what a baseline result describes."""
    from ..config import EvalConfig, WorldConfig
    from ..eval.engine import evaluate

    lora = baseline.get("lora") or {}
    model = baseline["model"]
    if model.startswith("lora-") and lora.get("path"):
        model = f"lora:{lora['path']}"
    cfg = EvalConfig(world=WorldConfig(preset=baseline["preset"], device=device), model=model,
                     steps=baseline["steps"], guidance=baseline["guidance"], protocol=baseline["protocol"],
                     num_images=baseline["num_images"], seed=baseline.get("seed", 0), out=str(workdir))
    result = evaluate(cfg)
    assert result is not None
    return result


def tolerances(given: Mapping[str, float] | None = None) -> dict[str, float]:
    """Every registered metric's tolerance: its default (`MetricSpec.tol`) unless given; unknown names and
    negative values are one-line errors."""
    from ..eval.metrics import get_metric, metrics

    given = dict(given or {})
    for name, tol in given.items():
        get_metric(name)
        if tol < 0:
            raise UserError(f"tolerances must be non-negative, got {name}={tol:g}")
    return {name: given.get(name, m.tol) for name, m in metrics().items()}


def parse_tolerances(items: list[str]) -> dict[str, float]:
    """`--tol METRIC=VALUE` items as {metric: tolerance}."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--tol {item!r}: expected METRIC=VALUE, e.g. --tol fid=0.5")
    return out


def compare(baseline: dict[str, Any], current: dict[str, Any],
            tols: Mapping[str, float] | None = None) -> tuple[list[Drift], list[str]]:
    """The drifts of one result against its baseline on every metric they are comparable on, and a note per
    metric left out; refuses results comparable on none (another protocol)."""
    from ..eval.metrics import metrics

    tol = tolerances(tols)
    shared = comparable_metrics(baseline, current)
    if not any(shared.values()):
        raise UserError(f"{current.get('path', 'result')} was made with protocol {current['protocol']} "
                        f"({current['protocol_hash'][:8]}), the baseline with {baseline['protocol']} "
                        f"({baseline['protocol_hash'][:8]}): not comparable; evaluate both under the same "
                        "protocol definition (its hash changes with any protocol setting)")
    for key in ("model", "steps", "num_images"):
        if current[key] != baseline[key]:
            raise UserError(f"result and baseline differ in {key}: {current[key]} vs {baseline[key]}; compare "
                            f"results of the same model, steps and --num-images")
    name = f"{baseline['model']} {baseline['steps']}-step"
    drifts, notes = [], []
    for metric, m in metrics().items():
        if shared.get(metric):
            drifts.append(Drift(name, metric, m.value(baseline), m.value(current), tol[metric]))  # type: ignore[arg-type]
        elif metric in shared:
            notes.append(f"note: {m.label} not compared for {name}: its definition differs between the two results "
                         "(metric hashes)")
        elif m.value(baseline) is None and m.value(current) is not None:
            notes.append(f"note: {m.label} not compared for {name}: its baseline predates {m.label}")
    return drifts, notes


def check(baselines: list[Path], results: list[Path] | None, tols: Mapping[str, float] | None = None,
          device: str = "auto") -> tuple[bool, str]:
    """Compare results (given, or rerun from each baseline) with their baselines; (ok, report table)."""
    tolerances(tols)
    base = read_results(baselines)
    if not base:
        raise UserError(f"no baseline results in {', '.join(map(str, baselines))}")
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    if results:
        current = {(r["model"], r["steps"], r["protocol"]): r for r in read_results(results)}
        for b in base:
            key = (b["model"], b["steps"], b["protocol"])
            if key not in current:
                others = sorted({r[2] for r in current if r[:2] == key[:2]} - {key[2]})
                if others:
                    raise UserError(f"the results for {b['model']} {b['steps']}-step were made with protocol "
                                    f"{', '.join(others)}, the baseline with {b['protocol']}: not comparable; "
                                    f"rerun `rapm-bench eval --protocol {b['protocol']}` or pass that protocol's "
                                    "baseline")
                raise UserError(f"no result for {b['model']} {b['steps']}-step on {b['protocol']} among the results: "
                                "evaluate it, or leave --results out to rerun the baseline's evaluation")
            pairs.append((b, current[key]))
    else:
        with tempfile.TemporaryDirectory(prefix="rapm-check-") as tmp:
            pairs = [(b, rerun(b, Path(tmp), device)) for b in base]
    drifts: list[Drift] = []
    notes: list[str] = []
    for b, c in pairs:
        d, n = compare(b, c, tols)
        drifts += d
        notes += n
    lines = ["| model | metric | baseline | current | change | tolerance | status |", "|---|---|---|---|---|---|---|"]
    for d in drifts:
        lines.append(f"| {d.name} | {d.metric} | {d.baseline:.4f} | {d.current:.4f} | {d.current - d.baseline:+.4f} "
                     f"| {d.tol:g} | {'DRIFT' if d.moved else 'ok'} |")
    lines += notes
    return not any(d.moved for d in drifts), "\n".join(lines) + "\n"


__all__ = ["Drift", "check", "compare", "parse_tolerances", "read_result", "tolerances"]
