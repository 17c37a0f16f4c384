"""Reading result JSONs written by `rapm-bench eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError

REQUIRED = ("model", "steps", "guidance", "preset", "protocol", "protocol_hash", "num_images", "fid", "clip_score")


def read_result(path: Path) -> dict[str, Any]:
    """One result record, validated."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"result file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"result file {path} is not valid JSON ({e})") from None
    missing = [k for k in REQUIRED if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{path} is not a rapm-bench result (missing {', '.join(missing)})")
    return data


def read_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Result records from files and folders (every *.json directly inside a folder)."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.glob("*.json") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"no such result file or folder: {p}")
    out = []
    for f in files:
        try:
            out.append(read_result(f) | {"path": str(f)})
        except UserError:
            if len(paths) == 1 and Path(paths[0]).is_dir():
                continue  # a folder may hold other JSON (manifests, benches): skip what is not a result
            raise
    return out
