"""RAPM distillation: DDIM maths, the objective on a tiny UNet, trajectory cache, run management."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.distill import distill_app, killed_at_chunk, small_teacher, tiny_cfg
from typer.testing import CliRunner

from rapm_bench.distill.config import resolve_distill
from rapm_bench.distill.schedule import SlotSchedule, ddim_step, trailing_timesteps
from rapm_bench.errors import UserError
from rapm_bench.worlds.base import NoiseSchedule

SD = NoiseSchedule()  # scaled_linear, epsilon (SDXL)
ZSNR_V = NoiseSchedule(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", rescale_betas_zero_snr=True)


# --- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_world():
    """An in-memory random-weight TinyWorld (v-prediction, zero terminal SNR)."""
    from rapm_bench.worlds.tiny import TinyWorld

    unet, text_encoder = small_teacher()
    return TinyWorld(unet, text_encoder, "cpu")


# --- schedule and DDIM step ------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_boundaries_are_ddim_trailing(steps):
    """t_N..t_1 are diffusers' trailing timesteps; t_0 = -1 (alphabar_0)."""
    from rapm_bench.sampling import DDIM_TRAILING, make_scheduler

    sched = make_scheduler(DDIM_TRAILING, SD)
    sched.set_timesteps(steps)
    assert trailing_timesteps(steps) == sched.timesteps.tolist()
    slots = SlotSchedule(SD.alphas_cumprod(), steps, 1)
    assert slots.boundaries == [-1, *reversed(sched.timesteps.tolist())]
    assert slots.alphabar(-1) == SD.alphas_cumprod()[0]


@pytest.mark.parametrize("schedule", [SD, ZSNR_V, replace(SD, prediction_type="v_prediction")],
                         ids=["eps", "zsnr-v", "v"])
def test_ddim_step_matches_diffusers(schedule):
    """ddim_step(x, out, ab_t, ab_s, prediction_type) == DDIMScheduler.step (trailing, 4 steps, to alphabar_0)."""
    from rapm_bench.sampling import DDIM_TRAILING, make_scheduler

    sched = make_scheduler(DDIM_TRAILING, schedule)
    sched.set_timesteps(4)
    slots = SlotSchedule(schedule.alphas_cumprod(), 4, 1)
    g = torch.Generator().manual_seed(0)
    for t, s in zip(slots.boundaries[:0:-1], slots.boundaries[-2::-1], strict=True):
        x, out = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        ref = sched.step(out, t, x, eta=0.0, return_dict=False)[0]
        ours = ddim_step(x, out, slots.alphabar(t), slots.alphabar(s), schedule.prediction_type)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # per-sample coefficients equal scalar ones
    x, out = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    ab_t, ab_s = slots.alphabar(torch.tensor([999, 499])), slots.alphabar(torch.tensor([749, -1]))
    both = ddim_step(x, out, ab_t, ab_s, schedule.prediction_type)
    one = ddim_step(x[1:], out[1:], slots.alphabar(499), slots.alphabar(-1), schedule.prediction_type)
    torch.testing.assert_close(both[1:], one)


def test_fine_grid():
    """M sub-steps per slot; the first lands at t_{n+1} − Δ; the last slot ends at t_0 = −1."""
    s = SlotSchedule(SD.alphas_cumprod(), 4, 5)
    assert s.fine(3) == [999, 949, 899, 849, 799, 749]
    assert s.fine(0) == [249, 199, 149, 99, 49, -1]
    assert s.delta_timestep(2) == 699


# --- trajectories ------------------------------------------------------------------------------------------
def test_trajectory_equals_the_ddim_sampler(tiny_world):
    """N=4 slots × M=5 sub-steps is the 20-step DDIM-trailing teacher: z̃_0 equals sampling.sample's output."""
    from rapm_bench.distill.trajectories import teacher_trajectories
    from rapm_bench.generate import sample_latents
    from rapm_bench.sampling import DDIM_TRAILING

    prompts, seeds = ["a red circle in the centre on a black background", "a small blue ring"], [3, 4]
    sched = SlotSchedule(tiny_world.alphas_cumprod, 4, 5)
    z_tilde, z_delta = teacher_trajectories(tiny_world, prompts, seeds, 3.0, sched)
    assert z_tilde.shape == (2, 5, 3, 32, 32) and z_delta.shape == (2, 4, 3, 32, 32)
    ref = sample_latents(tiny_world, prompts, seeds, DDIM_TRAILING, 20, 3.0)
    torch.testing.assert_close(z_tilde[:, 0], ref, rtol=1e-4, atol=1e-4)
    noise = torch.cat([torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in seeds])
    assert torch.equal(z_tilde[:, 4], noise)


