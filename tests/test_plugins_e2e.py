"""Issue 15, item 7: a method, a model, a metric and a world added from inside a test, without editing the
package, run through `distill`, `eval`, `table` and `check` (the Typer CLI, in-process)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rapm_bench.cli import app
from rapm_bench.distill.objectives import Objective
from rapm_bench.distill.rapm import SlotTerms, ddim_jump, slot_chunks
from rapm_bench.eval.metrics import Detector, Finish, MetricSpec, register_metric, unregister_metric
from rapm_bench.models import ModelSpec, register_model, unregister_model
from rapm_bench.plugins import ObjectiveSpec, register_objective, unregister_objective
from rapm_bench.presets import TINY
from rapm_bench.sampling import DDIM_TRAILING
from rapm_bench.worlds.registry import register_world, unregister_world

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::rapm_bench.eval.fid.UnreliableFIDWarning")]  # 8 images

WORLD = "toy-shapes"


# --- the toy method: regress the student's one-slot jump onto the teacher's next trajectory point ----------------
@dataclass(frozen=True)
class ToyConfig:
    """The toy objective's own settings (`--set toy.weight=...`)."""

    weight: float = 1.0

    def validate(self, cfg: object, active: bool) -> None:
        """Nothing to check."""


class ToyRegression(Objective):
    """The student's DDIM jump from z̃_{n+1} to t_n, pulled onto the teacher's z̃_n (mean squared error)."""

    name = "toy"

    def __init__(self, world, sched, weight: float) -> None:
        self.world, self.sched, self.weight = world, sched, weight

    def chunks(self, ex, cond, gen, chunk):
        b, slots = self.sched.boundaries, self.sched.slots
        for ns in slot_chunks(slots, chunk):
            fake = ddim_jump(self.world.predict, self.sched, self.world.noise_schedule.prediction_type,
                             ex.z_tilde[[n + 1 for n in ns]], [b[n + 1] for n in ns], [b[n] for n in ns], cond)
            loss = self.weight * (fake - ex.z_tilde[ns]).pow(2).mean() * len(ns) / slots
            yield SlotTerms(ns, fake, loss, None, {"toy_mse": loss.detach()})


def build_toy(cfg, world, sched, guidance, student, probe):
    return ToyRegression(world, sched, cfg.toy.weight)


# --- the toy metric: mean brightness, from a detector of its own ----------------------------------------------------
BRIGHTNESS = Detector("brightness", lambda scorer, images, captions: images.double().mean((1, 2, 3)) / 255,
                      lambda scorer: 0)


def finish_brightness(ctx: Finish) -> dict:
    return {"brightness": ctx.mean("brightness"), "brightness_sd": float(ctx.rows("brightness").std())}


TOY_METRIC = MetricSpec("brightness", "bright", BRIGHTNESS, "higher", ("generation_resolution",), finish_brightness,
                        {"unit": "fraction of 255"}, tol=0.01, digits=3)


@pytest.fixture
def plugins(tmp_path: Path) -> Iterator[None]:
    """The toy world, objective and metric registered for one test, and removed after it."""
    register_world(dataclasses.replace(TINY, name=WORLD, description="the shapes world under another name"))
    register_objective("toy", ObjectiveSpec("toy", build_toy, ToyConfig))
    register_metric(TOY_METRIC)
    yield
    unregister_metric("brightness")
    unregister_objective("toy")
    unregister_model("toy-student")
    unregister_world(WORLD)


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_toy_method_model_metric_and_world_run_through_the_cli(plugins, teacher, tmp_path):
    run = tmp_path / "run"
    invoke("distill", "--preset", WORLD, "--objective", "toy", "--set", "toy.weight=2", "--teacher", str(teacher),
           "--device", "cpu", "--out", str(run), "--cache-dir", str(tmp_path / "traj"), "--num-trajectories", "2",
           "--trajectory-batch", "2", "--M", "2", "--iters", "3", "--warmup", "0", "--sample-every", "0",
           "--checkpoint-every", "3", "--log-every", "1")
    config = json.loads((run / "config.json").read_text())
    assert (config["objective"], config["toy_weight"], config["world"]["preset"]) == ("toy", 2.0, WORLD)
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 3

    register_model(ModelSpec("toy-student", "the toy objective's student", DDIM_TRAILING, default_steps=4,
                             guidance=1.0, lora={WORLD: str(run / "lora.safetensors")}))
    results, images = tmp_path / "results", tmp_path / "images"
    out = invoke("eval", "--preset", WORLD, "--model", "toy-student", "--teacher", str(teacher), "--num-images", "8",
                 "--device", "cpu", "--out", str(results), "--save-images", str(images), "--json")
    rec = json.loads(out[out.index("{"):])
    pixels = np.stack([np.asarray(Image.open(images / f"{i:06d}.png")) for i in range(8)]).astype(np.float64)
    per_image = pixels.mean(axis=(1, 2, 3)) / 255
    assert rec["preset"] == WORLD and rec["model"] == "toy-student" and rec["num_images"] == 8
    assert rec["brightness"] == pytest.approx(per_image.mean(), rel=1e-12)
    assert rec["brightness_sd"] == pytest.approx(per_image.std(ddof=1), rel=1e-9)
    assert set(rec["metric_hashes"]) == {"fid", "kid", "clip_score", "retrieval_accuracy", "brightness"}
    from rapm_bench.eval.protocols import get_protocol

    assert rec["metric_hashes"]["brightness"] == get_protocol("tiny").metric_hash(TOY_METRIC)

    table = invoke("table", "--preset", WORLD, "--results", str(results), "--out", str(tmp_path / "table"))
    header = table.splitlines()[0]
    assert "| retrieval | bright | img/s |" in header
    assert f"| {rec['brightness']:.3f} |" in table.splitlines()[2]

    base = results / "toy-student-4step-tiny.json"
    same = invoke("check", "--baseline", str(base), "--results", str(base))
    b = rec["brightness"]
    assert f"| toy-student 4-step | brightness | {b:.4f} | {b:.4f} | +0.0000 | 0.01 | ok |" in same
    darker = tmp_path / "darker"
    darker.mkdir()
    (darker / base.name).write_text(json.dumps(json.loads(base.read_text()) | {"brightness": b - 0.05}))
    moved = CliRunner().invoke(app, ["check", "--baseline", str(base), "--results", str(darker)])
    assert moved.exit_code == 1 and "| brightness |" in moved.output and "DRIFT" in moved.output
    invoke("check", "--baseline", str(base), "--results", str(darker), "--tol", "brightness=0.1")

    older = tmp_path / "older.json"  # a baseline without the toy metric: skipped, with a note
    older.write_text(json.dumps({k: v for k, v in json.loads(base.read_text()).items() if k != "brightness"}))
    note = invoke("check", "--baseline", str(older), "--results", str(base))
    assert "| brightness |" not in note and "note: bright not compared for toy-student 4-step" in note
    assert "| toy-student 4-step | fid |" in note
