"""Discriminators on frozen teacher-UNet encoder features (docs/rapm.md §4).

The backbone is the teacher itself (the student's UNet with its adapters disabled), run
through the world's own `predict` and stopped after the mid block: forward hooks collect
the output of every down block and of the mid block. One set of small heads per position
type (absolute, relative) reads those features; the backbone is shared. Hinge loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..worlds.base import Cond, World


class _Stop(Exception):
    """Raised by the mid-block hook: the decoder half is never run."""


@contextmanager
def teacher_mode(unet: nn.Module) -> Iterator[None]:
    """The teacher = the same UNet with its LoRA adapters disabled (docs/rapm.md §5)."""
    has_peft = bool(getattr(unet, "_hf_peft_config_loaded", False))
    if has_peft:
        unet.disable_adapters()
    try:
        yield
    finally:
        if has_peft:
            unet.enable_adapters()


@contextmanager
def no_checkpointing(unet: nn.Module) -> Iterator[None]:
    """Store the backbone's activations: a checkpointed block would be recomputed in backward with the
    adapters enabled again, which is not the teacher."""
    encoder = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else [])]
    blocks = [m for b in encoder for m in b.modules() if getattr(m, "gradient_checkpointing", False)]
    for b in blocks:
        b.gradient_checkpointing = False
    try:
        yield
    finally:
        for b in blocks:
            b.gradient_checkpointing = True


class EncoderFeatures:
    """Frozen teacher-UNet encoder (down blocks + mid block) as a feature extractor; fp32 out."""

    def __init__(self, world: World) -> None:
        self.world = world

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> list[torch.Tensor]:
        """Features of latents x at timesteps t (gradients flow to x where enabled)."""
        unet = self.world.unet
        feats: list[torch.Tensor] = []

        def keep(_m: nn.Module, _i: object, out: object) -> None:
            feats.append(out[0] if isinstance(out, tuple) else out)  # down blocks return (hidden, residuals)

        def stop(_m: nn.Module, _i: object, out: object) -> None:
            feats.append(out[0] if isinstance(out, tuple) else out)
            raise _Stop

        hooks = [b.register_forward_hook(keep) for b in unet.down_blocks]
        if unet.mid_block is not None:
            hooks.append(unet.mid_block.register_forward_hook(stop))
        try:
            with teacher_mode(unet), no_checkpointing(unet):
                self.world.predict(x, t, cond)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return [f.float() for f in feats]


class Head(nn.Module):
    """conv3×3 → GroupNorm → SiLU → conv1×1: one logit per feature-map position."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        hidden = min(hidden, channels)
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if hidden % g == 0)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU(), nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Heads(nn.Module):
    """One head per backbone feature level; `forward` gives per-level logit maps."""

    def __init__(self, channels: list[int], hidden: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(Head(c, hidden) for c in channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [h(f) for h, f in zip(self.heads, feats, strict=True)]


def build_heads(channels: list[int], hidden: int, seed: int, device: torch.device) -> tuple[Heads, Heads]:
    """(absolute, relative) head sets, fp32, initialised from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = Heads(channels, hidden), Heads(channels, hidden)
    return heads[0].to(device), heads[1].to(device)


def feature_channels(features: EncoderFeatures, cond: Cond) -> list[int]:
    """Channel count of every backbone feature level (one probe forward)."""
    world = features.world
    x = torch.zeros(1, *world.latent_shape, device=world.device)
    with torch.no_grad():
        return [f.shape[1] for f in features(x, torch.tensor([500], device=world.device), cond)]


def score(logits: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample discriminator score: the mean logit over positions and levels, (B,)."""
    return torch.stack([lg.mean(dim=(1, 2, 3)) for lg in logits]).mean(0)


def hinge_d(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Discriminator hinge loss, mean over levels: E relu(1 − D(real)) + E relu(1 + D(fake))."""
    terms = [torch.relu(1 - r).mean() + torch.relu(1 + f).mean() for r, f in zip(real, fake, strict=True)]
    return torch.stack(terms).mean()


def hinge_g(fake: list[torch.Tensor]) -> torch.Tensor:
    """Generator hinge loss, mean over levels: −E D(fake)."""
    return -torch.stack([f.mean() for f in fake]).mean()


def accuracy(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Fraction of samples the discriminator gets right (real score > 0, fake score < 0)."""
    return 0.5 * ((score(real) > 0).float().mean() + (score(fake) < 0).float().mean())
