"""What every `rapm-bench` command module shares: a library call whose UserError becomes one line and exit code 2,
and the `--preset` option checked against the world registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from .errors import UserError


def known_world(name: str) -> str:
    """--preset's check, before the command runs: a registered world (rapm_bench/worlds/registry.py), else the
    one-line error and exit code 2."""
    from .worlds.registry import get_world_spec

    return run(get_world_spec, name).name


Preset = Annotated[str, typer.Option(help="World: `tiny` (embedded shapes world, CPU, offline) or `sdxl`.",
                                     callback=known_world)]


def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a library function; a UserError becomes one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        typer.echo(f"rapm-bench: error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("rapm-bench: interrupted; rerun the same command to resume (bench: add --resume)", err=True)
        raise typer.Exit(130) from None
