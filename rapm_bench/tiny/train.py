"""Training and reporting for the shapes world: the tiny teacher, the tiny evaluator, world.md.

Data are rendered on the fly on the training device (no data loading): step `s` of a run
draws the train-split indices [offset + s·B, offset + (s+1)·B) and its noise from a
generator seeded with (seed, s), so a run is a pure function of its config. Each run
writes its folder atomically: weights (fp16 safetensors), JSON config, a JSONL loss log,
a model card README.md and a sample grid PNG.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..worlds import shapes
from ..worlds.tiny import (
    CONTEXT_LENGTH,
    NOISE_SCHEDULE,
    WORLD_JSON,
    TinyWorld,
    load_tiny_world,
    tokenize,
    world_metadata,
)


# --- configs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherArch:
    """Sizes of the teacher's two networks."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)  # UNet widths at 32, 16, 8 px
    layers_per_block: int = 1  # resnets per down block (up blocks get one more)
    attention_heads: int = 4  # cross/self-attention heads (diffusers' `attention_head_dim`)
    text_width: int = 64  # CLIPTextModel hidden size = UNet cross_attention_dim
    text_layers: int = 3
    text_heads: int = 4


@dataclass(frozen=True)
class TeacherTrainConfig:
    """`rapm-bench tiny train-teacher`."""

    steps: int = 40_000  # optimiser steps (the run also stops at max_minutes)
    batch_size: int = 256
    lr: float = 5e-4  # AdamW peak learning rate
    warmup: int = 500  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine decay to lr·ratio at the end of the run
    weight_decay: float = 0.01
    ema_decay: float = 0.9995  # the shipped weights are the EMA
    cfg_dropout: float = 0.1  # caption -> "" with this probability (classifier-free guidance)
    grad_clip: float = 1.0
    max_minutes: float | None = None  # wall-clock budget; the LR schedule follows whichever ends first
    seed: int = 0
    guidance: float = 3.0  # default CFG scale written to world.json (the model card's samples use it)
    data_offset: int = 0  # first train-split index of the stream
    log_every: int = 100
    init: Path | None = None  # continue from this teacher folder's weights (its arch wins); None: from scratch
    arch: TeacherArch = field(default_factory=TeacherArch)

    def command(self) -> str:
        """The CLI command that reruns this configuration."""
        return _command("rapm-bench tiny train-teacher", self, ("steps", "batch_size", "lr", "warmup", "max_minutes",
                                                                "init", "data_offset", "guidance", "seed"))


@dataclass(frozen=True)
class EvaluatorTrainConfig:
    """`rapm-bench tiny train-evaluator`."""

    steps: int = 6000  # optimiser steps (the run also stops at max_minutes)
    batch_size: int = 1024  # contrastive batch
    lr: float = 1e-3
    warmup: int = 300
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.05
    max_minutes: float | None = None
    seed: int = 0
    data_offset: int = 5_000_000  # a different slice of the train split than the teacher's
    eval_images: int = 8192  # val-split renders for the final retrieval accuracy
    log_every: int = 100

    def command(self) -> str:
        """The CLI command that reruns this configuration."""
        return _command("rapm-bench tiny train-evaluator", self, ("steps", "batch_size", "lr", "max_minutes",
                                                                  "eval_images", "seed"))


@dataclass(frozen=True)
class ReportConfig:
    """`rapm-bench tiny report`: the teacher at several step counts vs real renders."""

    out: Path = Path("results/tiny")
    steps: tuple[int, ...] = (1, 2, 4, 8, 25, 50)  # DDIM (trailing) step counts
    guidance: float | None = None  # None: the teacher's default guidance
    num_generated: int = 4096  # images per step count (eval-split captions 0..N-1, seeds seed+i)
    num_reference: int = 16384  # real renders for the reference FID statistics (eval split, after those)
    batch_size: int = 512
    seed: int = 0
    grid_columns: int = 12  # prompts shown in the sample grid
    guidance_sweep: tuple[float, ...] = ()  # extra table: these guidance scales at sweep_steps
    sweep_steps: tuple[int, ...] = (4, 50)
    device: str | None = None
    teacher: Path | None = None  # default: the shipped teacher
    evaluator: Path | None = None  # default: the shipped evaluator

    def command(self) -> str:
        """The CLI command that reproduces this report."""
        parts = ["rapm-bench tiny report", f"--out {self.out}", f"--steps {','.join(map(str, self.steps))}",
                 f"--num-generated {self.num_generated}", f"--num-reference {self.num_reference}",
                 f"--seed {self.seed}"]
        if self.guidance is not None:
            parts.append(f"--guidance {self.guidance:g}")
        if self.guidance_sweep:
            parts.append(f"--guidance-sweep {','.join(f'{g:g}' for g in self.guidance_sweep)}")
            parts.append(f"--sweep-steps {','.join(map(str, self.sweep_steps))}")
        return " ".join(parts)


