"""DMD2 (Yin et al. 2024): 4-step SDXL LoRA, LCMScheduler at its training timesteps, no CFG; and its
training objective for the engine (`rapm-bench distill --objective dmd2`), data-free."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rapm_bench.distill.discriminator import EncoderFeatures, Heads, accuracy, hinge_d, hinge_g, teacher_mode
from rapm_bench.distill.objectives import STUDENT, Example, Objective, use_adapter
from rapm_bench.distill.rapm import SlotTerms, repeat_cond, slot_chunks
from rapm_bench.distill.schedule import SlotSchedule, predict_x0_eps, renoise, trailing_timesteps
from rapm_bench.errors import UserError
from rapm_bench.models import HubFile, ModelSpec, Reported
from rapm_bench.plugins import ObjectiveSpec
from rapm_bench.sampling import LCM_DMD2, SamplerRecipe
from rapm_bench.worlds.base import Cond

from .rapm import PAPER_PROTOCOL

if TYPE_CHECKING:
    from rapm_bench.distill.config import DistillConfig
    from rapm_bench.worlds.base import World

DMD2_PROTOCOL = ("DMD2 coco10k: 10K val2014 pairs (pandas seed 123), LANCZOS 512, clean-fid; "
                 "our `dmd2-coco10k` protocol")

SPEC = ModelSpec(
    name="dmd2",
    description="DMD2 4-step LoRA (rank 64), LCM at [999, 749, 499, 249], guidance 0",
    recipe=LCM_DMD2,
    default_steps=4,
    steps=(4,),
    guidance=0.0,
    lora={
        "sdxl": HubFile("tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors"),  # replaced 2024-05-30
        "tiny": "assets/tiny/dmd2/lora.safetensors",
    },
    train_command="`rapm-bench distill --objective dmd2` (writes runs/distill/tiny-dmd2/lora.safetensors)",
    reported=(
        Reported("sdxl", None, 18.24, 30.85, PAPER_PROTOCOL, "RAPM README table (DMD2: 64 A100, batch 128)"),
        Reported("sdxl", 4, 19.68, None, DMD2_PROTOCOL, "DMD2 paper, 4-step LoRA"),
        Reported("sdxl", 4, 19.32, None, DMD2_PROTOCOL, "DMD2 paper, 4-step UNet (not this LoRA)"),
    ),
)


# --- the training objective (`rapm-bench distill --objective dmd2`) -------------------------------------
# DMD2's multi-step generator with backward simulation, data-free. Per iteration the student samples as it
# will at test time: LCM at the DDIM-trailing slot boundaries (N = 4: [999, 749, 499, 249]) from fresh
# noise, x̂0 at each boundary (from ε or v, LCM's c_skip/c_out), re-noised with fresh noise to the next
# boundary, no grad between steps. Every step's x̂0 gets (DMD2 `sd_guidance.py`):
#   generator: the DMD gradient (x̂0_fake − x̂0_real) / mean|x̂0 − x̂0_real| at t ~ U[0.02T, 0.98T], the real
#     score = the teacher (adapters off) with CFG w, the fake score = the same UNet with a second LoRA
#     adapter, no CFG; plus λ_GAN · a hinge generator loss (heads on the frozen teacher encoder, as RAPM's,
#     inputs re-noised to t ~ U[0, T); "real" = the teacher's sample z̃_0 of the same prompt and noise
#     trajectory: no real images);
#   critic: the fake score's denoising loss (the teacher's own parameterisation, t ~ U[0, T)) on the
#     detached x̂0, and the heads' hinge loss.
# Two time-scale update rule: the critic updates every iteration, the generator every `fake_steps`-th
# (DMD2: `step % dfake_gen_update_ratio == 0`, ratio 5), so --iters counts critic steps as DMD2 does.

FAKE = "fake_score"
"""PEFT adapter name of DMD2's fake score (a second LoRA on the teacher's UNet)."""


def lcm_recipe(slots: int) -> SamplerRecipe:
    """DMD2's sampler for N slots: LCM at the DDIM-trailing boundaries (N = 4: LCM_DMD2)."""
    timesteps = tuple(trailing_timesteps(slots))
    return LCM_DMD2 if timesteps == LCM_DMD2.timesteps else replace(LCM_DMD2, timesteps=timesteps)


