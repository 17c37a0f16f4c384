"""`rapm-bench plot`: FID against steps, FID against CLIP score, and a side-by-side sample grid."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .results import read_results


def _pyplot() -> Any:
    """matplotlib without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Save a figure atomically as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)


def fid_vs_steps(results: list[dict[str, Any]], path: Path) -> None:
    """One line per model: FID against sampling steps (log scale), with 95% error bars where results have `fid_ci`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in results}):
        pts = sorted(((r["steps"], r["fid"], r.get("fid_ci")) for r in results if r["model"] == model),
                     key=lambda p: p[:2])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        line = ax.plot(xs, ys, marker="o", label=model)[0]
        bars = [(x, y, ci) for x, y, ci in pts if isinstance(ci, list | tuple) and len(ci) == 2]
        if bars:
            err = [[max(y - ci[0], 0.0) for _, y, ci in bars], [max(ci[1] - y, 0.0) for _, y, ci in bars]]
            ax.errorbar([b[0] for b in bars], [b[1] for b in bars], yerr=err, fmt="none", capsize=3,
                        color=line.get_color())
    ax.set_xscale("log", base=2)
    steps = sorted({r["steps"] for r in results})
    ax.set_xticks(steps, [str(x) for x in steps])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(f"FID vs steps — protocol {results[0]['protocol']}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def fid_vs_clip(results: list[dict[str, Any]], path: Path) -> None:
    """Each (model, steps) as a point: FID against CLIP score."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.scatter(r["clip_score"], r["fid"])
        ax.annotate(f"{r['model']} {r['steps']}", (r["clip_score"], r["fid"]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("CLIP score (higher is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(f"FID vs CLIP score — protocol {results[0]['protocol']}")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def sample_grid(results: list[dict[str, Any]], path: Path, num_prompts: int, device: str = "auto") -> None:
    """Rows = evaluated (model, steps), columns = the same captions and seeds for every row."""
    from ..config import WorldConfig
    from ..eval.protocols import get_protocol
    from ..eval.reference import protocol_captions
    from ..generate import generate_batch
    from ..models import get_model, with_lora
    from ..worlds import load_world

    preset = results[0]["preset"]
    protocol = get_protocol(results[0]["protocol"])
    captions = protocol_captions(protocol, None)[:num_prompts]
    seeds = list(range(num_prompts))
    rows: list[tuple[str, torch.Tensor]] = []
    for r in sorted(results, key=lambda r: (r["model"], r["steps"])):
        lora = (r.get("lora") or {}).get("path")
        model = f"lora:{lora}" if r["model"].startswith("lora-") and lora else r["model"]
        spec = get_model(model)
        world = load_world(WorldConfig(preset=preset, device=device))
        # the weights the result was measured with (an `eval --lora` override), else the spec's
        path_lora = Path(lora) if lora and Path(lora).is_file() else spec.lora_path(preset, r["steps"])
        spec = with_lora(spec, path_lora)  # a LoRA trained here: its own sampler at its step count
        if path_lora is not None:
            world.load_lora(path_lora)
            world.fuse_lora()
        label = f"{r['model']} {r['steps']}" + (f" w{r['guidance']:g}" if r["guidance"] > 1 else "")
        rows.append((label, generate_batch(world, captions, seeds, spec.recipe, r["steps"], r["guidance"])))
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), num_prompts, figsize=(1.4 * num_prompts, 1.5 * len(rows) + 0.4),
                             squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(num_prompts):
            ax = axes[i][j]
            ax.imshow(images[j].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if i == 0:
                ax.set_title(textwrap.fill(captions[j], 24), fontsize=5)
    _save(fig, path)
    plt.close(fig)


def write_plots(inputs: list[Path], out: Path, preset: str, grid_prompts: int, device: str = "auto") -> list[Path]:
    """All plots for one preset's results; returns the written paths."""
    results = [r for r in read_results(inputs) if r["preset"] == preset]
    if not results:
        raise UserError(f"no {preset} results in {', '.join(map(str, inputs))}; run `rapm-bench eval` first")
    protocols = {r["protocol_hash"] for r in results}
    if len(protocols) > 1:
        raise UserError("the results mix protocols; plot one protocol at a time (pass its result files)")
    paths = [out / "fid_vs_steps.png", out / "fid_vs_clip.png"]
    fid_vs_steps(results, paths[0])
    fid_vs_clip(results, paths[1])
    if grid_prompts > 0:
        paths.append(out / "samples.png")
        sample_grid(results, paths[2], grid_prompts, device)
    return paths