# --- shared helpers ------------------------------------------------------------------------
def _command(prefix: str, cfg: Any, options: Sequence[str]) -> str:
    """`prefix --option value ...` for the options that differ from the config's defaults."""
    default = type(cfg)()
    parts = [prefix]
    for name in options:
        value = getattr(cfg, name)
        if value != getattr(default, name):
            parts.append(f"--{name.replace('_', '-')} {value:g}" if isinstance(value, float) else
                         f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, else CUDA when present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def lr_factor(step: int, progress: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_ratio` over `progress` in [0, 1]."""
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batch_indices(step: int, batch_size: int, offset: int) -> torch.Tensor:
    """Train-split indices of step `step` (wrapping around the split)."""
    train = shapes.SPLITS["train"]
    pos = (offset + step * batch_size + torch.arange(batch_size, dtype=torch.int64)) % len(train)
    return pos + train.start


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The noise generator of one training step: a function of (seed, step) only."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` in one rename.

    On failure the temporary folder (with its train_log.jsonl) stays for inspection; the
    next run of the same target removes it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    yield tmp
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


class RunLog:
    """Progress bar + JSONL log of interval-mean losses."""

    def __init__(self, path: Path | None, total: int, desc: str, every: int) -> None:
        from tqdm import tqdm

        self.path, self.every, self.t0 = path, every, time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="step", mininterval=5.0)
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.rows: list[dict[str, float]] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def elapsed_min(self) -> float:
        """Minutes since the run started."""
        return (time.perf_counter() - self.t0) / 60

    def add(self, step: int, lr: float, **values: torch.Tensor) -> None:
        """Record one step's losses; every `every` steps write their mean."""
        for k, v in values.items():  # summed on the device: no host sync until a log row
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1
        self.bar.update(1)
        if (step + 1) % self.every == 0:
            row = {"step": step + 1, "lr": lr, "minutes": round(self.elapsed_min(), 3)}
            row |= {k: float(s) / self.n for k, s in self.sums.items()}
            self.rows.append(row)
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k not in ("step", "lr", "minutes")})
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            self.sums, self.n = {}, 0

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


