"""`rapm-bench table`: our measured rows beside the authors' reported rows (Markdown, CSV, LaTeX)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import atomic_write_bytes
from ..models import registry
from .results import read_results

COLUMNS = ("source", "model", "steps", "guidance", "protocol", "images", "FID", "KID", "CLIP", "retrieval", "img/s",
           "device")


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


def _kid_cell(kid: Any) -> str:
    """KID as `mean ± std` over its subsets (usual units, not ×1000), a dash for results without it."""
    if not isinstance(kid, dict) or kid.get("mean") is None:
        return "–"
    return f"{kid['mean']:.4f} ± {kid.get('std', 0.0):.4f}"


def rows(results: list[dict[str, Any]], world: str, reported: bool = True) -> list[dict[str, str]]:
    """Measured rows sorted by model and steps, then the reported rows of the same world (`--preset`)."""
    out = []
    for r in sorted(results, key=lambda r: (r["model"], r["steps"], r["protocol"])):
        out.append({
            "source": "measured", "model": r["model"], "steps": str(r["steps"]), "guidance": _fmt(r["guidance"], 1),
            "protocol": f"{r['protocol']} ({r['protocol_hash'][:8]})", "images": str(r["num_images"]),
            "FID": _with_ci(r["fid"], r.get("fid_ci")), "KID": _kid_cell(r.get("kid")),
            "CLIP": _with_ci(r["clip_score"], r.get("clip_score_ci")),
            "retrieval": _with_ci(r.get("retrieval_accuracy"), r.get("retrieval_accuracy_ci"), 3),
            "img/s": _fmt(r.get("images_per_second"), 1), "device": str(r.get("device", "–")),
        })
    if reported:
        for spec in registry().values():
            for rep in spec.reported:
                if world != rep.preset:
                    continue
                out.append({
                    "source": f"reported: {rep.source}", "model": spec.name, "steps": _fmt(rep.steps),
                    "guidance": "–", "protocol": rep.protocol, "images": "–", "FID": _fmt(rep.fid), "KID": "–",
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
