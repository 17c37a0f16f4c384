"""The re-trained baselines' objectives (PCM, DMD2) on the RAPM engine: maths on toy cases, wiring on a tiny
random-weight UNet, and the engine's contract (loadable LoRA, bit-identical resume on the CPU, NaN guard)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.distill import distill_app, killed_at_chunk, small_teacher
from typer.testing import CliRunner

from rapm_bench.distill.config import DistillConfig, resolve_distill
from rapm_bench.distill.schedule import SlotSchedule, ddim_step, predict_x0_eps
from rapm_bench.errors import UserError

PROMPT = "a red circle in the centre on a black background"


# --- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture()
def world():
    """An in-memory random-weight TinyWorld (v-prediction, zero terminal SNR) with a random student LoRA."""
    from rapm_bench.lora import attach_lora
    from rapm_bench.worlds.tiny import TinyWorld

    w = TinyWorld(*small_teacher(), "cpu")
    randomise(attach_lora(w.unet, 1, seed=0), 1)
    return w


def randomise(params: list[torch.nn.Parameter], seed: int, std: float = 0.05) -> None:
    """Non-zero LoRA weights (B = 0 would make an adapter the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def dmd2_loss(world, gan_weight: float = 0.0):
    """DMD2Loss on `world` (student attached) with a random fake-score adapter."""
    from baselines.dmd2 import build

    cfg = resolve_distill("tiny", objective="dmd2", dmd2_gan_weight=gan_weight, disc_hidden=16, device="cpu")
    loss = build(cfg, world, SlotSchedule(world.alphas_cumprod, 4, 2), 2.0, world.encode_prompts([PROMPT]))
    randomise(loss.fake_params, 2)
    return loss


def run_cfg(teacher: Path, tmp_path: Path, objective: str, **kw) -> DistillConfig:
    """A seconds-long distillation of `objective` on the random teacher."""
    base = dict(teacher=str(teacher), device="cpu", out=str(tmp_path / objective), cache_dir=str(tmp_path / "cache"),
                num_trajectories=3, trajectory_batch=3, substeps=2, iters=4, checkpoint_every=2, log_every=1,
                sample_every=0, sample_count=1, warmup=1, objective=objective, disc_hidden=16)
    return resolve_distill("tiny", **(base | kw))


# --- config and command line ---------------------------------------------------------------------------------
def test_config_objective_fields_and_messages(tmp_path):
    """`objective` defaults to rapm; other objectives get their own default folder; bad values name the option."""
    assert DistillConfig().objective == "rapm" and resolve_distill("tiny").out == "runs/distill/tiny"
    cfg = resolve_distill("tiny", objective="pcm", out=str(tmp_path / "p"), device="cpu")
    assert (cfg.objective, cfg.out, cfg.world.device) == ("pcm", str(tmp_path / "p"), "cpu")
    assert resolve_distill("tiny", objective="dmd2").out == "runs/distill/tiny-dmd2"
    assert DistillConfig.from_json(cfg.to_json()) == cfg
    old = json.loads(DistillConfig().to_json())  # a run folder written before these fields existed still loads
    for name in [k for k in old if k.startswith(("pcm_", "dmd2_"))] + ["objective"]:
        del old[name]
    assert DistillConfig.from_json(json.dumps(old)) == DistillConfig()
    bad = [({"objective": "gan"}, "--objective must be one of rapm, pcm, dmd2, got 'gan'"),
           ({"pcm_ema": 1.0}, r"--pcm-ema must be in \[0, 1\)"),
           ({"pcm_huber_c": 0.0}, "--pcm-huber-c must be positive"),
           ({"pcm_adv_weight": -1.0}, "--pcm-adv-weight must be at least 0"),
           ({"dmd2_fake_steps": 0}, "--dmd2-fake-rank and --dmd2-fake-steps must be at least 1"),
           ({"dmd2_fake_rank": 0}, "--dmd2-fake-rank and --dmd2-fake-steps must be at least 1"),
           ({"dmd2_fake_lr": -1e-3}, "--dmd2-fake-lr must be positive"),
           ({"dmd2_gan_weight": -1.0}, "--dmd2-gan-weight must be at least 0"),
           ({"dmd2_t_min": 0.9, "dmd2_t_max": 0.5}, "0 <= t_min < t_max <= 1")]
    for kw, match in bad:
        with pytest.raises(UserError, match=match):
            resolve_distill("tiny", **({"objective": "dmd2"} | kw))
    # RAPM's all-zero-weights rule is RAPM's alone
    assert resolve_distill("tiny", objective="pcm", lambda_abs=0.0, lambda_rel=0.0, lambda_reg=0.0).objective == "pcm"


def test_cli_objective_options():
    """--objective and the baselines' options reach the config; a bad objective is one line, exit code 2."""
    runner = CliRunner()
    result = runner.invoke(distill_app(), ["distill", "--dry-run", "--objective", "pcm", "--pcm-ema", "0.9", "--pcm-adv-weight",
                                   "0.1", "--M", "3", "--rank", "2", "--iters", "7", "--format", "kohya"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output)
    assert (cfg["objective"], cfg["pcm_ema"], cfg["pcm_adv_weight"], cfg["substeps"], cfg["rank"], cfg["iters"],
            cfg["out"]) == ("pcm", 0.9, 0.1, 3, 2, 7, "runs/distill/tiny-pcm")
    result = runner.invoke(distill_app(), ["distill", "--dry-run", "--objective", "dmd2", "--dmd2-fake-rank", "4",
                                   "--dmd2-fake-lr", "3e-4", "--dmd2-fake-steps", "2", "--dmd2-gan-weight", "0"])
    cfg = json.loads(result.output)
    assert (cfg["dmd2_fake_rank"], cfg["dmd2_fake_lr"], cfg["dmd2_fake_steps"], cfg["dmd2_gan_weight"]) == \
        (4, 3e-4, 2, 0.0)
    result = runner.invoke(distill_app(), ["distill", "--dry-run", "--objective", "lcm"])
    assert result.exit_code == 2 and "--objective must be one of rapm, pcm, dmd2" in result.output


# --- DMD2: the gradient on a toy case, the sampler, the two adapters ------------------------------------------
def test_dmd_gradient_sign_and_normalisation_on_gaussians():
    """Real data N(μ_r, s²), generator N(μ_f, s²): with exact denoisers the DMD gradient is
    (μ_f − μ_r)·σ²/(a²s² + σ²) / mean|x0 − x̂_real|, its descent moves samples toward μ_r, and the
    surrogate loss hands grad / numel to x0."""
    from baselines.dmd2 import dmd_gradient, dmd_loss

    g = torch.Generator().manual_seed(0)
    dim, s, ab = 64, 0.5, 0.3
    a, sig = ab**0.5, (1 - ab) ** 0.5
    mu_r, mu_f = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)

    def denoiser(mu: torch.Tensor):  # E[x0 | x_t] for x0 ~ N(mu, s² I), x_t = a·x0 + σ·ε
        return lambda x_t: mu + a * s**2 / (a**2 * s**2 + sig**2) * (x_t - a * mu)

    x0 = mu_f + s * torch.randn(8, dim, generator=g, dtype=torch.float64)  # generator samples
    x_t = a * x0 + sig * torch.randn(8, dim, generator=g, dtype=torch.float64)
    real, fake = denoiser(mu_r)(x_t), denoiser(mu_f)(x_t)
    grad = dmd_gradient(x0, real, fake)
    norm = (x0 - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, (mu_f - mu_r) * sig**2 / (a**2 * s**2 + sig**2) / norm)
    assert bool(((grad * (mu_f - mu_r)).sum(1) > 0).all())  # descent points from μ_f toward μ_r
    assert torch.equal(dmd_gradient(x0, real, real), torch.zeros_like(x0))  # matched scores: no gradient
    x = x0.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(dmd_loss(x, grad), x)
    torch.testing.assert_close(got, (grad / x0.numel()).float().double(), rtol=1e-6, atol=1e-9)
    moved = (x0 - 0.5 * grad).mean(0)  # one descent step of the samples
    assert (moved - mu_r).norm() < (x0.mean(0) - mu_r).norm()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_fake_score_target_inverts_to_x0(prediction_type):
    """The fake score's denoising target is the model output that gives back x0 (ε, v or x0 prediction)."""
    from baselines.dmd2 import denoising_target

    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    ab = torch.tensor([0.9, 0.4, 0.05], dtype=torch.float64)
    x_t = ab.sqrt().view(-1, 1, 1, 1).float() * x0 + (1 - ab).sqrt().view(-1, 1, 1, 1).float() * eps
    x0_back, eps_back = predict_x0_eps(x_t, denoising_target(x0, eps, ab, prediction_type), ab, prediction_type)
    torch.testing.assert_close(x0_back, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_back, eps, rtol=1e-4, atol=1e-4)


def test_dmd2_trains_on_its_own_sampler(world):
    """The backward simulation (x̂0 with LCM's c_skip/c_out, re-noised with fresh noise) is diffusers'
    LCMScheduler at [999, 749, 499, 249] given the same noises: the student trains on what it samples."""
    from baselines.dmd2 import lcm_recipe
    from rapm_bench.sampling import LCM_DMD2, sample

    loss = dmd2_loss(world)
    assert loss.recipe == LCM_DMD2 == lcm_recipe(4) and loss.sample_guidance == 0.0
    cond = world.encode_prompts([PROMPT])
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = sample(lambda x, t: world.predict(x, t, cond), noise, LCM_DMD2, world.noise_schedule, 4,
                 generators=[torch.Generator().manual_seed(9)])
    g = torch.Generator().manual_seed(9)
    draws = [torch.randn(1, 3, 32, 32, generator=g) for _ in range(3)]  # the scheduler's noises, slot 3 first
    eps = torch.cat([torch.zeros(1, 3, 32, 32), draws[2], draws[1], draws[0]])  # row n re-noises slot n to t_n
    with torch.no_grad():
        inputs = loss.roll_inputs(noise, [3, 2, 1, 0], cond, eps)
        ours = loss.denoise(inputs[3:], [0], cond)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_dmd2_generator_gradient_is_wired_to_the_right_scores(world):
    """The generator's gradient on x0 = DMD(x0; real = teacher with CFG w, adapters off; fake = the fake-score
    adapter without CFG) / numel / N, computed here independently."""
    from baselines.dmd2 import FAKE
    from rapm_bench.distill.discriminator import teacher_mode
    from rapm_bench.distill.objectives import use_adapter
    from rapm_bench.sampling import cfg_denoiser

    loss = dmd2_loss(world)
    cond = world.encode_prompts([PROMPT])
    d = loss.draw(torch.Generator().manual_seed(3), torch.zeros(4, 3, 32, 32))
    x0 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    terms = loss.generator_terms(x0, [2], cond, d, torch.zeros(1, 3, 32, 32), generator_step=True)
    (got,) = torch.autograd.grad(terms.g_loss, x0)
    t = d.t_dmd[[2]]
    ab = world.alphas_cumprod[t]
    x_t = ab.sqrt().float() * x0.detach() + (1 - ab).sqrt().float() * d.eps_dmd[2:3]
    with torch.no_grad():
        with teacher_mode(world.unet):
            real = predict_x0_eps(x_t, cfg_denoiser(world, cond, 2.0)(x_t, t), ab, "v_prediction")[0]
        with use_adapter(world.unet, FAKE):
            fake = predict_x0_eps(x_t, world.predict(x_t, t, cond), ab, "v_prediction")[0]
    assert (fake - real).abs().max() > 1e-3  # the two scores differ here
    expected = (fake - real) / (x0.detach() - real).abs().mean() / x0.numel() / 4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
    # no generator update: no generator loss, the critic (fake score) still trains
    idle = loss.generator_terms(x0.detach(), [2], cond, d, torch.zeros(1, 3, 32, 32), generator_step=False)
    assert idle.g_loss is None and idle.d_loss is None


def test_two_adapters_switch_cleanly(world):
    """The fake score is a second adapter: active only inside use_adapter; the student's outputs and the
    teacher's (adapters off) are untouched by it; each adapter's state dict holds only its own weights."""
    from baselines.dmd2 import FAKE
    from rapm_bench.distill.discriminator import teacher_mode
    from rapm_bench.distill.objectives import STUDENT, use_adapter
    from rapm_bench.lora import lora_state_dict

    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    cond = world.encode_prompts([PROMPT])
    with torch.no_grad():
        student = world.predict(x, t, cond)
        with teacher_mode(world.unet):
            teacher = world.predict(x, t, cond)
    loss = dmd2_loss(world)
    student_params = [p for n, p in world.unet.named_parameters() if f".{STUDENT}." in n]
    with torch.no_grad():
        assert torch.equal(world.predict(x, t, cond), student)
        with teacher_mode(world.unet):
            assert torch.equal(world.predict(x, t, cond), teacher)
        with use_adapter(world.unet, FAKE):
            fake = world.predict(x, t, cond)
            assert all(p.requires_grad for p in loss.fake_params)
            assert not any(p.requires_grad for p in student_params)
        assert torch.equal(world.predict(x, t, cond), student) and not torch.equal(fake, student)
    assert all(p.requires_grad for p in student_params) and not any(p.requires_grad for p in loss.fake_params)
    fake_sd, student_sd = lora_state_dict(world.unet, FAKE), lora_state_dict(world.unet, STUDENT)
    assert fake_sd.keys() == student_sd.keys()  # same targets, PEFT keys without the adapter name
    assert {v.shape[0] for k, v in fake_sd.items() if "lora_A" in k} == {8}  # rank 8
    assert {v.shape[0] for k, v in student_sd.items() if "lora_A" in k} == {1}


# --- PCM: the stored phase points, the consistency target, EMA ----------------------------------------------
def test_interior_points_and_cache_key(world):
    """interior=True stores the M−1 teacher points inside every slot; ẑΔ is the first; one more teacher step
    from the last lands on z̃_n. A spec without it keeps the key it had before the field existed."""
    from dataclasses import asdict

    from rapm_bench.distill.trajectories import make_spec, teacher_points, teacher_trajectories
    from rapm_bench.sampling import cfg_denoiser

    sched = SlotSchedule(world.alphas_cumprod, 4, 3)
    zt, zd, zf = teacher_points(world, [PROMPT], [0], 2.0, sched)
    assert zf.shape == (1, 4, 2, 3, 32, 32)
    assert torch.equal(zf[:, :, 0], zd)
    zt2, zd2 = teacher_trajectories(world, [PROMPT], [0], 2.0, sched)
    assert torch.equal(zt, zt2) and torch.equal(zd, zd2)
    den = cfg_denoiser(world, world.encode_prompts([PROMPT]), 2.0)
    with torch.no_grad():
        t, s = sched.fine(1)[2], sched.fine(1)[3]
        last = ddim_step(zf[:, 1, 1], den(zf[:, 1, 1], torch.tensor(t)), sched.alphabar(t), sched.alphabar(s),
                         "v_prediction")
    torch.testing.assert_close(last, zt[:, 1])

    import hashlib

    spec = make_spec(world, [PROMPT], 0, 2.0, 4, 3, "fp32", 1)
    old = asdict(spec)
    del old["interior"]
    assert spec.key() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:20]
    assert make_spec(world, [PROMPT], 0, 2.0, 4, 3, "fp32", 1, interior=True).key() != spec.key()


