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


def metric_hashes(result: dict[str, Any]) -> dict[str, str] | None:
    """A result's hash per metric: its `metric_hashes`, or for a result made before them, those of the shipped
    protocol of its name when its `protocol_hash` is that protocol's current one (else None: unknown)."""
    from ..eval.metrics import metrics
    from ..eval.protocols import PROTOCOLS

    if isinstance(result.get("metric_hashes"), dict):
        return result["metric_hashes"]
    protocol = PROTOCOLS.get(result["protocol"])
    if protocol is None or protocol.hash() != result["protocol_hash"]:
        return None
    return {m.name: protocol.metric_hash(m) for m in metrics().values() if m.value(result) is not None}


def comparable_metrics(a: dict[str, Any], b: dict[str, Any]) -> dict[str, bool]:
    """For every registered metric both results hold: whether they are comparable on it (their metric hashes
    agree; where either result's are unknown, only an identical protocol_hash makes them comparable)."""
    from ..eval.metrics import metrics

    ha, hb = metric_hashes(a), metric_hashes(b)
    out = {}
    for name, m in metrics().items():
        if m.value(a) is None or m.value(b) is None:
            continue
        if ha is None or hb is None:
            out[name] = a["protocol_hash"] == b["protocol_hash"]
        else:
            out[name] = ha.get(name) is not None and ha.get(name) == hb.get(name)
    return out