def test_trajectory_cache_resumes_exactly(tiny_world, tmp_path, monkeypatch):
    """Interrupted after k of K shards, then resumed: equal to an uninterrupted build."""
    from rapm_bench.distill import trajectories as tr

    prompts = tr.training_prompts("tiny", 6, None)
    spec = tr.make_spec(tiny_world, prompts, 0, 3.0, 4, 2, "fp32", 2)
    whole = tr.load_or_build(tiny_world, prompts, spec, tmp_path / "a", progress=False)

    real, calls = tr.teacher_trajectories, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "teacher_trajectories", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tr.load_or_build(tiny_world, prompts, spec, tmp_path / "b", progress=False)
    assert len(list((tmp_path / "b" / spec.key()).glob("shard_*"))) == 1
    monkeypatch.setattr(tr, "teacher_trajectories", real)
    resumed = tr.load_or_build(tiny_world, prompts, spec, tmp_path / "b", progress=False)
    assert torch.equal(whole.z_tilde, resumed.z_tilde) and torch.equal(whole.z_delta, resumed.z_delta)
    assert whole.z_tilde.shape == (6, 5, 3, 32, 32)


def test_trajectory_shards_go_round_robin(tiny_world, tmp_path, monkeypatch):
    """Process 1 of 2 computes shards 1 and 3 of 4, then waits for the others before loading."""
    import accelerate
    import accelerate.utils

    from rapm_bench.distill import trajectories as tr

    class Waited(Exception):
        pass

    class SecondOfTwo:
        num_processes, process_index, is_main_process = 2, 1, False

        def wait_for_everyone(self) -> None:
            raise Waited

    monkeypatch.setattr(accelerate, "PartialState", SecondOfTwo)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: objects)
    prompts = tr.training_prompts("tiny", 4, None)
    spec = tr.make_spec(tiny_world, prompts, 0, 3.0, 2, 1, "fp32", 1)
    with pytest.raises(Waited):
        tr.load_or_build(tiny_world, prompts, spec, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / spec.key()).glob("shard_*")) == [tr._shard_name(1), tr._shard_name(3)]