def pcm_setup(world, substeps: int = 3, **kw):
    from baselines.pcm import PCMLoss
    from rapm_bench.distill.objectives import Example
    from rapm_bench.distill.trajectories import teacher_points

    sched = SlotSchedule(world.alphas_cumprod, 4, substeps)
    zt, zd, zf = teacher_points(world, [PROMPT], [0], 2.0, sched)
    ex = Example(zt[0], zd[0], zf[0], 0)
    return PCMLoss(world.predict, sched, "v_prediction", **kw), ex, world.encode_prompts([PROMPT])


def test_pcm_consistency_target_and_boundary(world):
    """Target = the student's own detached DDIM jump from the next teacher point to the slot's lower edge;
    from the last point inside, the next point is the edge: the teacher's z̃_n (boundary condition)."""
    loss, ex, cond = pcm_setup(world)
    b = loss.sched.boundaries
    edge = loss.targets(ex, [3, 2, 1, 0], [2, 2, 2, 2], cond)
    assert torch.equal(edge, ex.z_tilde[[3, 2, 1, 0]])
    inner = loss.targets(ex, [1], [0], cond)  # from z_fine[1, 0] (after one teacher sub-step) to t_1
    t = loss.sched.fine(1)[1]
    with torch.no_grad():
        out = world.predict(ex.z_fine[1, :1], torch.tensor([t]), cond)
    ref = ddim_step(ex.z_fine[1, :1], out, world.alphas_cumprod[t], world.alphas_cumprod[b[1]], "v_prediction")
    torch.testing.assert_close(inner, ref)
    assert not inner.requires_grad


