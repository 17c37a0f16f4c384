"""`rapm-bench tiny ...`: train the shapes-world teacher and evaluator, write the world report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

app = typer.Typer(help="The embedded shapes world: train its teacher and evaluator, report on the teacher.",
                  no_args_is_help=True)

ASSETS = Path(__file__).parent / "assets" / "tiny"


def _floats(text: str | None) -> tuple[float, ...] | None:
    """'1,2.5' -> (1.0, 2.5)."""
    return None if text is None else tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str | None) -> tuple[int, ...] | None:
    """'1,2,4' -> (1, 2, 4)."""
    return None if text is None else tuple(int(x) for x in text.split(",") if x.strip())


def _overrides(**values: object) -> dict[str, object]:
    """Only the options the user gave (None = take the config default)."""
    return {k: v for k, v in values.items() if v is not None}


@app.command("train-teacher")
def train_teacher_cmd(
    out: Path = typer.Option(ASSETS / "teacher", help="Folder to write the teacher to (replaced atomically)."),
    steps: int = typer.Option(None, help="Optimiser steps [default: 40000]."),
    batch_size: int = typer.Option(None, help="Images per step [default: 256]."),
    lr: float = typer.Option(None, help="Peak AdamW learning rate [default: 5e-4]."),
    warmup: int = typer.Option(None, help="Linear warm-up steps [default: 500]."),
    max_minutes: float = typer.Option(None, help="Stop after this many minutes; the LR schedule follows it."),
    init: Path = typer.Option(None, help="Continue from this teacher folder's weights [default: from scratch]."),
    data_offset: int = typer.Option(None, help="First train-split index of the data stream [default: 0]."),
    guidance: float = typer.Option(None, help="Default CFG scale written to world.json [default: 3.0]."),
    seed: int = typer.Option(None, help="Seed of weights, noise and dropout [default: 0]."),
    device: str = typer.Option(None, help="torch device [default: cuda if present, else cpu]."),
) -> None:
    """Train the tiny teacher (text encoder + UNet, v-prediction, zero terminal SNR) on rendered pairs."""
    from .tiny.train import TeacherTrainConfig, train_teacher

    cfg = replace(TeacherTrainConfig(), **_overrides(
        steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, max_minutes=max_minutes, init=init,
        data_offset=data_offset, guidance=guidance, seed=seed))
    info = train_teacher(cfg, out, device)
    typer.echo(f"teacher: {info['steps']} steps in {info['minutes']:.1f} min, final loss "
               f"{info['final'].get('loss', float('nan')):.4f} -> {out}")


@app.command("train-evaluator")
def train_evaluator_cmd(
    out: Path = typer.Option(ASSETS / "evaluator", help="Folder to write the evaluator to (replaced atomically)."),
    steps: int = typer.Option(None, help="Optimiser steps [default: 6000]."),
    batch_size: int = typer.Option(None, help="Contrastive batch size [default: 1024]."),
    lr: float = typer.Option(None, help="Peak AdamW learning rate [default: 1e-3]."),
    max_minutes: float = typer.Option(None, help="Stop after this many minutes; the LR schedule follows it."),
    eval_images: int = typer.Option(None, help="Val-split renders for the final retrieval accuracy [default: 8192]."),
    seed: int = typer.Option(None, help="Seed of the weights [default: 0]."),
    device: str = typer.Option(None, help="torch device [default: cuda if present, else cpu]."),
) -> None:
    """Train the tiny CLIP evaluator contrastively on rendered pairs."""
    from .tiny.train import EvaluatorTrainConfig, train_evaluator

    cfg = replace(EvaluatorTrainConfig(), **_overrides(steps=steps, batch_size=batch_size, lr=lr,
                                                       max_minutes=max_minutes, eval_images=eval_images, seed=seed))
    info = train_evaluator(cfg, out, device)
    typer.echo(f"evaluator: {info['steps']} steps in {info['minutes']:.1f} min, val retrieval accuracy "
               f"{info['val']['retrieval_accuracy_64']:.4f} -> {out}")


@app.command("report")
def report_cmd(
    out: Path = typer.Option(Path("results/tiny"), help="Folder for world.md, world.json and world_grid.png."),
    steps: str = typer.Option(None, help="Comma-separated DDIM step counts [default: 1,2,4,8,25,50]."),
    guidance: float = typer.Option(None, help="CFG scale [default: the teacher's world.json]."),
    num_generated: int = typer.Option(None, help="Generated images per step count [default: 4096]."),
    num_reference: int = typer.Option(None, help="Real renders for the reference FID statistics [default: 16384]."),
    batch_size: int = typer.Option(None, help="Generation batch size [default: 512]."),
    seed: int = typer.Option(None, help="Image i uses seed + i [default: 0]."),
    guidance_sweep: str = typer.Option(None, help="Comma-separated guidance scales for an extra sweep table."),
    sweep_steps: str = typer.Option(None, help="Comma-separated step counts of the sweep [default: 4,50]."),
    teacher: Path = typer.Option(None, help="Teacher folder [default: the shipped one]."),
    evaluator: Path = typer.Option(None, help="Evaluator folder [default: the shipped one]."),
    device: str = typer.Option(None, help="torch device [default: cuda if present, else cpu]."),
) -> None:
    """Measure the teacher at several DDIM step counts (FID, CLIP score, retrieval) against real renders."""
    from .tiny.train import ReportConfig, world_report

    cfg = replace(ReportConfig(out=out), **_overrides(
        steps=_ints(steps), guidance=guidance, num_generated=num_generated, num_reference=num_reference,
        batch_size=batch_size, seed=seed, guidance_sweep=_floats(guidance_sweep), sweep_steps=_ints(sweep_steps),
        teacher=teacher, evaluator=evaluator, device=device))
    world_report(cfg, progress=typer.echo)
    typer.echo(f"wrote {out / 'world.md'}")


if __name__ == "__main__":
    app()
