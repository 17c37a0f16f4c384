"""The RAPM objective (docs/rapm.md §4) as a small callable, testable on a CPU with a tiny UNet.

Per iteration one trajectory: the student rolls the N slots out on its own outputs,
z_N = z̃_N, z^φ_n = DDIM(z_{n+1}, t_{n+1}→t_n; ε_φ), z_n = detach(z^φ_n), and each z^φ_n
is matched to
  the absolute position  z̃_n (the teacher's point), and
  the relative position  ẑ_n = detach(DDIM(ẑΔ_{n+1}, t_{n+1}−Δ → t_n; ε_φ)), the student's
                         own jump from one fine teacher step below the boundary,
by two hinge discriminators on re-noised inputs (or plainly by L2, for the ablation), plus
an optional pseudo-Huber regression to z̃_n.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..worlds.base import Cond
from .discriminator import EncoderFeatures, Heads, accuracy, hinge_d, hinge_g
from .schedule import SlotSchedule, ddim_step, renoise

Student = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
"""(x, timesteps (B,), cond) -> model output (eps or v), fp32: the world's `predict` with the LoRA on."""


@dataclass(frozen=True)
class LossWeights:
    """λ's and the matching distance (config fields of the same names)."""

    lambda_abs: float = 1.0
    lambda_rel: float = 1.0
    lambda_reg: float = 1.0
    distance: str = "gan"  # "gan" | "l2"
    huber_c: float = 0.03


@dataclass
class SlotTerms:
    """The losses of one chunk of slots, each already divided by N (chunks sum to the slot mean)."""

    slots: list[int]
    fake: torch.Tensor  # z^φ_n for the chunk's slots, with grad (B = len(slots))
    g_loss: torch.Tensor | None  # into the student LoRA (None: no generator update from this chunk)
    d_loss: torch.Tensor | None  # into the critic: discriminator heads (DMD2: and the fake score); None without one
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, already / N


def repeat_cond(cond: Cond, n: int) -> Cond:
    """A batch-1 conditioning repeated to batch n."""
    return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in cond.items()}


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample sqrt(mean((x−y)²) + c²) − c (Song & Dhariwal 2023, per-element scale)."""
    d2 = (x - y).pow(2).flatten(1).mean(1)
    return (d2 + c * c).sqrt() - c


def ddim_jump(
    student: Student, sched: SlotSchedule, prediction_type: str, z: torch.Tensor, t_from: list[int], t_to: list[int],
    cond: Cond,
) -> torch.Tensor:
    """DDIM(z_b, t_from_b → t_to_b; ε_φ) for a batch of (point, slot) pairs: the student's jump."""
    t = sched.timesteps(t_from, z.device)  # made once on the device: no host-to-device copy (a stream sync) per jump
    out = student(z, t, repeat_cond(cond, len(t_from)))
    return ddim_step(z, out, sched.alphabar(t), sched.alphabar(sched.timesteps(t_to, z.device)), prediction_type)