def lcm_scalings(t: torch.Tensor, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's boundary-condition scalings (c_skip, c_out) at integer timesteps t (diffusers' LCMScheduler)."""
    s = t.double() * timestep_scaling
    return 0.25 / (s**2 + 0.25), s / (s**2 + 0.25).sqrt()


def dmd_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's gradient on generated samples x0, from the two scores' denoised estimates at the same noisy input.

    (x0 − x̂_real) − (x0 − x̂_fake) = x̂_fake − x̂_real, per sample divided by mean|x0 − x̂_real| (DMD's
    weighting); descending it moves x0 toward where the real score denoises to (non-finite -> 0).
    """
    p_real, p_fake = x0 - x0_real, x0 - x0_fake
    norm = p_real.abs().flatten(1).mean(1).view(-1, *([1] * (x0.ndim - 1)))
    return torch.nan_to_num((p_real - p_fake) / norm)


def dmd_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 · mean((x0 − sg(x0 − grad))²): a surrogate whose gradient w.r.t. x0 is grad / numel (DMD2)."""
    return 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float())


def denoising_target(x0: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The model-output target for x_t = sqrt(ab)·x0 + sqrt(1 − ab)·ε: ε, v or x0."""
    a = ab.view(-1, *([1] * (x0.ndim - 1)))
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a.sqrt().to(x0) * eps - (1 - a).sqrt().to(x0) * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


@dataclass(frozen=True)
class DMD2Config:
    """DMD2's settings: `cfg.dmd2` (`--set dmd2.FIELD=VALUE`, or the flags --dmd2-fake-rank, --dmd2-fake-lr,
    --dmd2-fake-steps, --dmd2-gan-weight); config.json stores them as dmd2_<field>."""

    fake_rank: int = 8  # fake score = the UNet + a second LoRA of this rank (DMD2: a full UNet copy)
    fake_lr: float | None = None  # fake-score LoRA learning rate; None = --lr (DMD2 uses one LR for both)
    fake_steps: int = 5  # two time-scale update rule: critic updates per generator update (DMD2: 5)
    gan_weight: float = 5e-3  # generator GAN weight (DMD2 SDXL: 5e-3; real = the teacher's z̃_0); 0 = off
    t_min: float = 0.02  # DMD gradient at t ~ U[t_min·T, t_max·T] (DMD/DMD2: 0.02 to 0.98)
    t_max: float = 0.98

    def validate(self, cfg: DistillConfig, active: bool) -> None:
        """Reject values DMD2 cannot run (whichever objective trains: the flags exist for all)."""
        if self.gan_weight < 0:
            raise UserError(f"--dmd2-gan-weight must be at least 0, got {self.gan_weight}")
        if self.fake_rank < 1 or self.fake_steps < 1:
            raise UserError(f"--dmd2-fake-rank and --dmd2-fake-steps must be at least 1, got {self.fake_rank} "
                            f"and {self.fake_steps}")
        if self.fake_lr is not None and self.fake_lr <= 0:
            raise UserError(f"--dmd2-fake-lr must be positive, got {self.fake_lr}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise UserError(f"dmd2_t_min and dmd2_t_max need 0 <= t_min < t_max <= 1, got {self.t_min}, "
                            f"{self.t_max}")


@dataclass(frozen=True)
class DMD2Weights:
    """DMD2's knobs for the loss (from DMD2Config)."""

    gan_weight: float = 5e-3  # generator GAN weight (0 = no heads)
    fake_steps: int = 5  # critic updates per generator update
    t_min: float = 0.02  # DMD gradient's t range, fractions of T
    t_max: float = 0.98


