"""`rapm-bench check`: fail CI when a score drifts past its tolerance from a committed baseline."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .results import read_result, read_results


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


KID_TOL = 0.005  # default largest |KID change| (usual units, not ×1000)


def compare(baseline: dict[str, Any], current: dict[str, Any], fid_tol: float, clip_tol: float,
            kid_tol: float = KID_TOL) -> list[Drift]:
    """The drifts of one result against its baseline; refuses results of another protocol."""
    if current["protocol_hash"] != baseline["protocol_hash"]:
        raise UserError(f"{current.get('path', 'result')} was made with protocol {current['protocol']} "
                        f"({current['protocol_hash'][:8]}), the baseline with {baseline['protocol']} "
                        f"({baseline['protocol_hash'][:8]}): not comparable; evaluate both under the same "
                        "protocol definition (its hash changes with any protocol setting)")
    for key in ("model", "steps", "num_images"):
        if current[key] != baseline[key]:
            raise UserError(f"result and baseline differ in {key}: {current[key]} vs {baseline[key]}; compare "
                            f"results of the same model, steps and --num-images")
    name = f"{baseline['model']} {baseline['steps']}-step"
    out = [Drift(name, "fid", baseline["fid"], current["fid"], fid_tol),
           Drift(name, "clip_score", baseline["clip_score"], current["clip_score"], clip_tol)]
    if baseline.get("retrieval_accuracy") is not None and current.get("retrieval_accuracy") is not None:
        out.append(Drift(name, "retrieval_accuracy", baseline["retrieval_accuracy"], current["retrieval_accuracy"],
                         clip_tol / 100))
    kid_base, kid_now = _kid(baseline), _kid(current)
    if kid_base is not None and kid_now is not None:  # a baseline made before KID: skipped, with a note
        out.append(Drift(name, "kid", kid_base, kid_now, kid_tol))
    return out


def _kid(result: dict[str, Any]) -> float | None:
    """A result's KID mean, or None for results made before KID."""
    kid = result.get("kid")
    return float(kid["mean"]) if isinstance(kid, dict) and "mean" in kid else None


def _kid_notes(baselines: list[dict[str, Any]]) -> list[str]:
    """One note per baseline that has no KID (it is skipped, not failed)."""
    return [f"note: KID not compared for {b['model']} {b['steps']}-step: its baseline predates KID"
            for b in baselines if _kid(b) is None]


def check(baselines: list[Path], results: list[Path] | None, fid_tol: float, clip_tol: float,
          device: str = "auto", kid_tol: float = KID_TOL) -> tuple[bool, str]:
    """Compare results (given, or rerun from each baseline) with their baselines; (ok, report table)."""
    if fid_tol < 0 or clip_tol < 0 or kid_tol < 0:
        raise UserError("tolerances must be non-negative")
    base = read_results(baselines)
    if not base:
        raise UserError(f"no baseline results in {', '.join(map(str, baselines))}")
    drifts: list[Drift] = []
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
            drifts += compare(b, current[key], fid_tol, clip_tol, kid_tol)
    else:
        with tempfile.TemporaryDirectory(prefix="rapm-check-") as tmp:
            for b in base:
                drifts += compare(b, rerun(b, Path(tmp), device), fid_tol, clip_tol, kid_tol)
    lines = ["| model | metric | baseline | current | change | tolerance | status |", "|---|---|---|---|---|---|---|"]
    for d in drifts:
        lines.append(f"| {d.name} | {d.metric} | {d.baseline:.4f} | {d.current:.4f} | {d.current - d.baseline:+.4f} "
                     f"| {d.tol:g} | {'DRIFT' if d.moved else 'ok'} |")
    lines += _kid_notes(base)
    return not any(d.moved for d in drifts), "\n".join(lines) + "\n"


__all__ = ["Drift", "check", "compare", "read_result"]