def take(x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """x[slots] for a chunk's slots (consecutive, descending: `slot_chunks`) as a slice and a flip: indexing a CUDA
    tensor with a Python list copies the list to the device, which synchronises the stream."""
    lo, hi = slots[-1], slots[0]
    if slots == list(range(hi, lo - 1, -1)):
        return x[lo : hi + 1].flip(0)
    return x[slots]


def slot_chunks(slots: int, chunk: int) -> list[list[int]]:
    """Slots in roll-out order N−1 … 0, grouped `chunk` at a time."""
    order = list(reversed(range(slots)))
    return [order[i : i + chunk] for i in range(0, slots, chunk)]


class RAPMLoss:
    """RAPM's generator and discriminator losses for one trajectory (batch 1)."""

    def __init__(
        self, student: Student, sched: SlotSchedule, prediction_type: str, weights: LossWeights,
        features: EncoderFeatures | None = None, heads_abs: Heads | None = None, heads_rel: Heads | None = None,
    ) -> None:
        adversarial = weights.distance == "gan" and (weights.lambda_abs > 0 or weights.lambda_rel > 0)
        if adversarial and (features is None or heads_abs is None or heads_rel is None):
            raise ValueError("distance 'gan' needs the backbone features and both head sets")
        self.student, self.sched, self.pred, self.w = student, sched, prediction_type, weights
        self.features, self.heads_abs, self.heads_rel = features, heads_abs, heads_rel
        # The no-grad passes' fast path (objectives.fast_nograd, issue 14): the same maths, other kernels.
        self.nograd_student: Student = student  # roll-out and relative-target jumps (a CUDA-graphed `student`)
        self.real_features: Callable[..., list[torch.Tensor]] | None = features  # the real side's features
        self.merge_passes = False  # the first roll-out jump and the relative-target jumps as one batch
        # The gradient passes' fast path (objectives.fast_grad): forward and backward replayed from CUDA graphs.
        self.grad_student: Student = student  # z^φ_n's jumps, differentiated into the LoRA
        self.grad_features: Callable[..., list[torch.Tensor]] | None = features  # the fake side's features

    # --- the student's DDIM jumps ----------------------------------------------------------------
    def jump(self, z: torch.Tensor, t_from: list[int], t_to: list[int], cond: Cond) -> torch.Tensor:
        """DDIM(z_b, t_from_b → t_to_b; ε_φ) for a batch of (point, slot) pairs."""
        return ddim_jump(self.student, self.sched, self.pred, z, t_from, t_to, cond)

    def step(self, z_in: torch.Tensor, slots: list[int], cond: Cond) -> torch.Tensor:
        """z^φ_n = DDIM(z_{n+1}, t_{n+1} → t_n; ε_φ) for each slot n (gradients flow where enabled)."""
        b = self.sched.boundaries
        return ddim_jump(self.grad_student, self.sched, self.pred, z_in, [b[n + 1] for n in slots],
                         [b[n] for n in slots], cond)

    @torch.no_grad()
    def nograd_jump(self, z: torch.Tensor, t_from: list[int], t_to: list[int], cond: Cond) -> torch.Tensor:
        """`jump` without grad, through the no-grad passes' student (CUDA graphs on a GPU)."""
        return ddim_jump(self.nograd_student, self.sched, self.pred, z, t_from, t_to, cond)

    @torch.no_grad()
    def roll_inputs(self, z: torch.Tensor, slots: list[int], cond: Cond) -> torch.Tensor:
        """The detached inputs z_{n+1} of consecutive slots, starting from z (no grad)."""
        return self.nograd_passes(z, slots, None, cond)[0]

    @torch.no_grad()
    def relative_target(self, z_delta: torch.Tensor, slots: list[int], cond: Cond) -> torch.Tensor:
        """ẑ_n = detach(DDIM(ẑΔ_{n+1}, t_{n+1}−Δ → t_n; ε_φ)); with M = 1, ẑΔ_{n+1} = z̃_n already."""
        b = self.sched.boundaries
        if self.sched.substeps == 1:
            return z_delta.clone()
        return self.nograd_jump(z_delta, [self.sched.delta_timestep(n) for n in slots], [b[n] for n in slots], cond)

    @torch.no_grad()
    def nograd_passes(
        self, z: torch.Tensor, slots: list[int], z_delta: torch.Tensor | None, cond: Cond,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A chunk's roll-out inputs z_{n+1} (from z, detached) and, given ẑΔ, its relative targets ẑ_n.

        Both only read the student, so with `merge_passes` the first roll-out jump and the chunk's
        relative-target jumps run as one batch (1 + len(slots) latents): one pass fewer per chunk.
        """
        b, todo = self.sched.boundaries, slots[:-1]
        inputs, rel = [z.detach()], None
        if z_delta is not None and self.merge_passes and todo and self.sched.substeps > 1:
            n = todo[0]
            out = self.nograd_jump(torch.cat([inputs[0], z_delta]),
                                   [b[n + 1]] + [self.sched.delta_timestep(m) for m in slots],
                                   [b[n]] + [b[m] for m in slots], cond)
            inputs.append(out[:1])
            rel, todo = out[1:], todo[1:]
        for n in todo:
            inputs.append(self.nograd_jump(inputs[-1], [b[n + 1]], [b[n]], cond))
        if z_delta is not None and rel is None:
            rel = self.relative_target(z_delta, slots, cond)
        return torch.cat(inputs), rel

    # --- one trajectory ---------------------------------------------------------------------------
    def chunks(
        self, z_tilde: torch.Tensor, z_delta: torch.Tensor, cond: Cond, gen: torch.Generator, chunk: int,
    ) -> Iterator[SlotTerms]:
        """Roll out one trajectory (z_tilde (N+1, ...), z_delta (N, ...)); yield each chunk's losses.

        The caller runs backward on each chunk before asking for the next (memory of one chunk).
        """
        n_slots = self.sched.slots
        t_prime, eps = self.draw_renoise(gen, z_tilde[1:])  # drawn up front: chunking does not change the stream
        z = z_tilde[n_slots : n_slots + 1]  # z_N = z̃_N
        for slots in slot_chunks(n_slots, chunk):
            # detach between slots: the inputs carry no graph; the relative targets ẑ_n need none either
            deltas = take(z_delta, slots)
            z_in, rel = self.nograd_passes(z, slots, deltas.to(z) if self.w.lambda_rel > 0 else None, cond)
            fake = self.step(z_in, slots, cond)
            yield self.terms(fake, slots, take(z_tilde, slots), deltas, cond, take(t_prime, slots), take(eps, slots),
                             rel)
            z = fake[-1:].detach()

    def draw_renoise(self, gen: torch.Generator, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot n: t' uniform in the slot above, (t_n, t_{n+1}], and the re-noising ε (shape of `like`); both on
        the generator's device (t' as the CPU would compute it: float64 products, truncated)."""
        b = self.sched.boundaries
        lo = self.sched.timesteps(b[:-1], gen.device) + 1
        hi = self.sched.timesteps(b[1:], gen.device)
        u = torch.rand(len(b) - 1, generator=gen, device=gen.device).double()
        t_prime = torch.minimum(lo + (u * (hi - lo + 1)).long(), hi)
        eps = torch.randn(like.shape, generator=gen, device=gen.device).to(like)
        return t_prime, eps

    def __call__(
        self, z_tilde: torch.Tensor, z_delta: torch.Tensor, cond: Cond, gen: torch.Generator, chunk: int | None = None,
    ) -> list[SlotTerms]:
        """All chunks' terms at once (tests; the engine iterates `chunks` to save memory)."""
        return list(self.chunks(z_tilde, z_delta, cond, gen, chunk or self.sched.slots))

    def terms(
        self, fake: torch.Tensor, slots: list[int], abs_target: torch.Tensor, z_delta: torch.Tensor, cond: Cond,
        t_prime: torch.Tensor, eps: torch.Tensor, rel_target: torch.Tensor | None = None,
    ) -> SlotTerms:
        """Generator and discriminator losses of z^φ_n against z̃_n (absolute) and ẑ_n (relative, computed here
        unless given)."""
        w, scale = self.w, len(slots) / self.sched.slots
        abs_target = abs_target.to(fake).detach()
        if w.lambda_rel <= 0:
            rel_target = abs_target
        elif rel_target is None:
            rel_target = self.relative_target(z_delta.to(fake), slots, cond)
        logs = {"mse_abs": (fake.detach() - abs_target).pow(2).mean(),
                "mse_rel": (fake.detach() - rel_target).pow(2).mean()}
        g = fake.new_zeros(())
        d: torch.Tensor | None = None
        if w.distance == "l2":
            g = g + w.lambda_abs * (fake - abs_target).pow(2).mean() + w.lambda_rel * (fake - rel_target).pow(2).mean()
        elif w.lambda_abs > 0 or w.lambda_rel > 0:
            g_adv, d, adv_logs = self._adversarial(fake, slots, abs_target, rel_target, cond, t_prime, eps)
            g = g + g_adv
            logs |= adv_logs
        if w.lambda_reg > 0:
            reg = pseudo_huber(fake, abs_target, w.huber_c).mean()
            g = g + w.lambda_reg * reg
            logs["reg"] = reg.detach()
        logs = {k: v * scale for k, v in logs.items()}
        return SlotTerms(slots, fake, g * scale, None if d is None else d * scale, logs)

    def _adversarial(
        self, fake: torch.Tensor, slots: list[int], abs_target: torch.Tensor, rel_target: torch.Tensor, cond: Cond,
        t_prime: torch.Tensor, eps: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge losses on inputs re-noised from t_n to t' in the slot above (t', ε shared by real and fake)."""
        assert self.real_features is not None and self.heads_abs is not None and self.heads_rel is not None
        assert self.grad_features is not None
        w, b, k = self.w, self.sched.boundaries, len(slots)
        eps = eps.to(fake)
        ab_n = self.sched.alphabar(self.sched.timesteps([b[n] for n in slots], fake.device))
        t_dev = t_prime.to(fake.device)
        ab_p = self.sched.alphabar(t_dev)

        def noisy(x: torch.Tensor) -> torch.Tensor:
            return renoise(x, ab_n, ab_p, eps)

        f_fake = self.grad_features(noisy(fake), t_dev, repeat_cond(cond, k))  # grad to the LoRA through the teacher
        with torch.no_grad():
            reals = torch.cat([noisy(abs_target), noisy(rel_target)])
            f_real = self.real_features(reals, torch.cat([t_dev, t_dev]), repeat_cond(cond, 2 * k))
        f_abs, f_rel = [f[:k] for f in f_real], [f[k:] for f in f_real]
        f_fake_d = [f.detach() for f in f_fake]
        g = fake.new_zeros(())
        d = fake.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        for name, lam, heads, real in (("abs", w.lambda_abs, self.heads_abs, f_abs),
                                       ("rel", w.lambda_rel, self.heads_rel, f_rel)):
            if lam <= 0:
                continue
            g_part = hinge_g(heads(f_fake))
            real_logits, fake_logits = heads(real), heads(f_fake_d)
            d_part = hinge_d(real_logits, fake_logits)
            g = g + lam * g_part
            d = d + d_part
            logs[f"g_{name}"] = g_part.detach()
            logs[f"d_{name}"] = d_part.detach()
            logs[f"acc_{name}"] = accuracy(real_logits, fake_logits).detach()
        return g, d, logs
