"""The precision policy in one place (docs/design.md §8): dtype names, TF32 switches, compute precisions.

Frozen weights run in half precision inside the world adapters, LoRA weights and losses in
fp32, metric maths in float64. Two protocol fields name the precision of the networks that
produce a score (eval/protocols.py): `vae_precision` (the SDXL VAE decode) and
`feature_precision` (the FID and CLIP networks), each one of COMPUTE_PRECISIONS:

- "fp32": fp32 tensors, TF32 off for matmuls and convolutions (true fp32);
- "tf32": fp32 tensors, TF32 matmuls and convolutions (10-bit mantissa products, fp32 sums); on a GPU the
  compiled VAE decode runs its convolutions' products on fp16 tensor cores, inputs and weights scaled by powers of
  two, the same 10 bits with fp32 sums and the output rounded to fp16's (worlds/halfconv.py: within one level of
  fp32 as TF32 is);
- "bf16": bf16 weights and activations (the VAE: a bf16 copy; the feature networks: autocast).

PyTorch's own default is neither "fp32" nor "tf32": TF32 convolutions with fp32 matmuls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPUTE_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on or off for the duration, then as they were."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def no_tf32() -> contextlib.AbstractContextManager[None]:
    """Metric maths in true fp32: TF32 matmuls and convolutions off for the duration."""
    return tf32(False)


@contextlib.contextmanager
def compute(precision: str, device: torch.device | str = "cuda") -> Iterator[None]:
    """Run the block's network calls in `precision` (fp32 tensors in, whatever the network returns out)."""
    if precision not in COMPUTE_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(COMPUTE_PRECISIONS)}")
    device_type = torch.device(device).type
    if precision == "bf16" and device_type == "cuda":
        with tf32(False), torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:  # the CPU has no TF32: "tf32" and "bf16" run as fp32 there (the tiny protocol is fp32)
        with tf32(precision == "tf32"):
            yield
