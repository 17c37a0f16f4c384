"""`rapm-bench table`: our measured rows beside the authors' reported rows (Markdown, CSV, LaTeX)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..eval.metrics import MetricSpec, metrics
from ..files import atomic_write_bytes
from ..models import registry
from .results import read_results

HEAD = ("source", "model", "steps", "guidance", "protocol", "images")
TAIL = ("img/s", "device")
COLUMNS = (*HEAD, "FID", "KID", "CLIP", "retrieval", *TAIL)  # the shipped metrics' columns (plug-ins: `columns`)


def _fmt(x: Any, digits: int = 2) -> str:
    """A cell: numbers rounded, missing values as a dash."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _with_ci(x: Any, ci: Any, digits: int = 2) -> str:
    """`3.15 [2.90, 3.40]` where the result has a 95% interval, the plain number for older results."""
    if x is None or not (isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci):
        return _fmt(x, digits)
    return f"{x:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def shown_metrics(results: list[dict[str, Any]]) -> list[MetricSpec]:
    """The metrics with a column: the shipped ones always, a plug-in's where some result holds it."""
    return [m for m in metrics().values() if m.always or any(m.value(r) is not None for r in results)]


def columns(results: list[dict[str, Any]]) -> tuple[str, ...]:
    """The table's columns over these results (COLUMNS, plus a column per plug-in metric they hold)."""
    return (*HEAD, *(m.label for m in shown_metrics(results)), *TAIL)


def _cell(m: MetricSpec, result: dict[str, Any]) -> str:
    """One metric's cell of a measured row: its own format, else value [95 % interval]."""
    if m.cell is not None:
        return m.cell(result)
    return _with_ci(m.value(result), m.interval(result), m.digits)


def rows(results: list[dict[str, Any]], world: str, reported: bool = True) -> list[dict[str, str]]:
    """Measured rows sorted by model and steps, then the reported rows of the same world (`--preset`)."""
    shown = shown_metrics(results)
    out = []
    for r in sorted(results, key=lambda r: (r["model"], r["steps"], r["protocol"])):
        out.append({
            "source": "measured", "model": r["model"], "steps": str(r["steps"]), "guidance": _fmt(r["guidance"], 1),
            "protocol": f"{r['protocol']} ({r['protocol_hash'][:8]})", "images": str(r["num_images"]),
            **{m.label: _cell(m, r) for m in shown},
            "img/s": _fmt(r.get("images_per_second"), 1), "device": str(r.get("device", "–")),
        })
    if reported:
        for spec in registry().values():
            for rep in spec.reported:
                if world != rep.preset:
                    continue
                values = {"fid": rep.fid, "clip_score": rep.clip_score}  # what the authors report
                out.append({
                    "source": f"reported: {rep.source}", "model": spec.name, "steps": _fmt(rep.steps),
                    "guidance": "–", "protocol": rep.protocol, "images": "–",
                    **{m.label: _fmt(values.get(m.name)) for m in shown}, "img/s": "–", "device": "–",
                })
    return out


def _columns(table: list[dict[str, str]]) -> tuple[str, ...]:
    """The columns of built rows (their keys, in order)."""
    return tuple(table[0]) if table else COLUMNS


def markdown(table: list[dict[str, str]]) -> str:
    """A GitHub Markdown table."""
    cols = _columns(table)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c].replace("|", "/") for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict[str, str]]) -> str:
    """CSV with a header row."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(table), lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    return buf.getvalue()


def latex(table: list[dict[str, str]]) -> str:
    """A booktabs tabular."""
    def esc(s: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                     ("–", "--")):
            s = s.replace(a, b)
        return s

    cols = _columns(table)
    lines = [r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule", " & ".join(cols) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(r[c]) for c in cols) + r" \\" for r in table]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(inputs: list[Path], out: Path, preset: str, reported: bool = True) -> str:
    """Write table.md, table.csv and table.tex into `out`; return the Markdown."""
    results = [r for r in read_results(inputs) if r["preset"] == preset]
    if not results and not reported:
        raise UserError(f"no {preset} results in {', '.join(map(str, inputs))}; run `rapm-bench eval` first")
    table = rows(results, preset, reported)
    if not table:
        raise UserError(f"no {preset} results in {', '.join(map(str, inputs))}; run `rapm-bench eval` first")
    md = markdown(table)
    atomic_write_bytes(out / "table.md", md.encode())
    atomic_write_bytes(out / "table.csv", to_csv(table).encode())
    atomic_write_bytes(out / "table.tex", latex(table).encode())
    return md