@pytest.mark.e2e
def test_two_processes_split_the_trajectory_cache(teacher, tmp_path):
    """`distill` under torchrun with 2 CPU processes: the shards split across them, only the main one trains, and
    the cache equals a one-process fill tensor for tensor (one CPU thread per process on both sides: CPU kernels
    reduce in another order with another thread count)."""
    import os

    from safetensors.torch import load_file

    from rapm_bench.distill.trajectories import load_or_build, make_spec, training_prompts
    from rapm_bench.worlds import load_world

    args = ["--teacher", str(teacher), "--device", "cpu", "--num-trajectories", "4", "--trajectory-batch",
            "1", "--M", "2", "--iters", "1", "--warmup", "0", "--sample-every", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "rapm_bench.cli", "distill", *args, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("distilled 1 iterations") == 1  # the main process trained, the other returned
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())

    cfg = resolve_distill("tiny", teacher=str(teacher), device="cpu", num_trajectories=4, trajectory_batch=1,
                          substeps=2)
    world = load_world(cfg.world)
    prompts = training_prompts("tiny", 4, None)
    spec = make_spec(world, prompts, cfg.trajectory_seed, cfg.guidance, cfg.slots, cfg.substeps, cfg.store_dtype,
                     cfg.trajectory_batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = load_or_build(world, prompts, spec, tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary["trajectories"]["key"] == spec.key()
    two = tmp_path / "two" / spec.key()
    names = sorted(p.name for p in one.folder.glob("shard_*"))
    assert len(names) == 4 and names == sorted(p.name for p in two.glob("shard_*"))
    for name in names:
        a, b = load_file(str(one.folder / name)), load_file(str(two / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trajectory_key_covers_what_defines_them(tiny_world):
    """Teacher weights, prompts, seeds, w, N, M and the schedule all change the cache key."""
    from rapm_bench.distill.trajectories import make_spec

    prompts = ["a red circle", "a blue square"]
    base = make_spec(tiny_world, prompts, 0, 3.0, 4, 2, "fp32", 2)
    assert base.key() == make_spec(tiny_world, prompts, 0, 3.0, 4, 2, "fp32", 2).key()
    variants = [make_spec(tiny_world, prompts[::-1], 0, 3.0, 4, 2, "fp32", 2),
                make_spec(tiny_world, prompts, 1, 3.0, 4, 2, "fp32", 2),
                make_spec(tiny_world, prompts, 0, 2.0, 4, 2, "fp32", 2),
                make_spec(tiny_world, prompts, 0, 3.0, 2, 2, "fp32", 2),
                make_spec(tiny_world, prompts, 0, 3.0, 4, 3, "fp32", 2),
                replace(base, noise_schedule={**base.noise_schedule, "beta_schedule": "scaled_linear"})]
    with torch.no_grad():
        next(tiny_world.unet.parameters()).mul_(1.01)
    variants.append(make_spec(tiny_world, prompts, 0, 3.0, 4, 2, "fp32", 2))
    keys = {v.key() for v in variants}
    assert len(keys) == len(variants) and base.key() not in keys


# --- the objective -------------------------------------------------------------------------------------------
def objective(world, distance: str = "gan", **weights):
    """RAPMLoss on a world with a rank-1 LoRA whose B is non-zero (so the student differs from the teacher)."""
    from rapm_bench.distill.discriminator import EncoderFeatures, build_heads, feature_channels
    from rapm_bench.distill.rapm import LossWeights, RAPMLoss
    from rapm_bench.lora import attach_lora

    params = attach_lora(world.unet, 1, seed=0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    feats = EncoderFeatures(world)
    heads = build_heads(feature_channels(feats, world.encode_prompts(["x"])), 16, 0, world.device)
    sched = SlotSchedule(world.alphas_cumprod, 4, 2)
    loss = RAPMLoss(world.predict, sched, world.noise_schedule.prediction_type,
                    LossWeights(distance=distance, **weights), feats, *heads)
    return loss, params, heads


def fake_trajectory(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)


@pytest.mark.parametrize("chunk", [1, 4])
def test_objective_shapes_and_detach(tiny_world, chunk):
    """Slot outputs have the latent shape; no gradient crosses slots; targets carry no graph."""
    loss, params, _ = objective(tiny_world)
    z_tilde, z_delta = fake_trajectory()
    z_tilde.requires_grad_(True)
    z_delta.requires_grad_(True)
    cond = tiny_world.encode_prompts(["a red circle in the centre"])
    terms = loss(z_tilde, z_delta, cond, torch.Generator().manual_seed(0), chunk=chunk)
    assert [n for t in terms for n in t.slots] == [3, 2, 1, 0]
    for t in terms:
        assert t.fake.shape == (len(t.slots), 3, 32, 32) and t.fake.requires_grad
        assert t.g_loss.ndim == 0 and t.d_loss is not None and torch.isfinite(t.g_loss)
        # inputs (z̃_N, then the student's own detached outputs) and targets (z̃_n, ẑ_n) carry no graph
        g_z, g_d = torch.autograd.grad(t.g_loss, [z_tilde, z_delta], retain_graph=True, allow_unused=True)
        assert g_z is None and g_d is None
        # the generator loss reaches the LoRA; the discriminator loss never does
        assert all(g is not None for g in torch.autograd.grad(t.g_loss, params, retain_graph=True))
        assert all(g is None for g in torch.autograd.grad(t.d_loss, params, allow_unused=True))
    # the no-grad roll-out that feeds a chunk's later slots carries no graph either
    z_in = loss.roll_inputs(z_tilde[4:], [3, 2, 1, 0], cond)
    assert z_in.shape == (4, 3, 32, 32) and not z_in.requires_grad


def test_slot_outputs_do_not_feed_gradients_forward(tiny_world):
    """Slot n+1's student output gets no gradient from slot n's losses (z_n = detach(z^φ_n))."""
    loss, _, _ = objective(tiny_world)
    z_tilde, z_delta = fake_trajectory()
    cond = tiny_world.encode_prompts(["a blue square"])
    terms = loss(z_tilde, z_delta, cond, torch.Generator().manual_seed(0), chunk=1)
    for upper, lower in zip(terms[:-1], terms[1:], strict=True):
        (g,) = torch.autograd.grad(lower.g_loss, [upper.fake], retain_graph=True, allow_unused=True)
        assert g is None
    rel = loss.relative_target(z_delta[:1], [0], cond)
    assert not rel.requires_grad


def test_chunked_rollout_equals_batched(tiny_world):
    """Slots one at a time (memory) and all at once (speed) give the same losses and LoRA gradients."""
    loss, params, heads = objective(tiny_world)
    z_tilde, z_delta = fake_trajectory(1)
    cond = tiny_world.encode_prompts(["a small green cross at the top left on a white background"])
    grads = []
    for chunk in (1, 4):
        total = sum(t.g_loss for t in loss(z_tilde, z_delta, cond, torch.Generator().manual_seed(7), chunk=chunk))
        grads.append(torch.autograd.grad(total, params))
        grads[-1] = (total.detach(), grads[-1])
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_regression_only_needs_no_discriminator(tiny_world):
    """λ_abs = λ_rel = 0: the pseudo-Huber regression alone, no backbone or heads needed."""
    from rapm_bench.distill.rapm import LossWeights, RAPMLoss, pseudo_huber

    sched = SlotSchedule(tiny_world.alphas_cumprod, 4, 2)
    loss = RAPMLoss(tiny_world.predict, sched, "v_prediction", LossWeights(lambda_abs=0.0, lambda_rel=0.0))
    z_tilde, z_delta = fake_trajectory()
    (t,) = loss(z_tilde, z_delta, tiny_world.encode_prompts(["a red circle"]), torch.Generator(), chunk=4)
    assert t.d_loss is None
    torch.testing.assert_close(t.g_loss, pseudo_huber(t.fake, z_tilde[[3, 2, 1, 0]], 0.03).mean())


def test_l2_distance_and_weights(tiny_world):
    """distance='l2' is λ_abs·MSE(z^φ, z̃) + λ_rel·MSE(z^φ, ẑ) with no discriminator loss."""
    loss, _, _ = objective(tiny_world, distance="l2", lambda_rel=0.0, lambda_reg=0.0)
    z_tilde, z_delta = fake_trajectory()
    cond = tiny_world.encode_prompts(["a red circle"])
    (t,) = loss(z_tilde, z_delta, cond, torch.Generator().manual_seed(0), chunk=4)
    assert t.d_loss is None
    torch.testing.assert_close(t.g_loss, (t.fake - z_tilde[[3, 2, 1, 0]]).pow(2).mean())


# --- LoRA files ---------------------------------------------------------------------------------------------
def test_kohya_export_reads_back_through_diffusers(tmp_path):
    """`--format kohya` keys go through diffusers' own kohya converter to the same weights."""
    from rapm_bench.lora import attach_lora, load_unet_lora, lora_state_dict, save_lora

    unet, _ = small_teacher()
    params = attach_lora(unet, 2, seed=0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    state = lora_state_dict(unet)
    for fmt in ("kohya", "diffusers"):
        path = save_lora(tmp_path / f"{fmt}.safetensors", state, 2, fmt)
        fresh, _ = small_teacher()
        load_unet_lora(fresh, path, "x")
        back = lora_state_dict(fresh, "x")
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state), fmt


# --- the engine ------------------------------------------------------------------------------------------
def checkpoint_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoint.safetensors"))


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    assert any(k.startswith("opt.g.") for k in ta) and any(k.startswith("heads_rel.") for k in ta)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.e2e
def test_resume_is_bit_identical(teacher, tmp_path, monkeypatch):
    """Interrupted at iteration 5 (checkpoint at 4) and rerun == uninterrupted; so is --resume --iters."""
    from rapm_bench.distill import engine
    from rapm_bench.distill.rapm import RAPMLoss

    whole = tiny_cfg(teacher, tmp_path, out=str(tmp_path / "whole"))
    engine.distill(whole, progress=False)

    cut = replace(whole, out=str(tmp_path / "cut"))
    with killed_at_chunk(RAPMLoss, 5):
        engine.distill(cut, progress=False)
    assert json.loads((tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 4
    summary = engine.distill(cut, progress=False)  # the same command again resumes
    assert summary["resumed_from"] == 4
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "cut")

    short = replace(whole, out=str(tmp_path / "short"), iters=3)
    engine.distill(short, progress=False)
    engine.distill(replace(short, iters=6), resume=True, progress=False)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "short")
    assert (tmp_path / "whole" / "train_log.jsonl").read_text().count("\n") == 6
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "whole" / "lora.safetensors")), load_file(str(tmp_path / "short" / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
def test_merged_lora_impl_trains_like_peft_resumes_and_exports(teacher, tmp_path):
    """--lora-impl merged (rapm_bench.fastlora): the first iteration's losses equal PEFT's (B = 0: the student is the
    teacher whatever A is), an interrupted run resumes bit-identically, and the LoRA file has PEFT's keys and shapes."""
    from safetensors.torch import load_file

    from rapm_bench.distill import engine
    from rapm_bench.distill.rapm import RAPMLoss
    from rapm_bench.generate import generate_batch
    from rapm_bench.sampling import DDIM_TRAILING
    from rapm_bench.worlds.tiny import load_tiny_world

    peft = tiny_cfg(teacher, tmp_path, out=str(tmp_path / "peft"), iters=4)
    merged = replace(peft, out=str(tmp_path / "merged"), lora_impl="merged")
    engine.distill(peft, progress=False)
    engine.distill(merged, progress=False)
    first = [json.loads((tmp_path / r / "train_log.jsonl").read_text().splitlines()[0]) for r in ("peft", "merged")]
    for key in ("g_loss", "mse_abs", "mse_rel", "reg"):
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-5, abs=1e-7), key
    a, b = (load_file(str(tmp_path / r / "lora.safetensors")) for r in ("peft", "merged"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)

    cut = replace(merged, out=str(tmp_path / "cut"))
    with killed_at_chunk(RAPMLoss, 3):
        engine.distill(cut, progress=False)
    assert engine.distill(cut, progress=False)["resumed_from"] == 2
    assert_same_checkpoint(tmp_path / "merged", tmp_path / "cut")

    world = load_tiny_world("cpu", teacher)
    before = generate_batch(world, ["a red circle"], [0], DDIM_TRAILING, 4, 1.0)
    world.load_lora(tmp_path / "merged" / "lora.safetensors")
    assert (before.int() - generate_batch(world, ["a red circle"], [0], DDIM_TRAILING, 4, 1.0).int()).abs().max() > 0


@pytest.mark.e2e
def test_out_of_gpu_memory_names_what_uses_less(teacher, tmp_path, monkeypatch):
    """A GPU OOM in iteration 3 (checkpoint at 2) ends in one UserError: the checkpoint kept, --resume, and the
    switches that use less memory; the checkpoint is intact and the run resumes from it."""
    from rapm_bench.distill import engine
    from rapm_bench.distill.rapm import RAPMLoss

    cfg = tiny_cfg(teacher, tmp_path, iters=4, lora_impl="merged")
    real, calls = RAPMLoss.chunks, []

    def oom(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield from real(self, *args, **kwargs)

    monkeypatch.setattr(RAPMLoss, "chunks", oom)
    with pytest.raises(UserError) as err:
        engine.distill(cfg, progress=False)
    msg = str(err.value)
    for needle in ("out of GPU memory while distilling", "keeps its last checkpoint (iteration 2)", "--resume",
                   "--slot-chunk 1", "--grad-checkpointing", "--lora-impl peft", "--trajectory-batch"):
        assert needle in msg, (needle, msg)
    assert "\n" not in msg
    monkeypatch.setattr(RAPMLoss, "chunks", real)
    assert engine.distill(cfg, resume=True, progress=False)["resumed_from"] == 2


@pytest.mark.e2e
def test_nan_guard_keeps_last_good_checkpoint(teacher, tmp_path, monkeypatch):
    """A NaN at iteration 4 stops the run with a message; the step-2 checkpoint and its LoRA stay."""
    from rapm_bench.distill import engine
    from rapm_bench.distill.rapm import RAPMLoss

    real, calls = RAPMLoss.terms, []

    def poisoned(self, *args, **kwargs):
        t = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            t.g_loss = t.g_loss * float("nan")
        return t

    monkeypatch.setattr(RAPMLoss, "terms", poisoned)
    cfg = tiny_cfg(teacher, tmp_path)
    with pytest.raises(engine.DivergedError, match=r"non-finite g_loss.* at iteration 4.*last good checkpoint \(iteration 2\)"):
        engine.distill(cfg, progress=False)
    from rapm_bench.distill.checkpoint import load_checkpoint

    step, tensors, _ = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert step == 2 and all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())
    assert (tmp_path / "run" / "lora.safetensors").is_file()


@pytest.mark.e2e
def test_run_folder_rules(teacher, tmp_path):
    """Another config in --out is refused; --resume may change --iters only; config.json is written first."""
    from rapm_bench.distill import engine

    cfg = tiny_cfg(teacher, tmp_path, iters=2, distance="l2", lambda_reg=0.0)
    summary = engine.distill(cfg, progress=False)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["distance"] == "l2"
    assert {"config.json", "checkpoint.safetensors", "lora.safetensors", "train_log.jsonl", "summary.json",
            "samples"} <= {p.name for p in run.iterdir()}
    assert summary["lora"]["params"] > 0 and not any(k.startswith("heads") for k in checkpoint_tensors(run))
    with pytest.raises(UserError, match="differs in: lr"):
        engine.distill(replace(cfg, lr=0.5), progress=False)
    with pytest.raises(UserError, match="differs in: iters"):
        engine.distill(replace(cfg, iters=3), progress=False)
    with pytest.raises(UserError, match="nothing to resume"):
        engine.distill(replace(cfg, out=str(tmp_path / "new")), resume=True, progress=False)


# --- the command line ------------------------------------------------------------------------------------
def test_cli_dry_run_and_errors():
    """--dry-run prints the resolved config; bad input is one line and exit code 2."""
    runner = CliRunner()
    result = runner.invoke(distill_app(), ["distill", "--dry-run", "--M", "3", "--cfg", "2.5", "--rank", "2",
                                   "--lambda-rel", "0", "--format", "kohya", "--targets", "to_q,to_k"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output)
    assert (cfg["substeps"], cfg["guidance"], cfg["rank"], cfg["lambda_rel"], cfg["format"]) == (3, 2.5, 2, 0.0, "kohya")
    assert cfg["lora_targets"] == ["to_q", "to_k"] and cfg["world"]["preset"] == "tiny"
    for args, match in ((["--rank", "0"], "--rank must be at least 1"), (["--format", "ckpt"], "--format must be"),
                        (["--preset", "nope"], "unknown preset"), (["--preset", "sdxl"], "needs --prompts")):
        result = runner.invoke(distill_app(), ["distill", "--dry-run", *args])
        assert result.exit_code == 2 and match in result.output, result.output


@pytest.mark.e2e
def test_cli_distils_the_tiny_world(teacher, tmp_path):
    """`distill` end to end through the CLI on a random tiny teacher; the LoRA loads into the tiny world."""
    from rapm_bench.generate import generate_batch
    from rapm_bench.sampling import DDIM_TRAILING
    from rapm_bench.worlds.tiny import load_tiny_world

    out = tmp_path / "run"
    result = CliRunner().invoke(distill_app(), [
        "distill", "--teacher", str(teacher), "--device", "cpu", "--out", str(out), "--cache-dir",
        str(tmp_path / "cache"), "--num-trajectories", "2", "--M", "2", "--iters", "2", "--lr", "0.05",
        "--warmup", "0", "--sample-every", "1"])
    assert result.exit_code == 0, result.output
    assert "evaluate: rapm-bench eval --model lora:" in result.output
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000000.png", "step_000001.png",
                                                                   "step_000002.png"]
    world = load_tiny_world("cpu", teacher)
    before = generate_batch(world, ["a red circle"], [0], DDIM_TRAILING, 4, 1.0)
    world.load_lora(out / "lora.safetensors")
    after = generate_batch(world, ["a red circle"], [0], DDIM_TRAILING, 4, 1.0)
    assert (before.int() - after.int()).abs().max() > 0


def test_training_prompts_sources(tmp_path):
    """tiny: the shapes *train* split; otherwise a text file or COCO captions json (one caption per image)."""
    from rapm_bench.distill.trajectories import training_prompts
    from rapm_bench.worlds.shapes import captions

    assert training_prompts("tiny", 3, None, offset=5) == captions(range(5, 8))
    txt = tmp_path / "p.txt"
    txt.write_text("a\n\nb\nc\n")
    assert training_prompts("sdxl", 2, str(txt)) == ["a", "b"]
    coco = tmp_path / "captions_train2014.json"
    coco.write_text(json.dumps({"annotations": [
        {"id": 3, "image_id": 1, "caption": "A  dog."}, {"id": 1, "image_id": 1, "caption": "first dog"},
        {"id": 2, "image_id": 2, "caption": "a cat"}]}))
    assert sorted(training_prompts("sdxl", 2, str(coco))) == ["a cat", "first dog"]
    with pytest.raises(UserError, match="needs 3 captions"):
        training_prompts("sdxl", 3, str(coco))
    with pytest.raises(UserError, match="needs --prompts"):
        training_prompts("sdxl", 3, None)
