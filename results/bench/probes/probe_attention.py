"""Probe (issue 14): where the UNet's and the VAE's attention and the UNet's GEGLU could go faster.

    OUT=results/bench/probes python results/bench/probes/probe_attention.py   # a CUDA GPU; ~3 min

1. The VAE decode's attention (one 512-wide head over 16,384 tokens at 1024 px, batch 16): today's TF32
   `gemm_attention`, its score scale folded into the product, and both products on fp16 tensor cores with
   power-of-two scales (TF32's 10 mantissa bits, fp32 sums), the softmax eager or compiled; error against float64.
2. The UNet's attention shapes at batch 16 (bf16, head width 64) under each SDPA backend.
3. The UNet's feed-forward (GEGLU then the down projection) compiled as diffusers writes it, and with the GEGLU's
   projection split in two under max-autotune (so the gelu·mul can fuse into a Triton matmul's epilogue).
4. The compiled TF32 decode at batch 16 with `VAEDecoder.half_attention` off and on (worlds/attention.py): ms an
   image and the uint8 difference to the fp32 decode.
Writes $OUT/probe_attention.json. DECODE=0 skips part 4, FF=0 part 3.
"""

import json
import os
import time

import torch
import torch.nn.functional as F
from probe_common import cuda_ms

from rapm_bench.worlds.attention import gemm_attention
from rapm_bench.worlds.halfconv import power_of_two_at_least

out = os.environ.get("OUT", "/tmp")
res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
SOFTMAX_SCALE = 2.0**15


def save() -> None:
    with open(os.path.join(out, "probe_attention.json"), "w") as f:
        json.dump(res, f, indent=1)


def log(key: str, value) -> None:
    res[key] = value
    print(key, value, flush=True)
    save()


