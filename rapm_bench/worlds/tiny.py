"""The embedded `tiny` world: the shapes-world teacher in 3×32×32 pixel space.

The teacher is a small transformers `CLIPTextModel` (token ids from open_clip's
`SimpleTokenizer`, whose BPE ships in the wheel) and a small diffusers
`UNet2DConditionModel` with cross-attention on its last hidden state. It was trained
with v-prediction on a cosine schedule rescaled to zero terminal SNR (docs/design.md §2, the shapes world: with
SD's schedule the backgrounds followed the initial noise). Latents are images in [-1, 1];
decode is the identity up to quantisation. Both networks run in fp32: they are tiny.

Shipped layout (`rapm_bench/assets/tiny/teacher/`): `unet/` and `text_encoder/`
(diffusers / transformers `save_pretrained` folders, fp16 safetensors), `world.json`
(noise schedule, context length, default guidance), `README.md`, `samples.png`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .base import Cond, NoiseSchedule, UNetWorld
from .shapes import IMAGE_SIZE

CONTEXT_LENGTH = 32  # tokens per caption (the grammar's longest caption takes 20)
NOISE_SCHEDULE = NoiseSchedule(
    num_train_timesteps=1000,
    beta_start=0.0001,  # unused by the cosine schedule; kept for schedulers that read it
    beta_end=0.02,  # unused likewise
    beta_schedule="squaredcos_cap_v2",  # Nichol & Dhariwal's cosine: suits low-resolution pixel space
    prediction_type="v_prediction",  # needed at zero terminal SNR (eps is undefined at t = T)
    rescale_betas_zero_snr=True,  # alphabar_T = 0: pure noise at the first sampling step
)
DEFAULT_GUIDANCE = 3.0  # CFG scale, overridden by the shipped world.json
WORLD_JSON = "world.json"


def default_teacher_dir() -> Path:
    """The teacher weights shipped inside the package."""
    return Path(str(resources.files("rapm_bench") / "assets" / "tiny" / "teacher"))


@functools.lru_cache(maxsize=4)
def _simple_tokenizer(context_length: int) -> Any:
    """open_clip's SimpleTokenizer (its BPE ships in the wheel), built once."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


_PLAIN = re.compile(r"[a-z]+( [a-z]+)*")


def tokenize(prompts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Token ids (N, context_length), equal to open_clip's SimpleTokenizer output.

    Captions of plain lower-case words (the shapes grammar) take a per-word cache, which is
    ~50× faster than SimpleTokenizer's text cleaning; anything else goes through it.
    """
    tok = _simple_tokenizer(context_length)
    if not all(p == "" or _PLAIN.fullmatch(p) for p in prompts):
        return tok(list(prompts))
    sot, eot = tok.sot_token_id, tok.eot_token_id
    rows = []
    for p in prompts:
        ids = [sot, *(t for w in p.split() for t in _word_ids(w)), eot]
        if len(ids) > context_length:  # truncate like SimpleTokenizer: keep the end token
            ids = ids[: context_length - 1] + [eot]
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).view(len(prompts), context_length)


@functools.lru_cache(maxsize=4096)
def _word_ids(word: str) -> tuple[int, ...]:
    """BPE ids of one plain word."""
    return tuple(_simple_tokenizer(CONTEXT_LENGTH).encode(word))


def world_metadata(guidance: float, context_length: int = CONTEXT_LENGTH) -> dict[str, Any]:
    """The contents of world.json: everything besides the two networks' own configs."""
    return {
        "noise_schedule": asdict(NOISE_SCHEDULE),
        "context_length": context_length,
        "default_guidance": guidance,
        "tokenizer": "open_clip.tokenizer.SimpleTokenizer",
        "image_size": IMAGE_SIZE,
    }


def _fp32(module: torch.nn.Module) -> torch.nn.Module:
    """The module in fp32 (cast only when needed: diffusers warns on every dtype cast)."""
    if any(p.dtype != torch.float32 for p in module.parameters()):
        module = module.float()
    return module


class TinyWorld(UNetWorld):
    """Pixel-space shapes world: text encoder + UNet, fp32, latent == image in [-1, 1]."""

    name = "tiny"

    def __init__(
        self,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        device: torch.device | str = "cpu",
        noise_schedule: NoiseSchedule = NOISE_SCHEDULE,
        default_guidance: float = DEFAULT_GUIDANCE,
        context_length: int = CONTEXT_LENGTH,
        source: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.unet = _fp32(unet).to(self.device).eval()
        self.text_encoder = _fp32(text_encoder).to(self.device).eval().requires_grad_(False)
        self.noise_schedule = noise_schedule
        self.default_guidance = float(default_guidance)
        self.context_length = context_length
        self.source = source
        self._empty: torch.Tensor | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(3, 32, 32): pixel space."""
        return (3, IMAGE_SIZE, IMAGE_SIZE)

    @property
    def image_size(self) -> int:
        """32 pixels."""
        return IMAGE_SIZE

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Last hidden state of the text encoder, (B, context_length, hidden)."""
        ids = tokenize(prompts, self.context_length).to(self.device)
        return {"encoder_hidden_states": self.text_encoder(input_ids=ids).last_hidden_state.float()}

    def negative_cond(self, cond: Cond) -> Cond:
        """The empty caption's encoding (the teacher's CFG-dropout token), repeated to the batch."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])["encoder_hidden_states"]
        batch = cond["encoder_hidden_states"].shape[0]
        return {"encoder_hidden_states": self._empty.expand(batch, -1, -1)}

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """v-prediction of the UNet in fp32 (gradients flow where the caller enables them)."""
        t = torch.as_tensor(t, device=self.device)
        out = self.unet(x.to(self.device, torch.float32), t, encoder_hidden_states=cond["encoder_hidden_states"])
        return out.sample.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> uint8 (B, 3, 32, 32) on the CPU."""
        return ((latents.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()

    # --- LoRA -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Provenance: schedule, guidance, weights folder."""
        return super().describe() | {"default_guidance": self.default_guidance, "teacher": self.source}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No 'Loading weights' progress bar for a 52-tensor model."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_tiny_world(device: torch.device | str | None = None, assets: Path | None = None) -> TinyWorld:
    """The shipped shapes-world teacher (or one in `assets`), loaded without any network access."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(assets) if assets is not None else default_teacher_dir()
    missing = [p for p in ("unet/config.json", "text_encoder/config.json", WORLD_JSON) if not (folder / p).is_file()]
    if missing:
        raise UserError(f"tiny teacher assets missing in {folder} ({', '.join(missing)}): run `rapm-bench tiny train-teacher`")
    meta = json.loads((folder / WORLD_JSON).read_text())
    schedule = NoiseSchedule(**meta["noise_schedule"])
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32, local_files_only=True)
    with _quiet_transformers():
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32, local_files_only=True)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TinyWorld(unet, text_encoder, device, schedule, meta["default_guidance"], meta["context_length"], str(folder))
