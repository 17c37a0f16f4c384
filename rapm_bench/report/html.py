"""`rapm-bench report`: one self-contained HTML page (Jinja2 template, images inlined) of a results folder.

The page holds the comparison table (the rows of `table.md`, with intervals where the result JSONs
have them and the papers' reported rows marked as such), `comparison.md` rendered, every PNG of
the folder (plots, sample grids), and per measured row its provenance from its JSON.
Nothing is fetched when it is viewed: no scripts, no fonts, no links to other files.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import atomic_write_bytes
from .results import read_results
from .table import _fmt, columns, rows, shown_metrics

REPORT = "report.html"


def _intervals(result: dict[str, Any], cells: dict[str, str], shown: list[Any]) -> dict[str, str | None]:
    """Each metric column's `[lo, hi]` under its cell, where the cell does not print it already."""
    return {m.label: _interval(result, f"{m.name}_ci", m.digits) for m in shown if "[" not in cells[m.label]}


def _interval(result: dict[str, Any], key: str, digits: int) -> str | None:
    """`[lo, hi]` of a result's interval field, or None when the result has none."""
    ci = result.get(key)
    if not isinstance(ci, list | tuple) or len(ci) != 2 or not all(isinstance(x, int | float) for x in ci):
        return None
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _kid(result: dict[str, Any]) -> str | None:
    """KID as mean ± std (×10³ when small), or None when the result has none."""
    kid = result.get("kid")
    if not isinstance(kid, dict) or not isinstance(kid.get("mean"), int | float):
        return None
    std = kid.get("std")
    return f"{kid['mean']:.4f}" + (f" ± {std:.4f}" if isinstance(std, int | float) else "")


def _filled(cells: dict[str, str], cols: tuple[str, ...]) -> dict[str, str]:
    """A row's cells under the page's columns (a plug-in metric's column this row has none of: a dash)."""
    return {c: cells.get(c, "–") for c in cols}


def _provenance(result: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What a measured number comes from: protocol and hash, command, commit, device, versions, date, file."""
    path = Path(result["path"])
    record = {k: v for k, v in result.items() if k != "path"}
    lora = result.get("lora") or {}
    return {
        "file": path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path),
        "protocol": f"{result['protocol']} (hash {result['protocol_hash']})",
        "command": result.get("command") or "–",
        "git_commit": result.get("git_commit") or "–",
        "device": result.get("device") or "–",
        "versions": ", ".join(f"{k} {v}" for k, v in (result.get("versions") or {}).items()) or "–",
        "created": result.get("created") or "–",
        "seed": _fmt(result.get("seed")),
        "lora": f"{lora.get('path')} (sha256 {str(lora.get('sha256'))[:12]}…)" if lora else "–",
        "json": json.dumps(record, indent=2, sort_keys=True),
    }


def _markdown(text: str) -> str:
    """Markdown (with tables) to HTML; raw HTML in the source is escaped."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _png(path: Path) -> dict[str, str]:
    """A PNG as a data URI."""
    return {"name": path.name, "src": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()}


def report_context(results_dir: Path) -> dict[str, Any]:
    """Everything the template shows, read from `results_dir` (its result JSONs, comparison.md, PNGs)."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise UserError(f"no results folder {folder}: run `rapm-bench reproduce` or `rapm-bench eval` first")
    inputs = [folder] + ([folder / "trained"] if (folder / "trained").is_dir() else [])  # sdxl: reproduce's rows
    results = [r for p in inputs for r in read_results([p])]
    if not results:
        raise UserError(f"no result JSONs in {folder}: run `rapm-bench reproduce` or `rapm-bench eval --out "
                        f"{folder}` first")
    table: list[dict[str, Any]] = []
    shown, cols = shown_metrics(results), columns(results)
    for preset in sorted({r["preset"] for r in results}):
        ordered = sorted((r for r in results if r["preset"] == preset),
                         key=lambda r: (r["model"], r["steps"], r["protocol"]))  # table.rows' order
        for r in ordered:
            cells = _filled(rows([r], preset, reported=False)[0], cols)
            table.append({"cells": cells, "reported": False, "kid": _kid(r), "provenance": _provenance(r, folder),
                          "intervals": _intervals(r, cells, shown)})  # table.rows prints most in the cell already
        table += [{"cells": _filled(cells, cols), "reported": True, "kid": None, "provenance": None, "intervals": {}}
                  for cells in rows([], preset, reported=True)]
    comparison = folder / "comparison.md"
    return {
        "title": f"rapm-bench results: {folder.resolve().name}",
        "folder": str(folder),
        "columns": cols,
        "rows": table,
        "has_kid": "KID" not in cols and any(row["kid"] for row in table),  # else a column of its own
        "has_intervals": any(v for row in table for v in row["intervals"].values()),
        "comparison": _markdown(comparison.read_text(encoding="utf-8")) if comparison.is_file() else None,
        "images": [_png(p) for p in sorted(folder.glob("*.png")) if p.is_file()],
    }


def render_report(results_dir: Path) -> str:
    """The report page of `results_dir` as one HTML string."""
    from jinja2 import Environment, PackageLoader, StrictUndefined
    from markupsafe import Markup

    env = Environment(loader=PackageLoader("rapm_bench.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    context = report_context(results_dir)
    if context["comparison"] is not None:
        context["comparison"] = Markup(context["comparison"])  # rendered from Markdown with raw HTML escaped
    return env.get_template("report.html.j2").render(**context)


def write_report(results_dir: Path, out: Path | None = None) -> Path:
    """Write the self-contained report page (default: `results_dir/report.html`); return its path."""
    out = Path(out) if out is not None else Path(results_dir) / REPORT
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {out / REPORT}")
    html = render_report(Path(results_dir))
    atomic_write_bytes(out, html.encode("utf-8"))
    return out