# --- 1. the VAE's attention -------------------------------------------------------------------------------------
def tf32_alpha(q, k, v, max_scores=2**26):
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))
    kt = k3.transpose(1, 2)
    out = torch.empty_like(q3)
    rows = max(1, max_scores // (b * h * n))
    for i in range(0, n, rows):
        s = torch.baddbmm(torch.zeros(1, 1, 1, device=q.device), q3[:, i : i + rows], kt, beta=0, alpha=d**-0.5)
        out[:, i : i + rows] = torch.bmm(torch.softmax(s, -1), v3)
    return out.view(b, h, n, d)


def _softmax_half_eager(s, c):
    return (torch.softmax(s.mul_(c), -1) * SOFTMAX_SCALE).half()


_softmax_half_compiled = torch.compile(lambda s, c: (torch.softmax(s * c, -1) * SOFTMAX_SCALE).half(), dynamic=False)


def half_attention(q, k, v, softmax, max_scores=2**26):
    b, h, n, d = q.shape
    m = b * h
    halves, scales = [], []
    for t in (q, k, v):
        t3 = t.reshape(m, n, d)
        lo, hi = torch.aminmax(t3.reshape(m, 64, -1), dim=-1)
        s = power_of_two_at_least(torch.maximum(hi.amax(-1), -lo.amin(-1))).view(m, 1, 1)
        halves.append((t3 / s).half())
        scales.append(s)
    q16, k16, v16 = halves
    c = scales[0] * scales[1] * d**-0.5
    kt = k16.transpose(1, 2)
    out = torch.empty(m, n, d, device=q.device)
    rows = max(1, max_scores // (m * n))
    for i in range(0, n, rows):
        s = torch.bmm(q16[:, i : i + rows], kt, out_dtype=torch.float32)
        out[:, i : i + rows] = torch.bmm(softmax(s, c), v16, out_dtype=torch.float32)
    return out.mul_(scales[2] / SOFTMAX_SCALE).view(b, h, n, d)


variants = {
    "tf32 (today)": lambda q, k, v: gemm_attention(q, k, v),
    "tf32, scale in the product": tf32_alpha,
    "fp16 products, eager softmax": lambda q, k, v: half_attention(q, k, v, _softmax_half_eager),
    "fp16 products, compiled softmax": lambda q, k, v: half_attention(q, k, v, _softmax_half_compiled),
}
torch.backends.cuda.matmul.allow_tf32 = True
for sigma in (1.0, 2.0):
    q1, k1, v1 = (torch.randn(1, 1, 16384, 512, device=dev, generator=g) * s for s in (sigma, sigma, 1.0))
    ref = F.scaled_dot_product_attention(q1.double(), k1.double(), v1.double())
    for name, fn in variants.items():
        err = (fn(q1, k1, v1).double() - ref).abs()
        log(f"vae attention error vs float64, scores std {sigma**2:g}: {name}",
            {"max": float(err.max()), "mean": float(err.mean())})
    del ref


def time_vae_attention() -> None:
    q, k, v = (torch.randn(16, 1, 16384, 512, device=dev, generator=g) for _ in range(3))
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn(q, k, v)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ms = cuda_ms(lambda fn=fn: fn(q, k, v), warm=2, n=5) / 16
        log(f"vae attention batch 16 ms an image: {name}", {"ms": round(ms, 3), "first_call_s": round(first, 2)})


time_vae_attention()
torch.backends.cuda.matmul.allow_tf32 = False

# --- 2. the UNet's attention under each SDPA backend --------------------------------------------------------------
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

shapes = {  # name: (heads, query tokens, key tokens, calls per UNet pass)
    "self 64x64": (10, 4096, 4096, 10), "self 32x32": (20, 1024, 1024, 60),
    "cross 64x64": (10, 4096, 77, 10), "cross 32x32": (20, 1024, 77, 60),
}


def time_sdpa(heads: int, nq: int, nk: int, calls: int) -> dict:
    qa = torch.randn(16, heads, nq, 64, device=dev, dtype=torch.bfloat16, generator=g)
    ka, va = (torch.randn(16, heads, nk, 64, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    row: dict = {"calls_per_pass": calls}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                row[backend.name] = round(cuda_ms(lambda: F.scaled_dot_product_attention(qa, ka, va)), 4)
        except RuntimeError as e:
            row[backend.name] = f"unavailable: {str(e).splitlines()[0][:80]}"
    row["default"] = round(cuda_ms(lambda: F.scaled_dot_product_attention(qa, ka, va)), 4)
    return row


for name, shape in shapes.items():
    log(f"unet sdpa batch 16 ms a call: {name}", time_sdpa(*shape))

# --- 4. the decode, half attention off and on (before 3: max-autotune may run long) ----------------------------
if os.environ.get("DECODE", "1") == "1":
    from probe_common import time_decodes

    torch._dynamo.reset()
    time_decodes(res, "half_attention", "16", rounds=2, n=5)
    save()


# --- 3. the UNet's feed-forward ---------------------------------------------------------------------------------


def time_ff(tokens: int, dim: int) -> dict:
    inner = 4 * dim
    x = torch.randn(16 * tokens, dim, device=dev, dtype=torch.bfloat16, generator=g)
    wp = torch.randn(2 * inner, dim, device=dev, dtype=torch.bfloat16, generator=g) * dim**-0.5
    bp = torch.randn(2 * inner, device=dev, dtype=torch.bfloat16, generator=g) * 0.1
    wo = torch.randn(dim, inner, device=dev, dtype=torch.bfloat16, generator=g) * inner**-0.5
    bo = torch.zeros(dim, device=dev, dtype=torch.bfloat16)
    wh, wg, bh, bg = (t.contiguous() for t in (*wp.chunk(2), *bp.chunk(2)))

    def ff(x):
        h, gate = F.linear(x, wp, bp).chunk(2, -1)
        return F.linear(h * F.gelu(gate), wo, bo)

    def ff_split(x):
        return F.linear(F.linear(x, wh, bh) * F.gelu(F.linear(x, wg, bg)), wo, bo)

    want = ff(x).float()
    rows = {}
    for name, fn, mode in (("diffusers' GEGLU, compiled", ff, "default"),
                           ("split projection, max-autotune", ff_split, "max-autotune-no-cudagraphs"),
                           ("diffusers' GEGLU, max-autotune", ff, "max-autotune-no-cudagraphs")):
        torch._dynamo.reset()
        t0 = time.perf_counter()
        try:
            c = torch.compile(fn, mode=mode, dynamic=False)
            got = c(x).float()
            torch.cuda.synchronize()
            rows[name] = {"compile_s": round(time.perf_counter() - t0, 1), "ms": round(cuda_ms(lambda c=c: c(x)), 4),
                          "max_rel_diff": float((got - want).abs().max() / want.abs().max())}
        except Exception as e:  # noqa: BLE001 (a probe: record what failed and go on)
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        print(name, rows[name], flush=True)
    return rows


for level, (tokens, dim) in {"32x32": (1024, 1280), "64x64": (4096, 640)}.items() if os.environ.get("FF", "1") == "1" \
        else ():
    log(f"unet ff batch 16 at {level}", time_ff(tokens, dim))

print("done", flush=True)
