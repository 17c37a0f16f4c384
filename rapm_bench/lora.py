"""LoRA files: read safely, convert to diffusers keys, attach to a UNet, fuse, remove."""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import UserError

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def resolve_lora_path(path: Path) -> Path:
    """A LoRA file, or a folder holding exactly one (diffusers' `pytorch_lora_weights.safetensors`).

    A folder holding one .safetensors file beside pickles (.bin, .pt) gives the .safetensors one.

    Like diffusers' `load_lora_weights(DIR)`, files named *checkpoint*, *optimizer* or
    *scheduler* are not LoRA weights (a `rapm-bench distill` run folder holds one).
    """
    path = Path(path)
    if path.is_dir():
        preferred = path / "pytorch_lora_weights.safetensors"
        if preferred.is_file():
            return preferred
        files = sorted(p for p in path.iterdir() if p.suffix in LORA_SUFFIXES
                       and not any(s in p.name for s in ("checkpoint", "optimizer", "scheduler")))
        safe = [p for p in files if p.suffix == ".safetensors"]
        if len(files) > 1 and len(safe) == 1:  # the same weights as .safetensors and a pickle: no pickle
            return safe[0]
        if len(files) != 1:
            raise UserError(f"LoRA folder {path} must hold exactly one weights file, found {len(files)}")
        return files[0]
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    if path.suffix not in LORA_SUFFIXES:
        raise UserError(f"LoRA file {path} has an unknown suffix; expected one of {', '.join(LORA_SUFFIXES)}")
    return path