@dataclass(frozen=True)
class Draws:
    """One iteration's randomness, drawn up front so that chunking does not change the stream."""

    noise: torch.Tensor  # (1, ...) the sampler's starting noise
    renoise: torch.Tensor  # (N, ...) row n: the noise that takes slot n's x̂0 to t_n (n ≥ 1; row 0 unused)
    t_dmd: torch.Tensor  # (N,) the DMD gradient's timesteps, with eps_dmd
    eps_dmd: torch.Tensor
    t_fake: torch.Tensor  # (N,) the fake score's training timesteps, with eps_fake
    eps_fake: torch.Tensor
    t_gan: torch.Tensor  # (N,) the discriminator's timesteps, with eps_gan
    eps_gan: torch.Tensor


class DMD2Loss(Objective):
    """DMD2 (see the block comment above): generator and critic losses for one prompt (batch 1)."""

    name = "dmd2"
    sample_guidance = 0.0  # DMD2 samples without CFG

    def __init__(
        self, world: World, sched: SlotSchedule, guidance: float, weights: DMD2Weights,
        fake_params: list[torch.nn.Parameter], features: EncoderFeatures | None = None, heads: Heads | None = None,
        disc_lr: float = 1e-3, fake_lr: float = 1e-3, timestep_scaling: float = 10.0,
    ) -> None:
        if weights.gan_weight > 0 and (features is None or heads is None):
            raise ValueError("DMD2's GAN term needs the backbone features and a head set")
        self.world, self.sched, self.guidance, self.w = world, sched, guidance, weights
        self.pred = world.noise_schedule.prediction_type
        self.fake_params, self.features, self.heads = fake_params, features, heads
        self.disc_lr, self.fake_lr, self.timestep_scaling = disc_lr, fake_lr, timestep_scaling
        self.recipe = lcm_recipe(sched.slots)

    # --- the protocol ---------------------------------------------------------------------------------
    def critic_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        heads = [(list(self.heads.parameters()), self.disc_lr)] if self.gan else []
        return [*heads, (self.fake_params, self.fake_lr)]

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        from rapm_bench.lora import lora_state_dict

        out = {"fake_score": lora_state_dict(self.world.unet, FAKE)}
        if self.gan:
            out["heads"] = self.heads.state_dict()  # type: ignore[union-attr]
        return out

    def load_state(self, modules: dict[str, dict[str, torch.Tensor]]) -> None:
        from rapm_bench.lora import load_lora_state

        load_lora_state(self.world.unet, modules["fake_score"], FAKE)
        if self.gan:
            self.heads.load_state_dict(modules["heads"])  # type: ignore[union-attr]

    def eval_command(self, lora: str, steps: int, preset: str = "") -> str:
        """The registry's `dmd2` sampler (LCM, no CFG) with this LoRA (`--model lora:` would sample with DDIM)."""
        return f"rapm-bench eval --model dmd2 --lora {lora} --steps {steps}{preset}"

    @property
    def gan(self) -> bool:
        return self.w.gan_weight > 0 and self.heads is not None

    # --- the scores ------------------------------------------------------------------------------------
    def ab(self, t: torch.Tensor | list[int]) -> torch.Tensor:
        return self.sched.alphabar(torch.as_tensor(t))

    def x0(self, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return predict_x0_eps(x, out, self.ab(t), self.pred)[0]

    def denoise(self, z: torch.Tensor, slots: list[int], cond: Cond) -> torch.Tensor:
        """The student's LCM output at t_{n+1}: c_skip·z + c_out·x̂0 (grad where enabled)."""
        t = torch.tensor([self.sched.boundaries[n + 1] for n in slots])
        out = self.world.predict(z, t.to(z.device), repeat_cond(cond, len(slots)))
        c_skip, c_out = (c.view(-1, *([1] * (z.ndim - 1))).to(z) for c in lcm_scalings(t, self.timestep_scaling))
        return c_skip * z + c_out * self.x0(z, out, t)

    def to_boundary(self, x0: torch.Tensor, slots: list[int], eps: torch.Tensor) -> torch.Tensor:
        """LCM's re-noising of x̂0 to t_n with fresh noise (the next step's input)."""
        return renoise(x0, 1.0, self.ab([self.sched.boundaries[n] for n in slots]), eps.to(x0))

    @torch.no_grad()
    def roll_inputs(self, z: torch.Tensor, slots: list[int], cond: Cond, eps: torch.Tensor) -> torch.Tensor:
        """The inputs of consecutive slots starting from z: backward simulation, no grad."""
        inputs = [z.detach()]
        for n in slots[:-1]:
            inputs.append(self.to_boundary(self.denoise(inputs[-1], [n], cond), [n], eps[n : n + 1]))
        return torch.cat(inputs)

    @torch.no_grad()
    def real_x0(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The real score's x̂0: the teacher (adapters off) with CFG w."""
        w = self.guidance
        with teacher_mode(self.world.unet):
            if w <= 1.0:
                out = self.world.predict(x, t, cond)
            else:
                neg = self.world.negative_cond(cond)
                both = {k: torch.cat([neg[k], cond[k]]) for k in cond}
                uncond, text = self.world.predict(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
                out = uncond + w * (text - uncond)
        return self.x0(x, out, t.cpu())

    @torch.no_grad()
    def fake_x0(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The fake score's x̂0: the fake-score adapter, no CFG (DMD2: fake_guidance_scale 1)."""
        with use_adapter(self.world.unet, FAKE):
            out = self.world.predict(x, t, cond)
        return self.x0(x, out, t.cpu())

    # --- one iteration ---------------------------------------------------------------------------------
    def draw(self, gen: torch.Generator, like: torch.Tensor) -> Draws:
        """The sampler's noises and every loss's (t, ε), in a fixed order."""
        n, big_t = self.sched.slots, len(self.sched.alphas_cumprod)
        shape, dev = (n, *like.shape[1:]), gen.device

        def randn(*s: int) -> torch.Tensor:
            return torch.randn(s, generator=gen, device=dev).to(like)

        def randint(lo: int, hi: int) -> torch.Tensor:
            return torch.randint(lo, hi, (n,), generator=gen, device=dev).cpu()

        lo, hi = int(self.w.t_min * big_t), min(int(self.w.t_max * big_t) + 1, big_t)
        return Draws(noise=randn(1, *shape[1:]), renoise=randn(*shape), t_dmd=randint(lo, hi), eps_dmd=randn(*shape),
                     t_fake=randint(0, big_t), eps_fake=randn(*shape), t_gan=randint(0, big_t), eps_gan=randn(*shape))

    def chunks(self, ex: Example, cond: Cond, gen: torch.Generator, chunk: int) -> Iterator[SlotTerms]:
        """Per chunk: the generator's terms (student adapter active), then the fake score's (its adapter active
        while the engine runs that backward)."""
        generator_step = ex.step % self.w.fake_steps == 0
        d = self.draw(gen, ex.z_tilde[1:])
        z = d.noise
        for slots in slot_chunks(self.sched.slots, chunk):
            z_in = self.roll_inputs(z, slots, cond, d.renoise)
            with torch.set_grad_enabled(generator_step):
                x0 = self.denoise(z_in, slots, cond)
            yield self.generator_terms(x0, slots, cond, d, ex.z_tilde[:1], generator_step)
            with use_adapter(self.world.unet, FAKE):
                yield self.fake_terms(x0.detach(), slots, cond, d)
            if slots[-1] > 0:
                z = self.to_boundary(x0[-1:].detach(), slots[-1:], d.renoise[slots[-1] : slots[-1] + 1])

    def generator_terms(
        self, x0: torch.Tensor, slots: list[int], cond: Cond, d: Draws, real: torch.Tensor, generator_step: bool,
    ) -> SlotTerms:
        """DMD gradient + λ_GAN · hinge (generator steps only); the heads' hinge loss (every step)."""
        k, scale = len(slots), len(slots) / self.sched.slots
        cond_k, dev = repeat_cond(cond, k), x0.device
        logs: dict[str, torch.Tensor] = {}
        g: torch.Tensor | None = None
        if generator_step:
            t = d.t_dmd[slots]
            x_t = renoise(x0.detach(), 1.0, self.ab(t), d.eps_dmd[slots].to(x0))
            grad = dmd_gradient(x0.detach(), self.real_x0(x_t, t.to(dev), cond_k), self.fake_x0(x_t, t.to(dev), cond_k))
            g = dmd_loss(x0, grad)
            logs |= {"dmd": g.detach(), "dmd_grad": grad.abs().mean()}
        disc: torch.Tensor | None = None
        if self.gan:
            assert self.features is not None and self.heads is not None
            t, eps = d.t_gan[slots], d.eps_gan[slots].to(x0)
            f_fake = self.features(renoise(x0, 1.0, self.ab(t), eps), t.to(dev), cond_k)
            with torch.no_grad():
                f_real = self.features(renoise(real.expand_as(x0), 1.0, self.ab(t), eps), t.to(dev), cond_k)
            if g is not None:
                g_adv = hinge_g(self.heads(f_fake))
                g = g + self.w.gan_weight * g_adv
                logs["g_adv"] = g_adv.detach()
            real_logits, fake_logits = self.heads(f_real), self.heads([f.detach() for f in f_fake])
            disc = hinge_d(real_logits, fake_logits)
            logs |= {"d_adv": disc.detach(), "acc_adv": accuracy(real_logits, fake_logits).detach()}
        logs = {key: v * scale for key, v in logs.items()}
        return SlotTerms(slots, x0, None if g is None else g * scale, None if disc is None else disc * scale, logs)

    def fake_terms(self, x0: torch.Tensor, slots: list[int], cond: Cond, d: Draws) -> SlotTerms:
        """The fake score's denoising loss on the student's detached x̂0 (call with the fake adapter active)."""
        scale = len(slots) / self.sched.slots
        t, eps = d.t_fake[slots], d.eps_fake[slots].to(x0)
        ab = self.ab(t)
        out = self.world.predict(renoise(x0, 1.0, ab, eps), t.to(x0.device), repeat_cond(cond, len(slots)))
        loss = (out - denoising_target(x0, eps, ab, self.pred)).pow(2).mean()
        return SlotTerms(slots, x0, None, loss * scale, {"fake": loss.detach() * scale})


def build(cfg: DistillConfig, world: World, sched: SlotSchedule, guidance: float, probe: Cond) -> DMD2Loss:
    """DMD2Loss for the engine: adds the fake-score adapter (and the heads) to a world whose UNet carries the
    student LoRA already; the student stays the active adapter."""
    from rapm_bench.distill.discriminator import build_heads, feature_channels
    from rapm_bench.distill.engine import derived_seed
    from rapm_bench.lora import attach_lora
    from rapm_bench.sampling import make_scheduler

    dmd2: DMD2Config = cfg.method("dmd2")
    with warnings.catch_warnings():  # PEFT warns on every second adapter: here it is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        fake_params = attach_lora(world.unet, dmd2.fake_rank, cfg.lora_targets, FAKE,
                                  derived_seed(cfg.seed, "fake-score", 0))
    world.unet.set_adapter(STUDENT)
    features = heads = None
    if dmd2.gan_weight > 0:
        features = EncoderFeatures(world)
        heads, _ = build_heads(feature_channels(features, probe), cfg.disc_hidden, cfg.seed, world.device)
    weights = DMD2Weights(dmd2.gan_weight, dmd2.fake_steps, dmd2.t_min, dmd2.t_max)
    scaling = make_scheduler(lcm_recipe(cfg.slots), world.noise_schedule).config.timestep_scaling
    return DMD2Loss(world, sched, guidance, weights, fake_params, features, heads, cfg.disc_lr,
                    dmd2.fake_lr or cfg.lr, float(scaling))


def _objective(cfg: DistillConfig, world: World, sched: SlotSchedule, guidance: float,
               student: list[torch.nn.Parameter], probe: Cond) -> DMD2Loss:
    """`build` in the engine's calling convention (rapm_bench.distill.objectives.ObjectiveBuilder)."""
    return build(cfg, world, sched, guidance, probe)


objective = ObjectiveSpec("dmd2", _objective, DMD2Config,
                          description="DMD2 (distribution matching + GAN), re-trained on the engine")
"""The `rapm_bench.objectives` plug-in (pyproject.toml): DMD2's registry entry (on PEFT layers: its second
adapter)."""
