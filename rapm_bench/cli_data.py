"""`rapm-bench data ...`: prepare evaluation data (thin: parse, call one library function)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Prepare evaluation data: caption/image pair lists and cached reference FID statistics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def data() -> None:
    """Prepare evaluation data (kept a group, so `coco` stays a subcommand)."""


@app.command()
def coco(
    annotations: Annotated[Path, typer.Option(
        help="COCO captions_val2014.json (from annotations_trainval2014.zip), or the folder holding it.")],
    images: Annotated[Path, typer.Option(help="Folder of the COCO val2014 images (from val2014.zip).")],
    protocol: Annotated[str, typer.Option(help="COCO protocol: `coco30k` or `dmd2-coco10k`.")] = "coco30k",
    cache_dir: Annotated[Path, typer.Option(
        help="Where the pair list and reference statistics are written (named after the protocol hash); "
        "`rapm-bench eval --data-dir` reads them here.")] = Path("~/.cache/rapm-bench"),
    inception: Annotated[Path | None, typer.Option(
        help="clean-fid's Inception torchscript `inception-2015-12-05.pt` (file or folder); "
        "default: /tmp/inception-2015-12-05.pt, where clean-fid puts it.")] = None,
    batch_size: Annotated[int, typer.Option(help="Reference images per Inception batch.")] = 50,
    device: Annotated[str, typer.Option(help="`auto` (CUDA if present), `cpu`, `cuda`, `cuda:1`, ...")] = "auto",
) -> None:
    """Build a COCO protocol's caption/image pairs and its reference FID statistics (cached)."""
    from .eval.coco import check_coco_protocol, pairs_path, prepare_coco
    from .eval.features import load_extractor
    from .eval.protocols import get_protocol
    from .worlds.base import pick_device

    proto = get_protocol(protocol)
    check_coco_protocol(proto)
    extractor = load_extractor(proto, inception, pick_device(device))
    stats = prepare_coco(annotations, images, proto, cache_dir, extractor, batch_size)
    feats = stats.with_name(stats.name.removesuffix(".fid.npz") + ".features.npy")
    typer.echo(f"pairs: {pairs_path(cache_dir, proto)}\nreference statistics: {stats}\nreference features (KID): {feats}")
