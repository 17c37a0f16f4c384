"""`rapm-bench check`: parse the tolerances, call the drift check (rapm_bench/report/check.py)."""

from __future__ import annotations

from typing import Annotated

import typer


def check(
    baseline: Annotated[list[str], typer.Option(help="Committed baseline result JSON(s) or folder(s).")],
    results: Annotated[list[str] | None, typer.Option("--results", help="Results to compare; default: rerun "
                                                                          "each baseline's evaluation now.")] = None,
    tol: Annotated[list[str] | None, typer.Option(help="METRIC=VALUE: the largest allowed |change| of one metric "
                                                       "(repeatable; fid, kid, clip_score, retrieval_accuracy or a "
                                                       "plug-in's; default: the metric's own).")] = None,
    fid_tol: Annotated[float | None, typer.Option(help="Largest allowed |FID change| (absolute) [default: 0.5]; "
                                                       "= --tol fid=VALUE.")] = None,
    clip_tol: Annotated[float | None, typer.Option(help="Largest allowed |CLIP score change| (absolute; retrieval "
                                                        "accuracy uses clip_tol/100) [default: 0.5]; = --tol "
                                                        "clip_score=VALUE.")] = None,
    kid_tol: Annotated[float | None, typer.Option(help="Largest allowed |KID change| (absolute, usual units, not "
                                                       "×1000; skipped, with a note, for baselines without KID) "
                                                       "[default: 0.005]; = --tol kid=VALUE.")] = None,
    device: Annotated[str, typer.Option(help="Device for reruns.")] = "auto",
    preset: Annotated[str, typer.Option(help="World: `tiny` (embedded shapes world, CPU, offline) or `sdxl`.")]
    = "tiny",
) -> None:
    """Fail (exit 1, with a table of what moved) when a score drifts past its tolerance: the CI guard."""
    from pathlib import Path

    from .cli_common import known_world, run
    from .report.check import check as run_check

    known_world(preset)
    tols = run(_tolerances, tol or [], fid_tol, clip_tol, kid_tol)
    ok, report = run(run_check, [Path(b) for b in baseline], [Path(r) for r in results] if results else None,
                     tols, device)
    typer.echo(report, nl=False)
    if not ok:
        typer.echo("rapm-bench: scores drifted past the tolerance", err=True)
        raise typer.Exit(1)


def _tolerances(items: list[str], fid_tol: float | None, clip_tol: float | None,
                kid_tol: float | None) -> dict[str, float]:
    """--tol items with the per-metric aliases (--clip-tol also sets retrieval accuracy's, /100, unless --tol
    names it); an alias disagreeing with --tol is an error."""
    from .errors import UserError
    from .report.check import parse_tolerances

    tols = parse_tolerances(items)
    aliases = {"fid": fid_tol, "clip_score": clip_tol, "kid": kid_tol}
    for name, value in aliases.items():
        if value is None:
            continue
        if name in tols and tols[name] != value:
            raise UserError(f"--tol {name}={tols[name]:g} disagrees with its alias ({value:g})")
        tols[name] = value
    if clip_tol is not None:
        tols.setdefault("retrieval_accuracy", clip_tol / 100)
    return tols