def loss_table(rows: Sequence[dict[str, float]], keys: Sequence[str], points: int = 10) -> str:
    """A markdown table of the loss log at about `points` evenly spaced rows."""
    if not rows:
        return "(no log rows)"
    pick = sorted({round(i * (len(rows) - 1) / max(points - 1, 1)) for i in range(points)})
    lines = ["| step | minutes | " + " | ".join(keys) + " |", "|---" * (2 + len(keys)) + "|"]
    for i in pick:
        r = rows[i]
        lines.append(f"| {r['step']} | {r['minutes']:.1f} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


def machine() -> str:
    """A one-line description of the machine running this."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def save_grid_png(rows: Sequence[tuple[str, torch.Tensor]], path: Path, scale: int = 3) -> None:
    """A labelled grid: one row per (label, uint8 images (N, 3, H, W)), upscaled `scale`×."""
    from PIL import Image, ImageDraw

    n = max(len(imgs) for _, imgs in rows)
    size = rows[0][1].shape[-1] * scale
    pad, label_w = 2, 90
    sheet = Image.new("RGB", (label_w + n * (size + pad), len(rows) * (size + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, imgs) in enumerate(rows):
        y = r * (size + pad)
        draw.text((4, y + size // 2 - 6), label, fill=(0, 0, 0))
        for c, img in enumerate(imgs):
            tile = Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (label_w + c * (size + pad), y))
    sheet.save(path)


# --- the teacher -----------------------------------------------------------------------------
def build_teacher(arch: TeacherArch) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Untrained (UNet, text encoder) of the given sizes."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(arch.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=shapes.IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=arch.block_out_channels,
        layers_per_block=arch.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=arch.text_width,
        attention_head_dim=arch.attention_heads,  # diffusers reads this as the number of heads
        norm_num_groups=min(32, arch.block_out_channels[0]),
    )
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=arch.text_width,
        intermediate_size=4 * arch.text_width,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    return unet, CLIPTextModel(text_config)


def v_loss(
    unet: torch.nn.Module, text_encoder: torch.nn.Module, x0: torch.Tensor, ids: torch.Tensor,
    alphas_cumprod: torch.Tensor, gen: torch.Generator,
) -> torch.Tensor:
    """v-prediction MSE at uniform timesteps (Salimans & Ho 2022): v = √ᾱ·ε − √(1−ᾱ)·x0."""
    b = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.numel(), (b,), device=x0.device, generator=gen)
    eps = torch.randn(x0.shape, device=x0.device, generator=gen)
    a = alphas_cumprod[t].sqrt().view(b, 1, 1, 1)
    s = (1 - alphas_cumprod[t]).sqrt().view(b, 1, 1, 1)
    hidden = text_encoder(input_ids=ids).last_hidden_state
    pred = unet(a * x0 + s * eps, t, encoder_hidden_states=hidden).sample
    return F.mse_loss(pred.float(), a * eps - s * x0)


def _teacher_batch(cfg: TeacherTrainConfig, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 in [-1, 1], token ids with CFG dropout) for one step."""
    idx = batch_indices(step, cfg.batch_size, cfg.data_offset)
    images = shapes.render_images(idx, device)
    caps = shapes.captions(idx)
    cpu_gen = step_generator(cfg.seed, step, torch.device("cpu"))  # on the host: no device sync
    drop = (torch.rand(len(caps), generator=cpu_gen) < cfg.cfg_dropout).tolist()
    ids = tokenize(["" if d else c for c, d in zip(caps, drop, strict=True)]).to(device)
    return images.float() / 127.5 - 1, ids


def _save_teacher(
    folder: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module, guidance: float
) -> None:
    """Write the diffusers/transformers folders in fp16 and world.json."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the fp16 cast warns about fp32 modules it does not have
    try:
        copy.deepcopy(unet).to("cpu", torch.float16).save_pretrained(folder / "unet", safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)
    copy.deepcopy(text_encoder).to("cpu", torch.float16).save_pretrained(folder / "text_encoder")
    (folder / WORLD_JSON).write_text(json.dumps(world_metadata(guidance), indent=2) + "\n")


def teacher_samples(world: TinyWorld, n: int = 16, steps: int = 50, guidance: float | None = None) -> torch.Tensor:
    """Samples for eval captions 0..n-1 (seeds 0..n-1) with DDIM trailing."""
    from ..generate import generate_batch
    from ..sampling import DDIM_TRAILING

    prompts = shapes.eval_captions(n)
    w = world.default_guidance if guidance is None else guidance
    return generate_batch(world, prompts, list(range(n)), DDIM_TRAILING, steps, w)


def train_teacher(cfg: TeacherTrainConfig, out: Path, device: str | torch.device | None = None) -> dict[str, Any]:
    """Train the shapes-world teacher and write it (EMA weights) to `out` atomically."""
    with atomic_dir(Path(out)) as tmp:
        info = _train_teacher_into(cfg, tmp, resolve_device(device))
    return info


def _train_teacher_into(cfg: TeacherTrainConfig, folder: Path, device: torch.device) -> dict[str, Any]:
    """The teacher's training loop; writes every output file into `folder`."""
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True
    history: list[dict[str, Any]] = []
    if cfg.init is not None:
        start = load_tiny_world("cpu", Path(cfg.init))
        unet, text_encoder = start.unet, start.text_encoder.requires_grad_(True)
        history = _history(Path(cfg.init))
    else:
        unet, text_encoder = build_teacher(cfg.arch)
    unet.to(device).train()
    text_encoder.to(device).train()
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    ema_params = [p for m in ema for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    alphas_cumprod = NOISE_SCHEDULE.alphas_cumprod().float().to(device)
    log = RunLog(folder / "train_log.jsonl", cfg.steps, "teacher", cfg.log_every)

    done = 0
    for step in range(cfg.steps):
        # 1. schedule: warm-up, then cosine over whichever budget (steps, minutes) runs out first
        progress = step / cfg.steps
        if cfg.max_minutes:
            progress = max(progress, log.elapsed_min() / cfg.max_minutes)
            if progress >= 1:
                break
        lr = cfg.lr * lr_factor(step, progress, cfg.warmup, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        # 2. data rendered on the device, loss, update
        gen = step_generator(cfg.seed, step, device)
        x0, ids = _teacher_batch(cfg, step, device)
        with autocast(device):
            loss = v_loss(unet, text_encoder, x0, ids, alphas_cumprod, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        # 3. EMA (with the usual warm-up of the decay)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        log.add(step, lr, loss=loss.detach(), grad_norm=grad_norm.detach())
        done = step + 1
    log.close()

    # 4. the EMA weights first, then samples and the model card
    info = {"steps": done, "minutes": round(log.elapsed_min(), 2), "machine": machine(), "command": cfg.command(),
            "config": _jsonable(asdict(cfg)), "final": log.rows[-1] if log.rows else {},
            "params": {"unet": _count(ema[0]), "text_encoder": _count(ema[1])}, "history": history}
    _save_teacher(folder, ema[0], ema[1], cfg.guidance)
    (folder / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    world = TinyWorld(ema[0], ema[1], device, NOISE_SCHEDULE, cfg.guidance, source=str(folder))
    samples = teacher_samples(world)
    save_grid_png([(f"{i * 8}-{i * 8 + 7}", samples[i * 8 : (i + 1) * 8]) for i in range(2)], folder / "samples.png")
    (folder / "README.md").write_text(teacher_card(info, log.rows))
    return info


def _history(folder: Path) -> list[dict[str, Any]]:
    """Earlier training stages of the teacher in `folder` (then that folder's own run)."""
    path = folder / "train_info.json"
    if not path.is_file():
        return [{"init": str(folder)}]
    info = json.loads(path.read_text())
    stage = {k: info.get(k) for k in ("steps", "minutes", "machine", "final")}
    stage |= {k: info["config"].get(k) for k in ("batch_size", "lr", "seed", "data_offset")}
    stage["command"] = info.get("command", "rapm-bench tiny train-teacher (options in train_info.json)")
    return [*info.get("history", []), stage]


def _count(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


def _jsonable(obj: Any) -> Any:
    """Paths and tuples made JSON-friendly."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _history_lines(info: dict[str, Any]) -> str:
    """Model-card lines for the earlier stages this run continued from."""
    lines = []
    for i, h in enumerate(info.get("history", []), 1):
        if "steps" not in h:
            lines.append(f"- **Stage {i}**: weights from {h.get('init')}.\n")
            continue
        loss = (h.get("final") or {}).get("loss", float("nan"))
        lines.append(f"- **Stage {i}** (this run continued from its EMA weights): {h['steps']:,} steps of batch "
                     f"{h['batch_size']}, lr {h['lr']}, seed {h['seed']}, data offset {h['data_offset']:,}, "
                     f"{h['minutes']:.1f} min on {h['machine']}, final loss {loss:.4f}: `{h['command']}`.\n")
    return "".join(lines)


def teacher_card(info: dict[str, Any], rows: Sequence[dict[str, float]]) -> str:
    """The teacher's model card."""
    cfg = info["config"]
    captions = "\n".join(f"{i}. {c}" for i, c in enumerate(shapes.eval_captions(16)))
    return f"""# tiny shapes-world teacher

Text-to-image diffusion teacher of the `tiny` world of rapm-bench: 3×32×32 pixel space.

- **Networks**: diffusers `UNet2DConditionModel` ({info['params']['unet'] / 1e6:.2f} M parameters,
  block widths {cfg['arch']['block_out_channels']}, cross-attention at 16 and 8 px) and a transformers
  `CLIPTextModel` ({info['params']['text_encoder'] / 1e6:.2f} M parameters, width {cfg['arch']['text_width']},
  {cfg['arch']['text_layers']} layers) fed open_clip `SimpleTokenizer` ids, context {CONTEXT_LENGTH}.
  Weights: the EMA (decay {cfg['ema_decay']}), stored fp16; run them in fp32.
- **Noise schedule**: `{NOISE_SCHEDULE.beta_schedule}` rescaled to zero terminal SNR, v-prediction
  (see `world.json`); sample with DDIM `timestep_spacing="trailing"`.
- **Data**: shapes-world renders of the train split (indices {cfg['data_offset']} onward,
  {info['steps'] * cfg['batch_size']:,} image-caption pairs seen), caption dropped to "" with p = {cfg['cfg_dropout']}.
- **Training**: {info['steps']:,} steps of batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (warm-up {cfg['warmup']},
  cosine to ×{cfg['min_lr_ratio']}), bf16 autocast, {info['minutes']:.1f} min on {info['machine']}.
{_history_lines(info)}- **Final loss** (mean of the last {cfg['log_every']} steps): {info['final'].get('loss', float('nan')):.4f}.
- **Default guidance**: {cfg['guidance']} (classifier-free, empty caption as the negative).

Reproduce (this stage): `{info['command']}`; all options are in `train_info.json`.

## Loss

{loss_table(rows, ["loss", "grad_norm"])}

## Samples (`samples.png`, 50 DDIM steps, guidance {cfg['guidance']}, seeds 0–15)

Row 1 is captions 0–7, row 2 captions 8–15 of the eval split:

{captions}
"""


# --- the evaluator ---------------------------------------------------------------------------
def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with the same caption counts as a positive."""
    logits = scale * image.float() @ text.float().T
    same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_evaluator(cfg: EvaluatorTrainConfig, out: Path, device: str | torch.device | None = None) -> dict[str, Any]:
    """Train the tiny CLIP evaluator contrastively on shapes pairs; write it to `out` atomically."""
    with atomic_dir(Path(out)) as tmp:
        info = _train_evaluator_into(cfg, tmp, resolve_device(device))
    return info


def _train_evaluator_into(cfg: EvaluatorTrainConfig, folder: Path, device: torch.device) -> dict[str, Any]:
    """The evaluator's training loop; writes every output file into `folder`."""
    from safetensors.torch import save_file

    from ..eval.tiny_evaluator import CONFIG, EVALUATOR_CONFIG, WEIGHTS, TinyEvaluator, build_clip

    torch.manual_seed(cfg.seed)
    model = build_clip(EVALUATOR_CONFIG).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    log = RunLog(folder / "train_log.jsonl", cfg.steps, "evaluator", cfg.log_every)

    torch.backends.cudnn.benchmark = True
    done = 0
    for step in range(cfg.steps):
        progress = step / cfg.steps
        if cfg.max_minutes:
            progress = max(progress, log.elapsed_min() / cfg.max_minutes)
            if progress >= 1:
                break
        lr = cfg.lr * lr_factor(step, progress, cfg.warmup, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = batch_indices(step, cfg.batch_size, cfg.data_offset)
        images = TinyEvaluator.preprocess(shapes.render_images(idx, device))
        ids = tokenize(shapes.captions(idx)).to(device)
        with autocast(device):
            img, txt, scale = model(images, ids)
        loss = contrastive_loss(img, txt, scale, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        log.add(step, lr, loss=loss.detach(), logit_scale=scale.detach())
        done = step + 1
    log.close()

    # final figures on the validation split
    evaluator = TinyEvaluator(model, EVALUATOR_CONFIG, device)
    images, caps = shapes.render(shapes.split_indices("val", cfg.eval_images), device)
    info = {"steps": done, "minutes": round(log.elapsed_min(), 2), "machine": machine(), "command": cfg.command(),
            "config": _jsonable(asdict(cfg)), "final": log.rows[-1] if log.rows else {}, "params": _count(model),
            "val": {"images": cfg.eval_images, "retrieval_accuracy_64": evaluator.retrieval_accuracy(images, caps, 64),
                    "clip_score": float(evaluator.clip_score(images, caps).mean())}}
    save_file(evaluator.state_dict_fp16(), str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({"clip": EVALUATOR_CONFIG, "features": "encode_image(normalize=False)",
                                             "preprocess": "x / 127.5 - 1"}, indent=2) + "\n")
    (folder / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    save_grid_png([("val 0-11", images[:12].cpu())], folder / "samples.png")
    (folder / "README.md").write_text(evaluator_card(info, log.rows, caps[:12]))
    return info


def evaluator_card(info: dict[str, Any], rows: Sequence[dict[str, float]], caps: Sequence[str]) -> str:
    """The evaluator's model card."""
    from ..eval.tiny_evaluator import EVALUATOR_CONFIG

    cfg, val = info["config"], info["val"]
    captions = "\n".join(f"{i}. {c}" for i, c in enumerate(caps))
    return f"""# tiny shapes-world evaluator (a small CLIP)

open_clip `CLIP` built from a custom config ({info['params'] / 1e6:.2f} M parameters, stored fp16):

```json
{json.dumps(EVALUATOR_CONFIG, indent=2)}
```

- **Role**: the metric model of the `tiny` protocol. FID features = the unnormalised projected
  image embedding (`encode_image(normalize=False)`, {EVALUATOR_CONFIG['embed_dim']}-d); CLIP score =
  100·max(cos, 0); retrieval accuracy = how often an image's own caption scores best among the
  64 captions of its batch (a hit when the best caption's text equals the true one).
- **Input**: uint8 (N, 3, 32, 32), scaled to x / 127.5 − 1. Tokenizer: open_clip `SimpleTokenizer`,
  context {EVALUATOR_CONFIG['text_cfg']['context_length']}.
- **Data**: shapes-world renders of the train split (indices {cfg['data_offset']} onward,
  {info['steps'] * cfg['batch_size']:,} pairs seen); symmetric InfoNCE where pairs with identical
  captions are all positives.
- **Training**: {info['steps']:,} steps of batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (cosine), bf16 autocast,
  {info['minutes']:.1f} min on {info['machine']}. Final loss {info['final'].get('loss', float('nan')):.4f}.
- **Validation** ({val['images']} val-split renders): retrieval accuracy (batches of 64)
  **{val['retrieval_accuracy_64']:.4f}**, CLIP score {val['clip_score']:.2f}.

Reproduce: `{info['command']}`; all options are in `train_info.json`.

## Loss

{loss_table(rows, ["loss", "logit_scale"])}

## `samples.png`: val renders 0–11

{captions}
"""


# --- the world report ------------------------------------------------------------------------
def _metrics(
    evaluator: Any, reference: Any, images: torch.Tensor, captions: Sequence[str]
) -> dict[str, float]:
    """FID against the reference statistics, mean CLIP score, retrieval accuracy."""
    from ..eval.fid import FeatureStats, fid_from_stats

    stats = FeatureStats()
    stats.update(evaluator.image_features(images))
    return {
        "fid": fid_from_stats(stats, reference),
        "clip_score": float(evaluator.clip_score(images, captions).mean()),
        "retrieval_accuracy": evaluator.retrieval_accuracy(images, captions, batch=64),
    }


def _generate_all(
    world: TinyWorld, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float, batch: int
) -> torch.Tensor:
    """Teacher images for all prompts with DDIM trailing."""
    from ..generate import generate_batch
    from ..sampling import DDIM_TRAILING

    out = [generate_batch(world, prompts[i : i + batch], seeds[i : i + batch], DDIM_TRAILING, steps, guidance)
           for i in range(0, len(prompts), batch)]
    return torch.cat(out)


def world_report(cfg: ReportConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the teacher at each step count against real renders; write world.md/json + grid."""
    from ..eval.fid import FeatureStats
    from ..eval.tiny_evaluator import load_tiny_evaluator
    from ..worlds.tiny import load_tiny_world

    n, n_ref = cfg.num_generated, cfg.num_reference
    if n < 2 or n + n_ref > len(shapes.SPLITS["eval"]):
        raise UserError(f"--num-generated + --num-reference must fit the eval split ({len(shapes.SPLITS['eval'])})")
    device = resolve_device(cfg.device)
    world = load_tiny_world(device, cfg.teacher)
    evaluator = load_tiny_evaluator(device, cfg.evaluator)
    guidance = world.default_guidance if cfg.guidance is None else cfg.guidance

    # reference statistics: eval renders [n, n + n_ref), disjoint from the prompts' own renders
    reference = FeatureStats()
    for i in range(0, n_ref, 8192):
        reference.update(evaluator.image_features(shapes.render_images(shapes.split_indices("eval", min(8192, n_ref - i), n + i), device)))
    real, prompts = shapes.render(shapes.split_indices("eval", n), device)
    real = real.cpu()
    seeds = [cfg.seed + i for i in range(n)]
    rows = [{"model": "real renders", "steps": None, "guidance": None, **_metrics(evaluator, reference, real, prompts)}]
    progress(f"real: {rows[0]}")
    grid = [("real", real[: cfg.grid_columns])]
    for steps in cfg.steps:
        t0 = time.perf_counter()
        images = _generate_all(world, prompts, seeds, steps, guidance, cfg.batch_size)
        seconds = time.perf_counter() - t0
        rows.append({"model": "teacher", "steps": steps, "guidance": guidance, **_metrics(evaluator, reference, images, prompts),
                     "seconds": round(seconds, 2)})
        progress(f"{steps} steps: {rows[-1]}")
        grid.append((f"{steps} step{'s' if steps > 1 else ''}", images[: cfg.grid_columns]))
    sweep = []
    for w in cfg.guidance_sweep:
        for steps in cfg.sweep_steps:
            images = _generate_all(world, prompts, seeds, steps, w, cfg.batch_size)
            sweep.append({"steps": steps, "guidance": w, **_metrics(evaluator, reference, images, prompts)})
            progress(f"sweep: {sweep[-1]}")

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": cfg.command(), "machine": machine(), "guidance": guidance, "num_generated": n,
              "num_reference": n_ref, "seed": cfg.seed, "world": world.describe(), "weights": _weight_hashes(cfg),
              "rows": rows, "sweep": sweep, "grid_captions": list(prompts[: cfg.grid_columns])}
    save_grid_png(grid, out / "world_grid.png")
    (out / "world.json").write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    (out / "world.md").write_text(report_markdown(result))
    return result


def _weight_hashes(cfg: ReportConfig) -> dict[str, str]:
    """sha256 of the teacher's and the evaluator's weight files (provenance of the numbers)."""
    from ..eval.tiny_evaluator import WEIGHTS, default_evaluator_dir
    from ..files import sha256_file
    from ..worlds.tiny import default_teacher_dir

    teacher = Path(cfg.teacher) if cfg.teacher else default_teacher_dir()
    evaluator = Path(cfg.evaluator) if cfg.evaluator else default_evaluator_dir()
    files = {"teacher/unet": teacher / "unet" / "diffusion_pytorch_model.safetensors",
             "teacher/text_encoder": teacher / "text_encoder" / "model.safetensors",
             "evaluator": evaluator / WEIGHTS}
    return {k: sha256_file(p) for k, p in files.items() if p.is_file()}


def report_markdown(result: dict[str, Any]) -> str:
    """world.md from the report's JSON."""
    table = ["| model | DDIM steps | guidance | FID ↓ | CLIP score ↑ | retrieval acc. (64) ↑ | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        steps = "–" if r["steps"] is None else r["steps"]
        g = "–" if r["guidance"] is None else f"{r['guidance']:g}"
        secs = r.get("seconds", "–")
        table.append(f"| {r['model']} | {steps} | {g} | {r['fid']:.3f} | {r['clip_score']:.2f} | "
                     f"{r['retrieval_accuracy']:.4f} | {secs} |")
    sweep = ""
    if result["sweep"]:
        lines = ["| guidance | DDIM steps | FID ↓ | CLIP score ↑ | retrieval acc. (64) ↑ |", "|---|---|---|---|---|"]
        lines += [f"| {s['guidance']:g} | {s['steps']} | {s['fid']:.3f} | {s['clip_score']:.2f} | "
                  f"{s['retrieval_accuracy']:.4f} |" for s in result["sweep"]]
        sweep = "## Guidance sweep\n\n" + "\n".join(lines) + "\n"
    captions = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(result["grid_captions"]))
    n, n_ref = result["num_generated"], result["num_reference"]
    return f"""# The tiny shapes world: teacher vs real renders

Command: `{result['command']}`
Machine: {result['machine']}

Protocol: {n} captions = eval-split indices 0..{n - 1}, image i generated with seed {result['seed']} + i
(DDIM, `timestep_spacing="trailing"`, `clip_sample=False`, `set_alpha_to_one=False`, classifier-free
guidance {result['guidance']:g}). FID: tiny-evaluator features (unnormalised projected image embedding,
128-d) of the {n} images against {n_ref} real renders of eval indices {n}..{n + n_ref - 1}. CLIP score:
mean of 100·max(cos, 0) with the tiny evaluator. Retrieval accuracy: the image's own caption scores best
among the 64 captions of its batch. "real renders" are the renders of the same {n} captions: the ceiling
(its FID is the sampling floor at this sample size).

{chr(10).join(table)}

{sweep}
## Samples (`world_grid.png`): rows = real renders, then the teacher at each step count (same seeds)

![grid](world_grid.png)

Columns, left to right:

{captions}
"""