def test_pcm_gradients_and_chunking(world):
    """The loss reaches the student LoRA only (targets and teacher points carry no graph); chunks of 1 and 4
    slots give the same losses; M = 1 is regression of the jump z̃_{n+1} → t_n onto z̃_n."""
    from baselines.pcm import pseudo_huber_elementwise

    loss, ex, cond = pcm_setup(world)
    params = [p for n, p in world.unet.named_parameters() if "lora_" in n]
    ex = replace(ex, z_tilde=ex.z_tilde.clone().requires_grad_(True), z_fine=ex.z_fine.clone().requires_grad_(True))
    totals = []
    for chunk in (1, 4):
        terms = list(loss.chunks(ex, cond, torch.Generator().manual_seed(7), chunk))
        assert [n for t in terms for n in t.slots] == [3, 2, 1, 0] and all(t.d_loss is None for t in terms)
        total = sum(t.g_loss for t in terms)
        assert all(g is not None for g in torch.autograd.grad(total, params, retain_graph=True))
        assert torch.autograd.grad(total, [ex.z_tilde, ex.z_fine], allow_unused=True) == (None, None)
        totals.append(total.detach())
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-5, atol=1e-7)

    one, ex1, _ = pcm_setup(world, substeps=1)
    (t,) = one.chunks(ex1, cond, torch.Generator().manual_seed(0), 4)
    torch.testing.assert_close(t.g_loss, pseudo_huber_elementwise(t.fake, ex1.z_tilde[[3, 2, 1, 0]], 0.001))


