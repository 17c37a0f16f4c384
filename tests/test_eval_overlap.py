"""eval/overlap.py: jobs between a world's UNet calls run in order, once ready, and change no score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rapm_bench.cli import app
from rapm_bench.eval import overlap
from rapm_bench.eval.overlap import Alongside


class World:
    """A world's predict and device, recording the order of UNet calls and jobs."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.log: list[str] = []

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        self.log.append("unet")
        return x + 1


def test_jobs_run_after_unet_calls_in_order_once_ready_and_drain_runs_the_rest():
    world, ready = World(), {"a": True, "b": False, "c": True}
    x = torch.zeros(1)
    with Alongside(world) as beside:
        assert "predict" in vars(world)
        for name in "abc":
            beside.submit(lambda name=name: world.log.append(name), lambda name=name: ready[name])
        assert torch.equal(world.predict(x, x, None), x + 1)  # the call's own result, then job a
        world.predict(x, x, None)  # b is not ready: it waits, and c waits behind it
        ready["b"] = True
        world.predict(x, x, None)  # b (one job a call)
        beside.drain()  # c
    assert world.log == ["unet", "a", "unet", "unet", "b", "c"]
    assert beside.ran_beside == 2 and not beside.jobs
    assert "predict" not in vars(world)  # the method again


def test_off_runs_jobs_only_in_drain_and_a_shadowed_predict_is_restored():
    world = World()
    graphed = world.predict
    world.predict = graphed  # what graphed_predict leaves: an instance attribute
    x = torch.zeros(1)
    with Alongside(world, enabled=False) as beside:
        beside.submit(lambda: world.log.append("job"))
        world.predict(x, x, None)
        assert world.log == ["unet"]
        beside.drain()
    assert world.log == ["unet", "job"] and beside.ran_beside == 0
    with Alongside(world):
        pass
    assert vars(world)["predict"] == graphed


@pytest.mark.e2e
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_eval_scores_are_the_same_with_and_without_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           device: str):
    """Groups scored between the next group's UNet calls (each job waits for its prepared inputs, so they run
    beside; on a GPU on a side stream, under the UNet's graph replays) give the scores of groups scored after
    it, bit for bit. Three groups of two batches, then a one-batch tail: the first two groups are scored beside
    the next group's second batch; the third at the end, as the tail's one batch was queued before the third
    group's images came back (generate_batches queues one batch ahead)."""
    submit = overlap.Alongside.submit
    monkeypatch.setattr(overlap.Alongside, "submit", lambda self, job, ready=None: submit(self, job))

    def run(flag: str) -> dict:
        out = tmp_path / flag
        result = CliRunner().invoke(app, ["eval", "--model", "teacher", "--steps", "1", "--num-images", "200",
                                          "--batch-size", "32", "--out", str(out), "--data-dir", str(tmp_path / "c"),
                                          "--device", device, "--json", flag])
        assert result.exit_code == 0, result.output
        return json.loads(result.output[result.output.index("{"):])

    on, off = run("--overlap-scoring"), run("--no-overlap-scoring")
    assert on["timing"]["groups_scored_beside"] == 2 and off["timing"]["groups_scored_beside"] == 0
    assert (on["timing"]["overlap_scoring"], off["timing"]["overlap_scoring"]) == (True, False)
    for key in ("fid", "clip_score", "retrieval_accuracy", "fid_ci", "clip_score_ci", "kid"):
        assert on[key] == off[key], key
