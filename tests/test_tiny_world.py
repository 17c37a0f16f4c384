"""The shipped tiny world: offline loading, the adapter contract, sampling, LoRA, the evaluator."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from rapm_bench.errors import UserError
from rapm_bench.worlds import shapes
from rapm_bench.worlds.tiny import TinyWorld, load_tiny_world


@pytest.fixture(scope="module")
def world() -> TinyWorld:
    return load_tiny_world("cpu")


@pytest.fixture(scope="module")
def evaluator():
    from rapm_bench.eval.tiny_evaluator import load_tiny_evaluator

    return load_tiny_evaluator("cpu")


def test_loads_offline_with_its_schedule(world: TinyWorld) -> None:
    assert world.name == "tiny" and world.latent_shape == (3, 32, 32) and world.image_size == 32
    assert world.noise_schedule.prediction_type == "v_prediction"
    assert world.noise_schedule.rescale_betas_zero_snr
    ab = world.alphas_cumprod
    assert ab.dtype == torch.float64 and ab.shape == (1000,) and ab[-1] == 0 and ab[0] > 0.99
    assert 1.0 < world.default_guidance < 10.0
    assert all(p.dtype == torch.float32 for p in world.unet.parameters())


def test_cpu_forward_batch_1(world: TinyWorld) -> None:
    cond = world.encode_prompts(["a large red circle in the centre on a black background"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        world.predict(x, torch.tensor(999), cond)  # warm-up
        t0 = time.perf_counter()
        out = world.predict(x, torch.tensor(500), cond)
        elapsed = time.perf_counter() - t0
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    print(f"tiny teacher CPU forward, batch 1: {elapsed * 1e3:.1f} ms")  # reported, not asserted


def test_negative_cond_is_empty_caption(world: TinyWorld) -> None:
    cond = world.encode_prompts(["a small blue ring at the top on a white background"] * 3)
    neg = world.negative_cond(cond)["encoder_hidden_states"]
    assert neg.shape == cond["encoder_hidden_states"].shape
    assert torch.equal(neg[2], world.encode_prompts([""])["encoder_hidden_states"][0])


def test_decode_is_quantised_identity(world: TinyWorld) -> None:
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.5]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    img = world.decode(x)
    assert img.dtype == torch.uint8 and img[0, 0, 0].tolist() == [0, 64, 128, 255, 255]


def test_samples_are_seeded_per_image(world: TinyWorld) -> None:
    from rapm_bench.generate import generate_batch
    from rapm_bench.sampling import DDIM_TRAILING

    prompts = shapes.eval_captions(3)
    both = generate_batch(world, prompts, [7, 8, 9], DDIM_TRAILING, 2, world.default_guidance)
    one = generate_batch(world, prompts[1:2], [8], DDIM_TRAILING, 2, world.default_guidance)
    assert both.shape == (3, 3, 32, 32) and both.dtype == torch.uint8
    assert (both[1].int() - one[0].int()).abs().max() <= 1  # batch composition changes nothing (±1 rounding)


def test_batches_are_queued_one_ahead_and_equal_single_batches(world: TinyWorld, monkeypatch) -> None:
    """`generate_batches` queues batch k+1's decode before it hands over batch k (on a GPU: the host prepares the
    next batch while the GPU runs this one); each batch equals a `generate_batch` call."""
    from rapm_bench.generate import generate_batch, generate_batches
    from rapm_bench.sampling import DDIM_TRAILING

    prompts = shapes.eval_captions(5)
    jobs = [(prompts[:2], [1, 2]), (prompts[2:4], [3, 4]), (prompts[4:], [5])]
    queued: list[int] = []
    start = world.decode_start
    monkeypatch.setattr(world, "decode_start", lambda latents: queued.append(len(latents)) or start(latents))
    stream = generate_batches(world, iter(jobs), DDIM_TRAILING, 2, world.default_guidance)
    assert queued == []  # nothing runs before the first batch is asked for
    first = next(stream)
    assert queued == [2, 2]
    rest = list(stream)
    assert queued == [2, 2, 1] and [len(x) for x in (first, *rest)] == [2, 2, 1]
    monkeypatch.undo()
    for (p, s), got in zip(jobs, (first, *rest), strict=True):
        assert torch.equal(got, generate_batch(world, p, s, DDIM_TRAILING, 2, world.default_guidance))


def test_missing_assets_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="tiny teacher assets missing"):
        load_tiny_world("cpu", tmp_path)
    from rapm_bench.eval.tiny_evaluator import load_tiny_evaluator

    with pytest.raises(UserError, match="tiny evaluator weights missing"):
        load_tiny_evaluator("cpu", tmp_path)


def test_lora_load_fuse_unload(world: TinyWorld, tmp_path) -> None:
    from helpers.sdxl import random_unet_lora

    path = random_unet_lora(copy.deepcopy(world.unet), tmp_path)
    cond = world.encode_prompts(["a large green square on the left on a gray background"])
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor(600)
    with torch.no_grad():
        base = world.predict(x, t, cond)
        world.load_lora(path)
        lora = world.predict(x, t, cond)
        world.fuse_lora()
        fused = world.predict(x, t, cond)
        world.unload_lora()
        back = world.predict(x, t, cond)
    assert (lora - base).abs().max() > 1e-3
    torch.testing.assert_close(fused, lora, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back, base, atol=1e-5, rtol=1e-5)


def test_evaluator_on_real_renders(evaluator) -> None:
    images, caps = shapes.render(shapes.split_indices("val", 256))
    feats = evaluator.image_features(images)
    assert feats.shape == (256, 128) and feats.dtype == torch.float32
    assert evaluator.retrieval_accuracy(images, caps, batch=64) >= 0.9
    scores = evaluator.clip_score(images, caps)
    assert scores.shape == (256,) and float(scores.mean()) > 80
    shuffled = evaluator.clip_score(images, caps[1:] + caps[:1])
    assert float(shuffled.mean()) < float(scores.mean()) - 10


def test_evaluator_batch_independent(evaluator) -> None:
    images = shapes.render_images(shapes.split_indices("eval", 20))
    torch.testing.assert_close(evaluator.image_features(images)[5:7], evaluator.image_features(images[5:7]),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.e2e
def test_train_evaluator_command_writes_a_loadable_model(tmp_path) -> None:
    from typer.testing import CliRunner

    from rapm_bench.cli_tiny import app
    from rapm_bench.eval.tiny_evaluator import load_tiny_evaluator

    out = tmp_path / "evaluator"
    result = CliRunner().invoke(app, ["train-evaluator", "--out", str(out), "--steps", "2", "--batch-size", "8",
                                      "--eval-images", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert {"model.safetensors", "config.json", "README.md", "train_log.jsonl", "samples.png"} <= {
        p.name for p in out.iterdir()}
    assert load_tiny_evaluator("cpu", out).image_features(shapes.render_images([0])).shape == (1, 128)
    assert not list(tmp_path.glob(".evaluator.tmp-*"))


@pytest.mark.slow
def test_train_teacher_and_report_commands(tmp_path) -> None:
    from typer.testing import CliRunner

    from rapm_bench.cli_tiny import app

    runner = CliRunner()
    out = tmp_path / "teacher"
    result = runner.invoke(app, ["train-teacher", "--out", str(out), "--steps", "2", "--batch-size", "4",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert load_tiny_world("cpu", out).default_guidance == 3.0
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "report"), "--teacher", str(out), "--steps", "1,2",
                                 "--num-generated", "64", "--num-reference", "256", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| teacher | 2 |" in (tmp_path / "report" / "world.md").read_text()