def test_ema_target_swaps_exactly():
    """EMA: shadow ← d·shadow + (1−d)·student after each step; the swap restores the student bit for bit."""
    from baselines.pcm import EMATarget

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMATarget([p], 0.75)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 6.0]))
    ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.tensor([1.5, 3.0]))
    before = p.detach().clone()
    with ema.swapped():
        assert torch.equal(p.detach(), ema.shadow[0])
    assert torch.equal(p.detach(), before)


# --- the engine ---------------------------------------------------------------------------------------------
def assert_same_checkpoint(a: Path, b: Path, modules: tuple[str, ...]) -> None:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "checkpoint.safetensors")), load_file(str(b / "checkpoint.safetensors"))
    assert ta.keys() == tb.keys()
    assert all(any(k.startswith(m + ".") for k in ta) for m in modules), sorted({k.split(".")[0] for k in ta})
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.e2e
@pytest.mark.parametrize(("objective", "extra", "modules"), [
    ("pcm", {"pcm_ema": 0.5}, ("lora", "ema", "opt.g")),
    ("dmd2", {"dmd2_fake_steps": 2}, ("lora", "fake_score", "heads", "opt.g", "opt.d")),
], ids=["pcm", "dmd2"])
def test_objective_runs_resume_bit_identical_and_export(teacher, tmp_path, objective, extra, modules):
    """Interrupted in iteration 3 (checkpoint at 2) and rerun == uninterrupted, every module and optimiser
    included; the exported LoRA loads into the tiny world and changes its samples under the objective's own
    sampler (PCM: DDIM trailing, guidance 1; DMD2: LCM [999, 749, 499, 249], no CFG)."""
    import baselines.dmd2
    import baselines.pcm
    from rapm_bench.distill import engine
    from rapm_bench.distill.objectives import Objective
    from rapm_bench.generate import generate_batch
    from rapm_bench.worlds.tiny import load_tiny_world

    cls: type[Objective] = {"pcm": baselines.pcm.PCMLoss, "dmd2": baselines.dmd2.DMD2Loss}[objective]
    whole = run_cfg(teacher, tmp_path, objective, **extra)
    summary = engine.distill(whole, progress=False)
    run = Path(whole.out)
    assert summary["objective"] == objective and summary["iters"] == 4
    lora_flag = {"pcm": f"--model lora:{run / 'lora.safetensors'}", "dmd2": f"--model dmd2 --lora {run / 'lora.safetensors'}"}
    assert summary["eval"] == f"rapm-bench eval {lora_flag[objective]} --steps 4"
    assert json.loads((run / "config.json").read_text())["objective"] == objective
    assert {"config.json", "checkpoint.safetensors", "lora.safetensors", "train_log.jsonl", "summary.json",
            "samples"} <= {p.name for p in run.iterdir()}
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    if objective == "dmd2":  # the generator updates on iterations 0 and 2 only (two time-scale rule)
        assert ["g_loss" in r for r in rows] == [True, False, True, False] and all("fake" in r for r in rows)

    cut = replace(whole, out=str(tmp_path / "cut"))
    with killed_at_chunk(cls, 3):
        engine.distill(cut, progress=False)
    assert engine.distill(cut, progress=False)["resumed_from"] == 2
    assert_same_checkpoint(run, tmp_path / "cut", modules)

    tiny = load_tiny_world("cpu", teacher)
    recipe, guidance = (baselines.dmd2.LCM_DMD2, 0.0) if objective == "dmd2" else (baselines.pcm.DDIM_TRAILING, 1.0)
    assert summary["sampler"]["scheduler"] == recipe.scheduler and summary["sampler"]["guidance"] == guidance
    before = generate_batch(tiny, [PROMPT], [0], recipe, 4, guidance)
    tiny.load_lora(run / "lora.safetensors")
    after = generate_batch(tiny, [PROMPT], [0], recipe, 4, guidance)
    assert (before.int() - after.int()).abs().max() > 0


@pytest.mark.e2e
def test_nan_in_the_fake_score_stops_dmd2(teacher, tmp_path, monkeypatch):
    """The NaN guard covers the critic: a non-finite fake-score loss at iteration 3 stops the run, the
    iteration-2 checkpoint and its LoRA stay."""
    from baselines.dmd2 import DMD2Loss
    from rapm_bench.distill import engine
    from rapm_bench.distill.checkpoint import load_checkpoint

    real, calls = DMD2Loss.fake_terms, []

    def poisoned(self, *args, **kwargs):
        t = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            t.d_loss = t.d_loss * float("nan")
        return t

    monkeypatch.setattr(DMD2Loss, "fake_terms", poisoned)
    cfg = run_cfg(teacher, tmp_path, "dmd2", dmd2_gan_weight=0.0, slot_chunk=4)
    with pytest.raises(engine.DivergedError, match=r"non-finite d_loss.* at iteration 3.*\(iteration 2\)"):
        engine.distill(cfg, progress=False)
    step, tensors, _ = load_checkpoint(Path(cfg.out) / "checkpoint.safetensors")
    assert step == 2 and not any(k.startswith("heads.") for k in tensors)
    assert (Path(cfg.out) / "lora.safetensors").is_file()
