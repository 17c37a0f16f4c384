"""PCM (Wang et al. 2024, phased consistency models): published SDXL LoRAs, DDIM trailing; and its
training objective for the engine (`rapm-bench distill --objective pcm`), data-free."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rapm_bench.distill.discriminator import EncoderFeatures, Heads, accuracy, hinge_d, hinge_g
from rapm_bench.distill.objectives import Example, Objective
from rapm_bench.distill.rapm import SlotTerms, Student, ddim_jump, repeat_cond, slot_chunks
from rapm_bench.distill.schedule import SlotSchedule, renoise
from rapm_bench.errors import UserError
from rapm_bench.models import HubFile, ModelSpec, Reported
from rapm_bench.plugins import ObjectiveSpec
from rapm_bench.sampling import DDIM_TRAILING
from rapm_bench.worlds.base import Cond

from .rapm import PAPER_PROTOCOL

if TYPE_CHECKING:
    from rapm_bench.distill.config import DistillConfig
    from rapm_bench.worlds.base import World

STEPS = (2, 4, 8, 16)

SPEC = ModelSpec(
    name="pcm",
    description="PCM smallcfg LoRAs (2/4/8/16 steps), DDIM trailing, guidance 1 (model card: 1-2)",
    recipe=DDIM_TRAILING,
    default_steps=4,
    steps=STEPS,
    guidance=1.0,
    lora={
        "sdxl": {s: HubFile("wangfuyun/PCM_Weights", f"pcm_sdxl_smallcfg_{s}step_converted.safetensors",
                            subfolder="sdxl") for s in STEPS},
        "tiny": {4: "assets/tiny/pcm/lora.safetensors"},
    },
    train_command="`rapm-bench distill --objective pcm` (writes runs/distill/tiny-pcm/lora.safetensors)",
    reported=(Reported("sdxl", None, 22.84, 30.36, PAPER_PROTOCOL, "RAPM README table (PCM: 8 A100, batch 16)"),),
)


# --- the training objective (`rapm-bench distill --objective pcm`) --------------------------------------
# PCM, Algorithm 1, data-free: PCM noises real images to a point x_t inside a phase and takes one teacher
# ODE step (CFG) to x_{t−Δ}; here both points come from the cached teacher trajectories (the teacher's
# fine grid inside each slot = phase), so no real image is needed. The student's jump to the phase edge,
# DDIM(x_t, t → t_n; ε_φ), must equal its own detached jump DDIM(x_{t−Δ}, t−Δ → t_n; ε_φ⁻) (PCM's LoRA
# scripts: φ⁻ = φ, stop-grad; an EMA target on request); at the edge itself the target is the teacher's
# point (boundary condition). Distance: pseudo-Huber per element (PCM's `huber`). Optional adversarial
# term (PCM's, off by default): hinge heads on the frozen teacher encoder, real = the target, fake = the
# online jump, both re-noised from t_n into the phase above. Students sample like RAPM's: DDIM trailing,
# one step per phase, guidance 1.


def pseudo_huber_elementwise(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((x − y)² + c²) − c): PCM's and LCM's `huber` loss (L2 below c, L1 above)."""
    return ((x - y).pow(2) + c * c).sqrt().sub(c).mean()


