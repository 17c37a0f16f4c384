"""`distill --log-with tensorboard|wandb|mlflow`: the JSONL scalars and sample grids, through accelerate's trackers.

Everything stays on disk under the run folder (`<out>/logs/<tracker>/`): W&B runs offline unless
WANDB_MODE says otherwise, MLflow writes a local file store unless MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # --log-with -> pip package
LOGS = "logs"


def check_tracker(name: str | None) -> None:
    """A one-line UserError naming the pip command when the tracker's package is missing."""
    if name is None:
        return
    if name not in TRACKERS:
        raise UserError(f"--log-with must be one of {', '.join(TRACKERS)}, got {name!r}")
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    if not available[name]():
        raise UserError(f"--log-with {name} needs the {TRACKERS[name]} package: `pip install {TRACKERS[name]}` "
                        f"(or `pip install 'rapm-bench[tracking]'`), or leave out --log-with")


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as flat scalars (trackers' hyper-parameter tables take no nesting)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        elif isinstance(v, bool | int | float | str):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


class Tracker:
    """One accelerate tracker (`GeneralTracker`) for a run: `log` a JSONL row, `image` a sample grid, `close`."""

    def __init__(self, name: str, out: Path, run_name: str, config: dict[str, Any], start_step: int = 0) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        check_tracker(name)
        self.name = name
        folder = Path(out) / LOGS / name
        folder.mkdir(parents=True, exist_ok=True)
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":  # purge_step: a resumed run drops the events it logs again past its checkpoint
            self.tracker = cls(run_name, folder, **({"purge_step": start_step + 1} if start_step else {}))
        elif name == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")  # nothing contacts a server unless the user says so
            self.tracker = cls(run_name, dir=str(folder), mode=os.environ["WANDB_MODE"])
        else:
            os.environ.setdefault("MLFLOW_TRACKING_URI", folder.resolve().as_uri())  # a local file store
            self.tracker = cls(experiment_name=run_name, logging_dir=str(folder))
        if hasattr(self.tracker, "start"):
            self.tracker.start()
        self.tracker.store_init_configuration(_flat(config))

    def log(self, row: dict[str, Any]) -> None:
        """Every numeric field of one JSONL row at its `step`."""
        values = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        self.tracker.log(values, step=int(row["step"]))

    def image(self, path: Path, step: int) -> None:
        """A sample grid PNG at `step`."""
        if self.name == "mlflow":
            self.tracker.log_artifact(str(path), artifact_path="samples")
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        if self.name == "tensorboard":
            self.tracker.log_images({"samples": array[None]}, step=step, dataformats="NHWC")
        else:
            self.tracker.log_images({"samples": [array]}, step=step)

    def close(self) -> None:
        """Flush and close the run."""
        self.tracker.finish()


def open_tracker(name: str | None, out: Path, run_name: str, config: dict[str, Any],
                 start_step: int = 0) -> Tracker | None:
    """The run's tracker, or None without --log-with."""
    return None if name is None else Tracker(name, out, run_name, config, start_step)