def _unpickler_reason(e: Exception) -> str:
    """The one informative line of torch's multi-line weights-only refusal."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else "unsupported content")
    return lines[0] if lines else type(e).__name__


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file; pickles are read with `weights_only=True` only."""
    path = resolve_lora_path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch warns about pickle protocols it reads anyway
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refused to load {path}: it is a pickle that holds more than tensors "
                        f"({_unpickler_reason(e)}), and loading it could run code; use a .safetensors file, "
                        "or convert this one only if you trust its source") from None
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise UserError(f"cannot read LoRA file {path}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"LoRA file {path} does not hold a flat dict of tensors")
    return state


def to_diffusers_unet_lora(
    state: dict[str, torch.Tensor], unet_config: object
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """Convert kohya/A1111 keys to diffusers keys (via diffusers itself); returns (state, alphas)."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    converted, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(state), unet_config=unet_config)
    return converted, alphas


def unet_lora_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet part of a diffusers-keyed LoRA (`to_diffusers_unet_lora`), PEFT keys, `unet.` prefix removed."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if unet and "lora_A" not in next(iter(unet)):  # old attention-processor keys: diffusers converts them so
        unet = convert_unet_state_dict_to_peft(unet)
    return unet


def check_lora_fits(unet: torch.nn.Module, state: dict[str, torch.Tensor], path: Path,
                    teacher: str = "this teacher") -> None:
    """Refuse, in one line, a LoRA whose modules or shapes are not the UNet's (e.g. one for another base model).

    `state` has diffusers keys (`to_diffusers_unet_lora`). Checked before anything is attached,
    so a refused LoRA leaves the UNet untouched.
    """
    tensors = {k: v for k, v in unet_lora_tensors(state).items() if ".lora_A." in k or ".lora_B." in k}
    if not tensors:
        example = next(iter(state), "none")
        raise UserError(f"{path} holds no UNet LoRA weights (expected keys like unet.<module>.lora_A.weight or "
                        f"lora_unet_<module>.lora_down.weight, found e.g. {example!r})")
    modules = dict(unet.named_modules())
    missing: list[str] = []
    wrong: list[str] = []
    bad: set[str] = set()  # modules with a missing or misshapen tensor
    for key, value in tensors.items():
        name, kind = key.split(".lora_", 1)
        module = modules.get(name)
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if not isinstance(weight, torch.Tensor):
            missing.append(name)
            bad.add(name)
            continue
        if kind.startswith("A."):
            fits = value.ndim == weight.ndim and value.shape[1] == weight.shape[1] and value.shape[2:] == weight.shape[2:]
        else:
            fits = value.ndim == weight.ndim and value.shape[0] == weight.shape[0]
        if not fits:
            wrong.append(f"{key} is {list(value.shape)} for a {list(weight.shape)} weight")
            bad.add(name)
    if not missing and not wrong:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(tensors)} tensors are for modules it does not have (e.g. {missing[0]})")
    if wrong:
        parts.append(f"{len(wrong)} of {len(tensors)} tensors have other shapes (e.g. {wrong[0]})")
    named = {k.split(".lora_", 1)[0] for k in tensors}
    why = "it was made for another base model" if len(bad) == len(named) else "its keys or shapes do not match"
    raise UserError(f"LoRA {path} does not fit {teacher}'s UNet: {'; '.join(parts)}; {why}: pass a LoRA trained "
                    "for this teacher (`rapm-bench distill`), or the --preset/--teacher it was trained for")


@contextlib.contextmanager
def quiet_peft_loader() -> Iterator[None]:
    """Silence diffusers' own multi-line 'Loading ... was unsuccessful' log: the UserError says it in one line."""
    import logging

    logger = logging.getLogger("diffusers.loaders.peft")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_unet_lora(unet: torch.nn.Module, path: Path, adapter_name: str = "default") -> None:
    """Attach a LoRA file to a bare diffusers UNet (worlds without a diffusers pipeline)."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    state, alphas = to_diffusers_unet_lora(read_lora_file(path), unet.config)
    check_lora_fits(unet, state, path)
    try:
        with quiet_peft_loader():
            StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(state, alphas, unet=unet, adapter_name=adapter_name)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"LoRA {path} does not fit this teacher's UNet: {str(e).splitlines()[0]}") from None


# --- training: attach a trainable LoRA, save it (diffusers or kohya keys) ------------------------
LORA_TARGETS: tuple[str, ...] = (
    # attention (self and cross): queries, keys, values, output projection
    "to_q", "to_k", "to_v", "to_out.0",
    # transformer in/out projections and the feed-forward (GEGLU in, linear out)
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    # resnet convolutions, shortcuts and their time-embedding projections
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
    # down/upsampler convolutions
    "downsamplers.0.conv", "upsamplers.0.conv",
    # the timestep embedding MLP
    "time_embedding.linear_1", "time_embedding.linear_2",
)
"""Module-name suffixes the LoRA wraps (PEFT `target_modules`): 3.08 M params at rank 1 on SDXL."""

LORA_FORMATS = ("diffusers", "kohya")


def attach_lora(
    unet: torch.nn.Module, rank: int = 1, targets: tuple[str, ...] = LORA_TARGETS,
    adapter_name: str = "rapm", seed: int = 0,
) -> list[torch.nn.Parameter]:
    """Add a trainable PEFT LoRA (alpha = rank, B = 0) to a frozen UNet; returns its fp32 parameters.

    Precision policy (docs/design.md §8): the frozen weights keep the world's dtype, the LoRA
    weights are fp32. `seed` fixes the random init of the A matrices.
    """
    from peft import LoraConfig

    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    names = [n for n, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if len(missing) == len(targets):
        raise UserError(f"none of the LoRA targets {list(targets)} is a module of this UNet")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                        target_modules=[t for t in targets if t not in missing])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=adapter_name)
    unet.set_adapter(adapter_name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter_name}." in f"{n}."]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet: torch.nn.Module, adapter_name: str = "rapm") -> dict[str, torch.Tensor]:
    """The adapter's weights with PEFT keys (`down_blocks.0...to_q.lora_A.weight`), fp32, on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def load_lora_state(unet: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "rapm") -> None:
    """Copy PEFT-keyed weights (from `lora_state_dict`) into an attached adapter, exactly."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"LoRA checkpoint does not fit this UNet ({len(unexpected)} unexpected keys, "
                        f"e.g. {unexpected[0]})")


def kohya_state_dict(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """PEFT keys -> kohya/A1111 keys (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`).

    Module paths keep diffusers' names with `.` -> `_` (what ComfyUI, A1111 and diffusers'
    own kohya converter read); `alpha` = rank, so the scale is 1 as in the PEFT adapter.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        if kind == "A.weight":
            out[f"{name}.lora_down.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(rank))
        elif kind == "B.weight":
            out[f"{name}.lora_up.weight"] = value
        else:
            raise ValueError(f"unexpected LoRA key {key}")
    return out


def save_lora(
    path: Path, state: dict[str, torch.Tensor], rank: int, fmt: str = "diffusers", dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write PEFT-keyed LoRA weights as one safetensors file, atomically.

    `diffusers`: `unet.<module>.lora_A.weight` keys, what `pipeline.load_lora_weights(DIR,
    weight_name=...)` and `rapm-bench generate --lora` read. `kohya`: `lora_unet_...` keys.
    `metadata`: extra safetensors header strings (a distilled LoRA's `models.trained_record`).
    """
    from safetensors.torch import save

    from .files import atomic_write_bytes

    if fmt not in LORA_FORMATS:
        raise UserError(f"unknown LoRA format {fmt!r}; use one of {', '.join(LORA_FORMATS)}")
    tensors = {f"unet.{k}": v for k, v in state.items()} if fmt == "diffusers" else kohya_state_dict(state, rank)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    atomic_write_bytes(Path(path), canonical_safetensors(save(tensors, metadata={"format": "pt", **(metadata or {})})))
    return Path(path)


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted, so that equal tensors and metadata give equal
    bytes (safetensors writes metadata in a hash map's order, which differs between processes)."""
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)  # the 8-byte alignment safetensors keeps
    return struct.pack("<Q", len(text)) + text + data[8 + n :]