class EMATarget:
    """An exponential moving average of the student LoRA, swapped in to compute targets."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the student's parameters inside the block (no grad), restored exactly after."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, e in zip(self.params, self.shadow, strict=True):
                p.copy_(e)
            try:
                yield
            finally:
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    @torch.no_grad()
    def update(self) -> None:
        """shadow ← decay · shadow + (1 − decay) · student."""
        for e, p in zip(self.shadow, self.params, strict=True):
            e.lerp_(p.detach(), 1.0 - self.decay)


class PCMLoss(Objective):
    """Phased consistency on cached teacher points (see the block comment above)."""

    name = "pcm"

    def __init__(
        self, student: Student, sched: SlotSchedule, prediction_type: str, huber_c: float = 0.001,
        ema: EMATarget | None = None, adv_weight: float = 0.0, features: EncoderFeatures | None = None,
        heads: Heads | None = None, disc_lr: float = 1e-3,
    ) -> None:
        if adv_weight > 0 and (features is None or heads is None):
            raise ValueError("PCM's adversarial term needs the backbone features and a head set")
        self.student, self.sched, self.pred, self.huber_c = student, sched, prediction_type, huber_c
        self.ema, self.adv_weight, self.features, self.heads, self.disc_lr = ema, adv_weight, features, heads, disc_lr

    # --- the protocol ---------------------------------------------------------------------------------
    def critic_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        return [(list(self.heads.parameters()), self.disc_lr)] if self.heads is not None and self.adv_weight > 0 else []

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        if self.ema is not None:
            out["ema"] = {str(i): e for i, e in enumerate(self.ema.shadow)}
        if self.heads is not None and self.adv_weight > 0:
            out["heads"] = self.heads.state_dict()
        return out

    def load_state(self, modules: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.ema is not None:
            for i, e in enumerate(self.ema.shadow):
                e.copy_(modules["ema"][str(i)])
        if self.heads is not None and self.adv_weight > 0:
            self.heads.load_state_dict(modules["heads"])

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update()

    # --- one trajectory ---------------------------------------------------------------------------------
    def draw(self, gen: torch.Generator, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per slot: the start index k in [0, M) on the slot's fine grid, and t' in the slot above with its ε
        (the adversarial re-noising). Drawn up front: chunking does not change the stream."""
        n, m, b = self.sched.slots, self.sched.substeps, self.sched.boundaries
        k = torch.randint(0, m, (n,), generator=gen, device=gen.device).cpu()
        lo, hi = torch.tensor(b[:-1]) + 1, torch.tensor(b[1:])
        u = torch.rand(n, generator=gen, device=gen.device).cpu().double()
        t_prime = torch.minimum(lo + (u * (hi - lo + 1)).long(), hi)
        eps = torch.randn(like.shape, generator=gen, device=gen.device).to(like)
        return k, t_prime, eps

    def point(self, ex: Example, n: int, j: int) -> torch.Tensor:
        """Slot n's teacher point j on its fine grid (j = 0: z̃_{n+1}, j = M: z̃_n), (1, C, H, W), no graph."""
        m = self.sched.substeps
        if j == 0:
            return ex.z_tilde[n + 1 : n + 2].detach()
        if j == m:
            return ex.z_tilde[n : n + 1].detach()
        if ex.z_fine is None:
            raise ValueError("PCM needs the teacher points inside the slots: trajectories with interior=True")
        return ex.z_fine[n, j - 1 : j].detach()

    def chunks(self, ex: Example, cond: Cond, gen: torch.Generator, chunk: int) -> Iterator[SlotTerms]:
        """Each slot's consistency loss at a random fine point; `chunk` slots per student forward."""
        k, t_prime, eps = self.draw(gen, ex.z_tilde[1:])
        for slots in slot_chunks(self.sched.slots, chunk):
            yield self.terms(ex, slots, [int(k[n]) for n in slots], cond, t_prime[slots], eps[slots])

    @torch.no_grad()
    def targets(self, ex: Example, slots: list[int], ks: list[int], cond: Cond) -> torch.Tensor:
        """sg DDIM(x_{t−Δ}, t−Δ → t_n; ε_φ⁻) per slot; the teacher's z̃_n where t−Δ = t_n (boundary condition)."""
        m, b = self.sched.substeps, self.sched.boundaries
        out = [self.point(ex, n, j + 1) for n, j in zip(slots, ks, strict=True)]
        inner = [i for i, j in enumerate(ks) if j + 1 < m]
        if inner:
            x = torch.cat([out[i] for i in inner])
            t_from = [self.sched.fine(slots[i])[ks[i] + 1] for i in inner]
            t_to = [b[slots[i]] for i in inner]
            if self.ema is not None:
                with self.ema.swapped():
                    jumped = ddim_jump(self.student, self.sched, self.pred, x, t_from, t_to, cond)
            else:
                jumped = ddim_jump(self.student, self.sched, self.pred, x, t_from, t_to, cond)
            for row, i in enumerate(inner):
                out[i] = jumped[row : row + 1]
        return torch.cat(out)

    def terms(
        self, ex: Example, slots: list[int], ks: list[int], cond: Cond, t_prime: torch.Tensor, eps: torch.Tensor,
    ) -> SlotTerms:
        """The online jump from fine point k of each slot, matched to its target."""
        b, scale = self.sched.boundaries, len(slots) / self.sched.slots
        target = self.targets(ex, slots, ks, cond)  # before the online forward (an EMA swap writes the weights)
        x = torch.cat([self.point(ex, n, j) for n, j in zip(slots, ks, strict=True)])
        t_from = [self.sched.fine(n)[j] for n, j in zip(slots, ks, strict=True)]
        online = ddim_jump(self.student, self.sched, self.pred, x, t_from, [b[n] for n in slots], cond)
        g = pseudo_huber_elementwise(online, target, self.huber_c)
        logs = {"consistency": g.detach(), "mse_target": (online.detach() - target).pow(2).mean(),
                "k": torch.tensor([float(j) for j in ks]).mean()}
        d: torch.Tensor | None = None
        if self.adv_weight > 0:
            g_adv, d, adv_logs = self.adversarial(online, target, slots, cond, t_prime, eps)
            g = g + self.adv_weight * g_adv
            logs |= adv_logs
        logs = {key: v * scale for key, v in logs.items()}
        return SlotTerms(slots, online, g * scale, None if d is None else d * scale, logs)

    def adversarial(
        self, online: torch.Tensor, target: torch.Tensor, slots: list[int], cond: Cond, t_prime: torch.Tensor,
        eps: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge losses on the online jump (fake) and the target (real), both re-noised from t_n to t'."""
        assert self.features is not None and self.heads is not None
        ab_n = self.sched.alphabar(torch.tensor([self.sched.boundaries[n] for n in slots]))
        ab_p = self.sched.alphabar(t_prime)
        t_dev, k = t_prime.to(online.device), len(slots)
        f_fake = self.features(renoise(online, ab_n, ab_p, eps.to(online)), t_dev, repeat_cond(cond, k))
        with torch.no_grad():
            f_real = self.features(renoise(target, ab_n, ab_p, eps.to(online)), t_dev, repeat_cond(cond, k))
        g = hinge_g(self.heads(f_fake))
        real_logits, fake_logits = self.heads(f_real), self.heads([f.detach() for f in f_fake])
        d = hinge_d(real_logits, fake_logits)
        return g, d, {"g_adv": g.detach(), "d_adv": d.detach(), "acc_adv": accuracy(real_logits, fake_logits).detach()}


@dataclass(frozen=True)
class PCMConfig:
    """PCM's settings: `cfg.pcm` (`--set pcm.FIELD=VALUE`, or the flags --pcm-huber-c, --pcm-ema,
    --pcm-adv-weight); config.json stores them as pcm_<field>."""

    huber_c: float = 0.001  # pseudo-Huber per element, sqrt(d² + c²) − c (PCM's and LCM's scripts: 0.001)
    ema: float = 0.0  # target: 0 = the student itself, stop-grad (PCM's LoRA scripts); else EMA decay
    adv_weight: float = 0.0  # optional adversarial term (heads as RAPM's, real = the target); 0 = off

    def validate(self, cfg: DistillConfig, active: bool) -> None:
        """Reject values PCM cannot run (whichever objective trains: the flags exist for all)."""
        if self.huber_c <= 0:
            raise UserError(f"--pcm-huber-c must be positive, got {self.huber_c}")
        if not 0.0 <= self.ema < 1.0:
            raise UserError(f"--pcm-ema must be in [0, 1) (0 = stop-grad target), got {self.ema}")
        if self.adv_weight < 0:
            raise UserError(f"--pcm-adv-weight must be at least 0, got {self.adv_weight}")


def build(cfg: DistillConfig, world: World, sched: SlotSchedule, student: list[torch.nn.Parameter],
          probe: Cond) -> PCMLoss:
    """PCMLoss for the engine from a DistillConfig (its `pcm` settings) on a world with the student LoRA attached."""
    from rapm_bench.distill.discriminator import build_heads, feature_channels

    pcm: PCMConfig = cfg.method("pcm")
    features = heads = None
    if pcm.adv_weight > 0:
        features = EncoderFeatures(world)
        heads, _ = build_heads(feature_channels(features, probe), cfg.disc_hidden, cfg.seed, world.device)
    ema = EMATarget(student, pcm.ema) if pcm.ema > 0 else None
    return PCMLoss(world.predict, sched, world.noise_schedule.prediction_type, pcm.huber_c, ema,
                   pcm.adv_weight, features, heads, cfg.disc_lr)


def _objective(cfg: DistillConfig, world: World, sched: SlotSchedule, guidance: float,
               student: list[torch.nn.Parameter], probe: Cond) -> PCMLoss:
    """`build` in the engine's calling convention (rapm_bench.distill.objectives.ObjectiveBuilder)."""
    return build(cfg, world, sched, student, probe)


objective = ObjectiveSpec("pcm", _objective, PCMConfig, interior=True,
                          description="PCM (phased consistency), re-trained on the engine")
"""The `rapm_bench.objectives` plug-in (pyproject.toml): PCM's registry entry; it trains on the teacher points
inside every slot (`interior`), on PEFT layers (its EMA target)."""
