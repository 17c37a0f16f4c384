"""`rapm-bench table`: our measured rows beside the authors' reported rows (Markdown, CSV, LaTeX)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..generate import atomic_write_bytes
from ..models import registry
from .results import read_results

COLUMNS = ("source", "model", "steps", "guidance", "protocol", "images", "FID", "CLIP", "retrieval", "img/s",
           "device")


def _fmt(x: Any, digits: int = 2) -> str:
    """A cell: numbers rounded, missing values as a dash."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def rows(results: list[dict[str, Any]], preset: str, reported: bool = True) -> list[dict[str, str]]:
    """Measured rows sorted by model and steps, then the reported rows of the same preset."""
    out = []
    for r in sorted(results, key=lambda r: (r["model"], r["steps"], r["protocol"])):
        out.append({
            "source": "measured", "model": r["model"], "steps": str(r["steps"]), "guidance": _fmt(r["guidance"], 1),
            "protocol": f"{r['protocol']} ({r['protocol_hash'][:8]})", "images": str(r["num_images"]),
            "FID": _fmt(r["fid"]), "CLIP": _fmt(r["clip_score"]), "retrieval": _fmt(r.get("retrieval_accuracy"), 3),
            "img/s": _fmt(r.get("images_per_second"), 1), "device": str(r.get("device", "–")),
        })
    if reported:
        for spec in registry().values():
            for rep in spec.reported:
                if rep.preset != preset:
                    continue
                out.append({
                    "source": f"reported: {rep.source}", "model": spec.name, "steps": _fmt(rep.steps),
                    "guidance": "–", "protocol": rep.protocol, "images": "–", "FID": _fmt(rep.fid),
                    "CLIP": _fmt(rep.clip_score), "retrieval": "–", "img/s": "–", "device": "–",
                })
    return out


def markdown(table: list[dict[str, str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c].replace("|", "/") for c in COLUMNS) + " |" for r in table]
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict[str, str]]) -> str:
    """CSV with a header row."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
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

    lines = [r"\begin{tabular}{" + "l" * len(COLUMNS) + "}", r"\toprule", " & ".join(COLUMNS) + r" \\",
             r"\midrule"]
    lines += [" & ".join(esc(r[c]) for c in COLUMNS) + r" \\" for r in table]
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
