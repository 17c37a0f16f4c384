"""FastLoRA: the engine's LoRA (PEFT's parameterisation) without PEFT's per-layer overhead (issue #7).

A frozen Linear/Conv2d with weight W gets y = base(x) + s·B·(A x): A (r, in[, k, k]) and
B (out, r) are fp32 masters (docs/design.md §8, precision policy), s = alpha / r = 1 as in `lora.attach_lora`.
Three ways of running a layer:

- no grad, `merge_nograd`: one kernel with W' = W + s·B·A, cached until the optimiser
  changes A or B (their version counters);
- grad, mode "unmerged": the base kernel plus the low-rank branch (A then B) in the
  activations' dtype, differentiated by autograd (PEFT casts the activations to fp32 instead);
- grad, mode "merged": one forward kernel with the same cached W', and a hand-written
  backward (`_MergedLinear`, `_MergedConv2d`) that sends g through W' to the input and
  computes the rank-r gradients of A and B directly; only x is saved (W', s·A and s·B ride
  on the autograd context: they live in the cache anyway).

The cache holds one copy of every target weight in the UNet's dtype (SDXL, bf16: 5.1 GB),
rebuilt in place once per optimiser step (in place, so that a CUDA graph captured with it stays valid:
`refresher` before a replay). The frozen weights of equal shape are packed into one tensor per shape
(`_Group`; SDXL's 790 target layers have 31 shapes), and so are their merged copies: at rank 1 the rebuild
of a group is one pointwise kernel over all its layers (read W, write W', the fp32 sum rounded once;
`merge_rank1`, compiled inside the rebuild's CUDA graph on a GPU) instead of a few kernels a layer. The
teacher (adapters disabled) runs W alone.

The trainable A and B of all layers live in one fp32 tensor (`_Master`; the optimiser and the clipping see that
one tensor), and their gradients in another: each layer's A and B are views of the first, their `.grad` views of
the second. A merged layer's backward adds its rank-r gradients into those views in place and hands autograd
nothing for A and B, so that a graphed backward ends in one gradient buffer instead of ~1,600 tensors for
autograd to accumulate one by one (issue 14: host time the GPU waited on).

The UNet looks like a PEFT model to the engine: `teacher_mode` calls `disable_adapters` /
`enable_adapters`, and `FastLoRA.state_dict` has `lora.lora_state_dict`'s keys and shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import UserError

MODES: tuple[str, ...] = ("unmerged", "merged")  # the gradient path of a LoRA layer

_aten = torch.ops.aten

COMPILE_REBUILD = True  # on CUDA: the rebuild graph's kernels compiled (`merge_rank1`, `merge_into`; tests turn it off)
TRITON_REBUILD = False  # on CUDA with Triton: a packed group's rank-1 rebuild by kernels.merge_rank1_triton (one pass);
#                        off: the iteration was no faster than with the compiled merge (H100, results/bench/README.md)
_compiled: dict[Callable[..., None], Any] = {}  # a merge function -> its torch.compile, or None after a failure
_RECOMPILE_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def merge_into(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, out_w: torch.Tensor,
               out_a: torch.Tensor, out_b: torch.Tensor) -> None:
    """out_w = W + s·B·A, summed in fp32 and rounded once to out_w's dtype; out_a = s·A, out_b = s·B.

    The same maths as `LoRAWrap._merged` (addmm over the rank), written as a broadcast so that inductor fuses it
    into one kernel: SDXL's 2.6 G weights are read and written once (4 bytes a weight in bf16) instead of
    through fp32 temporaries (20 bytes a weight).
    """
    o, r = b.shape[0], b.shape[1]
    delta = (b.reshape(o, r, 1).float() * a.reshape(1, r, -1).float()).sum(1)
    out_w.copy_((w.reshape(o, -1).float() + s * delta).view(out_w.shape))
    out_a.copy_(a * s)
    out_b.copy_(b * s)


def merge_rank1(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, out_w: torch.Tensor,
                out_a: torch.Tensor, out_b: torch.Tensor) -> None:
    """A packed group at rank 1: out_w = W + s·(b ⊗ a) for W (G, out, K), b (G, out, 1), a (G, 1, K), summed in
    fp32 and rounded once; out_a = s·a, out_b = s·b.

    Pointwise (no sum over the rank), so that inductor makes it one kernel that reads W and writes W' (4 bytes a
    weight in bf16); aten's addcmul of these mixed dtypes and broadcasts runs ~9x the copy time (perf.rebuild).
    """
    out_w.copy_(w.float() + s * (b.float() * a.float()))
    out_a.copy_(a * s)
    out_b.copy_(b * s)


_STATIC: tuple[Callable[..., None], ...] = (merge_rank1,)  # compiled for each shape (no dynamic sizes)


def run_compiled(fn: Callable[..., None], *args: Any) -> bool:
    """`fn(*args)` through torch.compile (one graph; inductor's on-disk cache keeps it across runs); False when it
    cannot be compiled here (a warning, once): the caller then runs its eager kernels.

    `merge_rank1` compiles once per group shape (SDXL: 31): constant sizes let inductor index W without dynamic
    divisions, 5.9 ms for SDXL's rebuild on an H200 against 13.7 ms with dynamic sizes (2.4 ms is the copy).
    `merge_into` (per layer, ~900 shapes) keeps dynamic sizes."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=fn not in _STATIC, fullgraph=True)
    compiled = _compiled[fn]
    if compiled is None:
        return False
    try:
        # one graph per layer kind, dtype and layout (dynamic sizes; dynamo guards on equal sizes too):
        # more than dynamo's default of 8 graphs for one function in a large UNet
        with torch._dynamo.config.patch(**{_RECOMPILE_LIMIT: 64}):
            compiled(*args)
        return True
    except Exception as e:  # inductor's errors have no common base class
        import warnings

        warnings.warn(f"compiled LoRA rebuild failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "rebuilding eagerly", stacklevel=3)
        _compiled[fn] = None
        return False


_capturing = 0  # > 0 inside `capturing()`: torch.autograd.grad through a merged layer writes into the LoRA grads


class _Master:
    """The trainable weights of a FastLoRA as one fp32 Parameter (`param`) and their gradient as one tensor (`grad`);
    every layer's A and B are views of `param`'s storage, their `.grad` views of `grad`."""

    def __init__(self, layers: list[LoRAWrap]) -> None:
        params = [w._parameters[k] for w in layers for k in ("lora_A", "lora_B")]
        device = params[0].device
        self.slots: list[tuple[int, torch.Size, tuple[int, ...]]] = []  # (offset, shape, strides) per tensor
        off = 0
        for p in params:
            self.slots.append((off, p.shape, p.stride()))
            off += p.numel()
        self.param = nn.Parameter(torch.empty(off, device=device, dtype=params[0].dtype))
        self.grad = torch.zeros_like(self.param)
        with torch.no_grad():
            for p, (o, shape, stride) in zip(params, self.slots, strict=True):
                view = self.param.data[o:o + p.numel()].as_strided(shape, stride)
                view.copy_(p.detach())
                p.data = view
                p.grad = self.grad[o:o + p.numel()].as_strided(shape, stride)
        self.param.grad = self.grad
        # a 0-d leaf every merged layer takes as an input and returns a zero gradient for: a captured backward's
        # inputs are this token, never the ~1,600 A and B (torch 2.11's graph capture fails on a leaf input whose
        # gradient is undefined, which A's and B's are once written in place)
        self.token = nn.Parameter(torch.zeros((), device=device))
        self.zero = torch.zeros((), device=device)
        self.params, self.layers = params, layers
        self.views = [p.grad for p in params]
        for w in layers:
            w._master = self
            w._grad_views = (w.lora_A.grad, w.lora_B.grad)

    def ensure(self) -> None:
        """Make `grad` the Parameter's gradient again after an optimiser's zero_grad(set_to_none=True) (then it
        starts from zero) or an assignment (its values are taken)."""
        g = self.param.grad
        if g is not self.grad:
            with torch.no_grad():
                if g is None:
                    self.grad.zero_()
                else:
                    self.grad.copy_(g)
            self.param.grad = self.grad

    def ensure_all(self) -> None:
        """`ensure`, and every layer's `.grad` its view again (zeroed where a zero_grad set it to None): before a
        graphed gradient pass, whose backward writes the views whatever `.grad` holds."""
        self.ensure()
        for p, view in zip(self.params, self.views, strict=True):
            attach(p, view)

    def surface(self) -> list[nn.Parameter]:
        """What a captured backward differentiates into: the token, and A and B of every layer off the merged path
        (autograd's own gradients: a layer the merged backward does not handle)."""
        off = [p for w in self.layers if not (w.mode == "merged" and w._mergeable) for p in (w.lora_A, w.lora_B)]
        return [self.token, *off]

    def to_flat_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """An optimiser state over the per-layer A, B (A then B per layer: older checkpoints) as one over `param`."""
        ids = [i for group in state["param_groups"] for i in group["params"]]
        if len(ids) == 1:
            return state
        if len(ids) != len(self.slots) or len(state["param_groups"]) != 1:
            raise UserError(f"the optimiser state holds {len(ids)} LoRA tensors, this LoRA {len(self.slots)}")
        per = state["state"]
        flat: dict[str, torch.Tensor] = {}
        for field in (per.get(ids[0]) or {}):
            values = [per[i][field] for i in ids]
            if values[0].ndim == 0:  # the step count, one for all
                flat[field] = values[0].clone()
                continue
            buf = torch.zeros(self.param.shape, dtype=values[0].dtype)
            for v, (o, shape, stride) in zip(values, self.slots, strict=True):
                buf[o:o + v.numel()].as_strided(shape, stride).copy_(v.reshape(shape))
            flat[field] = buf
        return {"state": {0: flat} if flat else {}, "param_groups": [{**state["param_groups"][0], "params": [0]}]}


@torch.no_grad()
def attach(p: torch.Tensor, view: torch.Tensor) -> None:
    """`p.grad` is `view` again: zeroed where a zero_grad set it to None, a `.grad` assigned elsewhere copied in."""
    g = p.grad
    if g is not view:
        view.zero_() if g is None else view.copy_(g)
        p.grad = view


def _sink(layer: LoRAWrap, ctx: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gradient views a merged layer's backward (`ctx`, whose input 2 is A) adds A's and B's gradients into, or
    None: return them to autograd (a layer outside a `_Master`, its `.grad` replaced, or torch.autograd.grad outside a
    capture, which returns them)."""
    views = layer._grad_views
    if views is None or layer.lora_A.grad is not views[0] or layer.lora_B.grad is not views[1]:
        return None
    if _capturing:  # a graph's capture differentiates into the token only: A and B are written here
        return views
    node = ctx.next_functions[2][0]  # A's AccumulateGrad in this graph (never held: it keeps the stream it was made on)
    if node is None:
        return None
    try:
        wanted = torch._C._will_engine_execute_node(node)
    except RuntimeError:  # inside torch.autograd.grad (a leaf cannot be asked about there): it returns them
        return None
    return views if wanted else None


def _token_grad(ctx: Any) -> torch.Tensor | None:
    """The `_Master.token`'s gradient from a merged layer: zero (it trains nothing), defined whenever it is asked for."""
    return ctx.layer._master.zero if ctx.needs_input_grad[-1] else None


def _into(sink: tuple[torch.Tensor, torch.Tensor] | None, i: int, grad: torch.Tensor,
          dtype: torch.dtype) -> torch.Tensor | None:
    """A's (i = 0) or B's (i = 1) gradient added into its view (then None for autograd), or as the master's dtype."""
    if sink is None:
        return grad.to(dtype)
    sink[i].add_(grad)  # fp32 += the activations' dtype: the same sum autograd's accumulation would make
    return None


class capturing:
    """Inside the block, torch.autograd.grad through merged layers writes the LoRA gradients into their views (a CUDA
    graph's capture, `cudagraphs.GradGraphed`); what the warm-up runs add is undone at the end."""

    def __init__(self, masters: Sequence[_Master]) -> None:
        self.masters = list(masters)
        self.saved: list[torch.Tensor] = []

    def __enter__(self) -> capturing:
        global _capturing
        for m in self.masters:
            m.ensure_all()
        self.saved = [m.grad.clone() for m in self.masters]
        _capturing += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global _capturing
        _capturing -= 1
        if self.masters and self.masters[0].grad.is_cuda:
            torch.cuda.synchronize()  # the warm-up ran on a side stream
        with torch.no_grad():
            for m, s in zip(self.masters, self.saved, strict=True):
                m.grad.copy_(s)


def masters(net: nn.Module) -> list[_Master]:
    """The `_Master`s of the FastLoRA layers in `net`."""
    found = {id(m._master): m._master for m in net.modules() if isinstance(m, LoRAWrap) and m._master is not None}
    return list(found.values())


def _pair(v: int | Sequence[int]) -> list[int]:
    """An int or a pair as a list of two ints (what aten's convolution ops take)."""
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


class _MergedLinear(torch.autograd.Function):
    """y = x·W'ᵀ + bias with W' = W + s·B·A; gradients to x, A and B (and bias if it wants one).

    With g = ∂L/∂y and x, g flattened to rows (M, in), (M, out):
      ∂L/∂x = g·W'
      ∂L/∂B = s·gᵀ·(x·Aᵀ) = gᵀ·u,   u = x·(sA)ᵀ   (M, r)
      ∂L/∂A = s·(g·B)ᵀ·x = vᵀ·x,    v = g·(sB)    (M, r)
    `cache` = (W', sA, sB) in x's dtype, held by the layer until the next optimiser step: it rides
    on ctx, so only x goes through save_for_backward (one saved-tensor hook under checkpointing).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor], layer: LoRAWrap,
                token: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.cache, ctx.master, ctx.layer = cache, (lora_a.dtype, lora_b.dtype), layer
        return F.linear(x, cache[0], bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        weight, a_s, b_s = ctx.cache
        need_x, need_bias, need_a, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = g @ weight  # ∂L/∂x = g·W'
        g2 = g.reshape(-1, g.shape[-1])  # (M, out)
        if need_bias:
            grad_bias = g2.sum(0)
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        sink = _sink(ctx.layer, ctx) if need_a or need_b else None
        if need_b:
            grad_b = g2.t() @ F.linear(x2, a_s)  # gᵀ·u, u = s·x·Aᵀ: (out, r)
            grad_b = _into(sink, 1, grad_b, ctx.master[1])
        if need_a:
            grad_a = (g2 @ b_s).t() @ x2  # vᵀ·x, v = s·g·B: (r, in)
            grad_a = _into(sink, 0, grad_a, ctx.master[0])
        return grad_x, grad_bias, grad_a, grad_b, None, None, _token_grad(ctx)


class _MergedConv2d(torch.autograd.Function):
    """y = conv2d(x, W') + bias with W' = W + s·B·A (groups 1); gradients to x, A and B.

    A is a conv (r, in, k, k) with the layer's stride/padding/dilation, B a 1×1 conv (out, r):
      ∂L/∂x = conv2d_input(g, W')                                (one convolution_backward)
      u = conv2d(x, sA)                                          (N, r, H', W')
      v = s·Σ_o g[:, o]·B[o, :], ∂L/∂B = s·Σ_{n,h,w} g ⊗ conv2d(x, A) = Σ_{n,h,w} g ⊗ u
        (the 1×1 conv's input and weight gradients, as two batched products over the pixels: a 1×1 conv
        through cuDNN copied g to NHWC first)
      ∂L/∂A = conv2d_weight(x, v) with the layer's stride/padding/dilation   (one convolution_backward)
    The two rank-r convolutions read one channels_last copy of x (cuDNN's bf16 kernels are NHWC: from an NCHW x
    each made its own). `cache` = (W', sA, sB) as in `_MergedLinear`; only x is saved.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                conv: tuple[list[int], list[int], list[int]], layer: LoRAWrap,
                token: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.cache, ctx.conv, ctx.master, ctx.layer = cache, conv, (lora_a.dtype, lora_b.dtype), layer
        return F.conv2d(x, cache[0], bias, *conv)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        weight, a_s, b_s = ctx.cache
        stride, padding, dilation = ctx.conv
        need_x, need_bias, need_a, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_bias = grad_a = grad_b = None
        if need_x or need_bias:  # ∂L/∂x = conv2d_input(g, W'); ∂L/∂bias = Σ_{n,h,w} g
            grad_x, _, grad_bias = _aten.convolution_backward(
                g, x, weight, [weight.shape[0]] if need_bias else None, stride, padding, dilation, False, [0, 0], 1,
                [need_x, False, need_bias])
        if need_a or need_b:
            n, o, h, w = g.shape
            r = a_s.shape[0]
            x_nhwc = x.contiguous(memory_format=torch.channels_last)  # read by both rank-r convolutions
            g_pix = g.reshape(n, o, h * w)  # (N, out, pixels)
            sink = _sink(ctx.layer, ctx)
            if need_b:  # ∂L/∂B = Σ_n g_n·u_nᵀ with u = conv2d(x, sA)
                u = F.conv2d(x_nhwc, a_s, None, stride, padding, dilation).reshape(n, r, h * w)
                grad_b = torch.bmm(g_pix, u.transpose(1, 2)).sum(0, dtype=torch.float32)  # each n rounded once
                grad_b = _into(sink, 1, grad_b, ctx.master[1])
            if need_a:  # v = (sB)ᵀ·g per pixel, then ∂L/∂A = conv2d_weight(x, v)
                v = torch.matmul(b_s.t(), g_pix).view(n, r, h, w)
                grad_a = _aten.convolution_backward(v, x_nhwc, a_s, None, stride, padding, dilation, False, [0, 0],
                                                    1, [False, True, False])[1]
                grad_a = _into(sink, 0, grad_a, ctx.master[0])
        return grad_x, grad_bias, grad_a, grad_b, None, None, None, _token_grad(ctx)


class LoRAWrap(nn.Module):
    """A frozen Linear/Conv2d plus s·B·A (PEFT's parameterisation: A (r, in[, k, k]), B (out, r)).

    Weights are fp32 masters (docs/design.md §8); the update runs in the activations' dtype
    (PEFT casts the activations to fp32 instead). Without grad and with `merge_nograd`, the
    layer runs W + s·B·A merged in one kernel; with grad and `mode == "merged"` too, with a
    hand-written backward. The merged weight (and s·A, s·B in the base weight's dtype) is
    cached until the optimiser changes A or B (their version counters).
    """

    def __init__(self, base: nn.Module, rank: int, scale: float, generator: torch.Generator,
                 mode: str = "unmerged") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown LoRA mode {mode!r}; use one of {', '.join(MODES)}")
        self.base = base
        self.scale = scale
        self.enabled = True
        self.merge_nograd = False
        self.mode = mode
        w = base.weight
        fan_in = w[0].numel()
        a = (torch.rand((rank, *w.shape[1:]), generator=generator) * 2 - 1) / math.sqrt(fan_in)  # kaiming_uniform(√5)
        if w.ndim == 4 and w.is_contiguous(memory_format=torch.channels_last):
            a = a.contiguous(memory_format=torch.channels_last)
        self.lora_A = nn.Parameter(a.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device))
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._cache_key: tuple[Any, ...] | None = None
        self._group: _Group | None = None  # set by `pack`: W, W', s·A and s·B live in the group's stacks
        self._slot = 0
        self._master: _Master | None = None  # set by `_Master`: A and B views of one fp32 tensor, their grads too
        self._grad_views: tuple[torch.Tensor, torch.Tensor] | None = None
        self._base_params = base._parameters  # the base's weight and bias, read without Module.__getattr__
        self._mergeable = self.mergeable
        self._is_conv = isinstance(base, nn.Conv2d)
        self._conv = ((_pair(base.stride), _pair(base.padding), _pair(base.dilation))
                      if isinstance(base, nn.Conv2d) and self._mergeable else None)

    @property
    def mergeable(self) -> bool:
        """Whether the merged gradient path handles this layer (Linear; Conv2d with groups 1, zero padding)."""
        base = self.base
        if isinstance(base, nn.Linear):
            return True
        return (isinstance(base, nn.Conv2d) and base.groups == 1 and base.padding_mode == "zeros"
                and not isinstance(base.padding, str))

    def _key(self) -> tuple[Any, ...]:
        # plain dict look-ups: nn.Module.__getattr__ costs ~0.3 µs a name, and this runs on every layer call
        p, w = self._parameters, self._base_params["weight"]
        a, b = p["lora_A"], p["lora_B"]
        m = self._master  # the optimiser steps its Parameter, whose version counter is not A's or B's
        return (a._version, b._version, w._version, a.data_ptr(), b.data_ptr(), w.data_ptr(), w.dtype,
                0 if m is None else m.param._version)

    def cached(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W + s·B·A, s·A, s·B) in the base weight's dtype; W' in its layout. Built in fp32 once per A/B update."""
        key = self._key()
        if self._cache is None or self._cache_key != key:
            self.attach_cache()
            if self.in_place():
                self.rebuild()
            else:
                merged, a_s, b_s = self._merged()
                w = self.base.weight
                w_merged = torch.empty_like(w).copy_(merged.view(w.shape))  # never W itself: w may be fp32
                self._cache = (w_merged, a_s, b_s)  # copies: never aliases of the masters the optimiser writes
            self._cache_key = key
        assert self._cache is not None
        return self._cache

    @torch.no_grad()
    def _merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W + s·B·A in fp32, flattened; s·A and s·B in W's dtype), from the current masters."""
        w = self.base.weight.detach()
        a, b = self.lora_A.detach(), self.lora_B.detach()
        s = self.scale
        merged = torch.addmm(w.reshape(w.shape[0], -1).float(), b.float(), a.reshape(a.shape[0], -1).float(),
                             alpha=s)  # W + s·B·A in fp32, rounded once to W's dtype by the copy
        a_s, b_s = ((t.to(w.dtype, copy=True) if s == 1 else (t * s).to(w.dtype)) for t in (a, b))
        return merged, a_s, b_s

    def attach_cache(self) -> None:
        """Without a cache, take this layer's views of its group's stacks as the cache (not yet computed)."""
        if self._cache is None and self._group is not None:
            self._cache, self._cache_key = self._group.views(self._slot), None

    def in_place(self) -> bool:
        """Whether the cache exists in W's dtype and shape (then `rebuild` refreshes it in place)."""
        w = self.base.weight
        return self._cache is not None and self._cache[0].dtype == w.dtype and self._cache[0].shape == w.shape

    @torch.no_grad()
    def rebuild(self, compiled: bool = False) -> None:
        """Recompute the cache into its own buffers (a CUDA graph captured with them reads the new W'); the caller
        keeps `_cache_key` (`cached` does; `refresher`'s graph sets it after a replay). `compiled`: through the
        compiled `merge_into` on CUDA, for the graph `refresher` captures (dynamo's guards cost host time on
        every call, so an eager rebuild layer by layer keeps the aten kernels)."""
        assert self._cache is not None
        w = self.base.weight.detach()
        if (compiled and COMPILE_REBUILD and w.is_cuda
                and run_compiled(merge_into, w, self.lora_A.detach(), self.lora_B.detach(), self.scale, *self._cache)):
            return
        merged, a_s, b_s = self._merged()
        for buf, value in zip(self._cache, (merged.view(self._cache[0].shape), a_s, b_s), strict=True):
            buf.copy_(value)

    def merged_weight(self) -> torch.Tensor:
        """W + s·B·A in the base weight's dtype and layout (computed in fp32, cached)."""
        return self.cached()[0]

    def drop_cache(self) -> None:
        """Forget the merged weight (needed after writing A or B through `.data`; its memory goes with its group's
        last layer)."""
        self._cache = self._cache_key = None
        if self._group is not None:
            self._group.release()

    def _base_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's maths with another weight (the base module's own hooks do not run)."""
        if self._is_conv:
            return self.base._conv_forward(x, weight, self._base_params["bias"])
        return F.linear(x, weight, self._base_params["bias"])

    def _attach_grads(self) -> None:
        """Before a gradient pass: the master's gradient and this layer's `.grad` views are attached (a zero_grad
        that set them to None zeroes them instead; a `.grad` assigned elsewhere is copied in)."""
        assert self._master is not None and self._grad_views is not None
        self._master.ensure()
        for p, view in zip((self.lora_A, self.lora_B), self._grad_views, strict=True):
            attach(p, view)

    def _merged_grad(self, x: torch.Tensor) -> torch.Tensor:
        """One kernel forward through W'; `_MergedLinear` / `_MergedConv2d` backward."""
        p, bias = self._parameters, self._base_params["bias"]
        token = None if self._master is None else self._master.token
        if self._conv is not None:
            return _MergedConv2d.apply(x, bias, p["lora_A"], p["lora_B"], self.cached(), self._conv, self, token)
        return _MergedLinear.apply(x, bias, p["lora_A"], p["lora_B"], self.cached(), self, token)

    def _unmerged(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + s·B·(A x) in the activations' dtype, differentiated by autograd."""
        y = self.base(x)
        a, b = self.lora_A.to(y.dtype), self.lora_B.to(y.dtype)
        if isinstance(self.base, nn.Conv2d):
            c = self.base
            u = F.conv2d(x.to(y.dtype), a, None, c.stride, c.padding, c.dilation, c.groups)  # (N, r, H, W)
            if b.shape[1] == 1:
                return torch.addcmul(y, u, b.view(1, -1, 1, 1), value=self.scale)
            return y + self.scale * F.conv2d(u, b[:, :, None, None])
        u = F.linear(x.to(y.dtype), a)  # (..., r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), b.t(), alpha=self.scale)
        return out.view(y.shape)

    @torch.compiler.disable  # host logic (the cache, the hand-written backward): eager inside compiled blocks (regions)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:  # the teacher: W alone
            return self._base_with(x, self._base_params["weight"])
        if not torch.is_grad_enabled():
            if self.merge_nograd or self.mode == "merged":
                return self._base_with(x, self.cached()[0])
            return self._unmerged(x)
        if self._master is not None:
            self._attach_grads()
        if self.mode == "merged" and self._mergeable and not torch.is_autocast_enabled(x.device.type):
            return self._merged_grad(x)
        return self._unmerged(x)


def _strides(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """The strides `_unrows` gives a tensor of `shape` in `layout`."""
    if layout == "nhwc":
        _, i, kh, kw = shape
        return (kh * kw * i, 1, kw * i, i)
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _layout(t: torch.Tensor) -> str | None:
    """How a weight's rows lie in memory, strides exactly: "rows" (contiguous), "nhwc" (a channels_last conv
    weight) or None (neither: it keeps its own storage)."""
    for layout in ("rows", "nhwc") if t.ndim == 4 else ("rows",):
        if t.stride() == _strides(t.shape, layout):
            return layout
    return None


def _rows(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t` as (t.shape[0], K) in the memory order of `layout`: a view when `t` is laid out so, a copy otherwise."""
    if layout == "nhwc":
        t = t.permute(0, 2, 3, 1)
    return t.reshape(t.shape[0], -1)


def _unrows(v: torch.Tensor, layout: str, shape: torch.Size) -> torch.Tensor:
    """The inverse of `_rows` for a view `v`: the tensor of `shape` whose memory `v` is."""
    if layout == "nhwc":
        o, i, kh, kw = shape
        return v.view(o, kh, kw, i).permute(0, 3, 1, 2)
    return v.view(shape)


class _Group:
    """FastLoRA layers whose weights have one shape as rows (out, K), dtype and device, stacked (G, out, K).

    At construction the layers' frozen weights W move into one tensor (each layer's weight becomes a view of it,
    its layout kept); the merged copies W' and s·A, s·B live in stacks of their own, each layer's cache a view
    of its slot. At rank 1 a rebuild is a few kernels for the whole group, whatever G is: A and B stacked into
    fp32 buffers, W' = W + s·(B ⊗ A) in one pass (fp32, rounded once, as `LoRAWrap._merged`; `merge_rank1`
    compiled on a GPU, aten's addcmul otherwise), and the rounded s·A, s·B. The stacks are freed when every layer has dropped its cache.
    """

    def __init__(self, layers: list[LoRAWrap]) -> None:
        self.layers = layers
        w0 = layers[0].base.weight
        self.rank, self.scale = layers[0].lora_A.shape[0], layers[0].scale
        self.out, self.k = w0.shape[0], w0[0].numel()
        self.layouts = [_layout(w.base.weight) or "rows" for w in layers]
        self.weight = torch.empty((len(layers), self.out, self.k), dtype=w0.dtype, device=w0.device)
        with torch.no_grad():
            for i, w in enumerate(layers):
                p = w.base.weight
                self.weight[i].copy_(_rows(p, self.layouts[i]))
                p.data = _unrows(self.weight[i], self.layouts[i], p.shape)  # the same Parameter, packed storage
                w._group, w._slot = self, i
        self.stacks: tuple[torch.Tensor, ...] | None = None  # (W', s·A, s·B, A fp32, B fp32), stacked

    def holds(self, i: int) -> bool:
        """Whether layer i's weight is still its slot of the packed tensor (not moved by `.to` or `.data = `)."""
        w = self.layers[i].base.weight
        return w.data_ptr() == self.weight[i].data_ptr() and w.dtype == self.weight.dtype

    def views(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Layer i's cache (W', s·A, s·B) as views of the stacks (allocated on first use); None if W left its slot."""
        if not self.holds(i):
            return None
        if self.stacks is None:
            g, o, k, r = len(self.layers), self.out, self.k, self.rank
            a, b = self.layers[0].lora_A, self.layers[0].lora_B
            self.stacks = (torch.empty_like(self.weight), self.weight.new_empty((g, r, k)),
                           self.weight.new_empty((g, o, r)), a.new_empty((g, r, k)), b.new_empty((g, o, r)))
        merged, a_s, b_s = self.stacks[:3]
        layer, layout = self.layers[i], self.layouts[i]
        return (_unrows(merged[i], layout, layer.base.weight.shape), _unrows(a_s[i], layout, layer.lora_A.shape),
                b_s[i])

    def ready(self) -> bool:
        """Whether `rebuild` refreshes every layer's cache: rank 1, each weight in its slot, each cache a view."""
        if self.rank != 1 or self.stacks is None:
            return False
        merged = self.stacks[0]
        return all(self.holds(i) and w._cache is not None and w._cache[0].data_ptr() == merged[i].data_ptr()
                   for i, w in enumerate(self.layers))

    @torch.no_grad()
    def rebuild(self, compiled: bool = False) -> None:
        """W' = W + s·B·A, s·A and s·B for every layer of the group (rank 1; `ready()` holds). `compiled`: through
        the compiled `merge_rank1` on CUDA (the graph `refresher` captures); else aten's addcmul."""
        assert self.stacks is not None
        merged, a_s, b_s, a32, b32 = self.stacks
        torch.stack([_rows(w.lora_A.detach(), lay) for w, lay in zip(self.layers, self.layouts, strict=True)],
                    out=a32)  # (G, 1, K)
        torch.stack([w.lora_B.detach() for w in self.layers], out=b32)  # (G, out, 1)
        if (compiled and COMPILE_REBUILD and TRITON_REBUILD and kernels.available(self.weight)
                and kernels.run_or_warn(kernels.merge_rank1_triton, self.weight, a32, b32, self.scale, merged, a_s,
                                        b_s)):
            return
        if (compiled and COMPILE_REBUILD and self.weight.is_cuda
                and run_compiled(merge_rank1, self.weight, a32, b32, self.scale, merged, a_s, b_s)):
            return
        torch.addcmul(self.weight, b32, a32, value=self.scale, out=merged)  # W + s·(b ⊗ a) in fp32, rounded once
        torch.mul(a32, self.scale, out=a_s)
        torch.mul(b32, self.scale, out=b_s)

    def release(self) -> None:
        """Free the stacks once no layer holds a view of them."""
        if all(w._cache is None for w in self.layers):
            self.stacks = None

    def unpack(self) -> None:
        """Give every layer's weight its own storage again (the packed tensor goes with the last view)."""
        with torch.no_grad():
            for i, w in enumerate(self.layers):
                if self.holds(i):
                    p = w.base.weight
                    p.data = p.data.clone(memory_format=torch.preserve_format)
                w._group = None
        self.stacks = None


def pack(layers: Sequence[LoRAWrap]) -> list[_Group]:
    """Group the layers by their weight's rows (out, K), dtype, device, rank and scale, packing each group's W."""
    groups: dict[tuple[Any, ...], list[LoRAWrap]] = {}
    for w in layers:
        p = w.base.weight
        if _layout(p) is None:  # a weight of unusual strides keeps its storage (rebuilt on its own)
            continue
        key = (p.shape[0], p[0].numel(), p.dtype, p.device, w.lora_A.shape[0], w.lora_A.dtype, w.scale)
        groups.setdefault(key, []).append(w)
    return [_Group(ws) for ws in groups.values()]


class FastLoRA:
    """A trainable rank-r LoRA on a frozen diffusers UNet, on the targets and init rules of `lora.attach_lora`.

    `mode` is the gradient path: "unmerged" (base kernel + low-rank branch) or "merged"
    (one kernel with W + s·B·A, hand-written backward); `merge_nograd` runs no-grad passes
    through the merged weight (always so in "merged" mode). The engine's `teacher_mode` sees
    it as a PEFT adapter: `disable_adapters` / `enable_adapters` toggle it (bound on the
    UNet instance until `remove`). `pack_weights` stacks the frozen target weights by shape
    (`_Group`: the per-step rebuild of W' a few kernels a group); attach it before capturing
    any CUDA graph of the UNet (the weights move), as for any change of its modules.
    """

    def __init__(self, unet: nn.Module, rank: int = 1, targets: Sequence[str] | None = None, seed: int = 0,
                 merge_nograd: bool = True, mode: str = "unmerged", pack_weights: bool = True) -> None:
        from .lora import LORA_TARGETS

        if rank < 1:
            raise UserError(f"--rank must be at least 1, got {rank}")
        if mode not in MODES:
            raise UserError(f"unknown LoRA mode {mode!r}; use one of {', '.join(MODES)}")
        targets = tuple(targets or LORA_TARGETS)
        self.unet, self.rank, self.mode = unet, rank, mode
        gen = torch.Generator().manual_seed(seed)
        self.layers: dict[str, LoRAWrap] = {}
        unet.requires_grad_(False)
        for name, module in list(unet.named_modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in targets):
                parent_name, _, child = name.rpartition(".")
                parent = unet.get_submodule(parent_name) if parent_name else unet
                wrap = LoRAWrap(module, rank, 1.0, gen, mode)  # alpha = rank: scale 1, as attach_lora
                wrap.merge_nograd = merge_nograd
                setattr(parent, child, wrap)
                self.layers[name] = wrap
        if not self.layers:
            raise UserError(f"none of the LoRA targets {list(targets)} is a Linear/Conv2d of this UNet")
        # the frozen weights stacked by shape (`_Group`); pack_weights=False: each layer alone (perf.rebuild)
        self.groups = pack(list(self.layers.values())) if pack_weights else []
        self.master = _Master(list(self.layers.values()))  # A and B of every layer in one tensor, their grads too
        self._saved = {k: unet.__dict__.get(k) for k in ("_hf_peft_config_loaded", "disable_adapters",
                                                        "enable_adapters")}
        unet.__dict__["_hf_peft_config_loaded"] = True
        unet.__dict__["disable_adapters"] = lambda: self.set_enabled(False)
        unet.__dict__["enable_adapters"] = lambda: self.set_enabled(True)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable fp32 LoRA weights, A then B per layer in module order (attach_lora's order)."""
        return [p for w in self.layers.values() for p in (w.lora_A, w.lora_B)]

    def backward_inputs(self) -> list[nn.Parameter]:
        """What a backward into this LoRA names as its `inputs`: the layers' A and B (eager passes) and the master's
        token (a graphed pass's backward is reached through it alone: `cudagraphs.GradGraphed`)."""
        return [*self.parameters(), self.master.token]

    def master_parameters(self) -> list[nn.Parameter]:
        """The same weights as one fp32 Parameter, whose `.grad` holds every layer's gradient: for the optimiser
        and the clipping (one tensor instead of ~1,600). Backward runs into `parameters()`."""
        return [self.master.param]

    def set_enabled(self, enabled: bool) -> None:
        """Student (True) or teacher (False)."""
        for w in self.layers.values():
            w.enabled = enabled

    def set_merge_nograd(self, merge: bool) -> None:
        """Run no-grad passes through merged weights (True) or through the low-rank branch."""
        for w in self.layers.values():
            w.merge_nograd = merge
            if not merge and w.mode != "merged":
                w.drop_cache()

    def set_mode(self, mode: str) -> None:
        """The gradient path: "unmerged" or "merged"."""
        if mode not in MODES:
            raise UserError(f"unknown LoRA mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode
        for w in self.layers.values():
            w.mode = mode

    def drop_cache(self) -> None:
        """Forget every merged weight (after writing A or B through `.data`, which autograd does not count)."""
        for w in self.layers.values():
            w.drop_cache()

    def _peft_shape(self, wrap: LoRAWrap, kind: str) -> torch.Size:
        """PEFT's shape of a weight: a Conv2d's B is a 1×1 conv (out, r, 1, 1)."""
        p = wrap.lora_A if kind == "A" else wrap.lora_B
        if kind == "B" and isinstance(wrap.base, nn.Conv2d):
            return torch.Size((*p.shape, 1, 1))
        return p.shape

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights with `lora.lora_state_dict`'s PEFT keys (`<module>.lora_A.weight`) and shapes, fp32, CPU."""
        out: dict[str, torch.Tensor] = {}
        for name, w in self.layers.items():
            for kind, p in (("A", w.lora_A), ("B", w.lora_B)):
                out[f"{name}.lora_{kind}.weight"] = (p.detach().float().cpu().reshape(self._peft_shape(w, kind))
                                                     .contiguous())
        return out

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-keyed weights (`lora.lora_state_dict` or `state_dict`) into this LoRA, exactly."""
        want = {f"{name}.lora_{kind}.weight": (w, kind) for name, w in self.layers.items() for kind in "AB"}
        unexpected = sorted(set(state) - set(want))
        missing = sorted(set(want) - set(state))
        if unexpected or missing:
            example = unexpected[0] if unexpected else missing[0]
            raise UserError(f"LoRA checkpoint does not fit this UNet ({len(unexpected)} unexpected keys, "
                            f"{len(missing)} missing, e.g. {example})")
        with torch.no_grad():  # in-place copies bump the version counters: merged caches rebuild
            for key, (w, kind) in want.items():
                param = w.lora_A if kind == "A" else w.lora_B
                value = state[key]
                if value.numel() != param.numel():
                    raise UserError(f"LoRA checkpoint does not fit this UNet: {key} is {list(value.shape)}, "
                                    f"expected {list(self._peft_shape(w, kind))}")
                param.copy_(value.reshape(param.shape).to(param.device, param.dtype))
        self.drop_cache()

    def remove(self) -> None:
        """Put the base layers back (each weight in its own storage again) and unbind the adapter switches."""
        for group in self.groups:
            group.unpack()
        self.groups = []
        for name, w in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
            setattr(parent, child, w.base)
            w.drop_cache()
        for k, v in self._saved.items():
            self.unet.__dict__.pop(k, None)
            if v is not None:
                self.unet.__dict__[k] = v
        self.layers = {}


class _Refresh:
    """Brings the merged weights of a UNet's FastLoRA layers up to date, once per optimiser step.

    After a step every layer is stale. A packed group (`_Group`) rebuilds at once (rank 1: five kernels for
    all its layers; SDXL: 31 groups); any other layer rebuilds alone (a few kernels a layer). On CUDA the full
    in-place rebuild is captured once as a CUDA graph and replayed: the same kernels on the same buffers, one
    launch. Anything else (the CPU, some layers stale and others not, another set of active layers) rebuilds
    eagerly, by groups where it can.
    """

    def __init__(self, layers: list[LoRAWrap]) -> None:
        self.layers = layers
        self.graph: Any = None
        self.captured: tuple[int, ...] = ()  # ids of the layers the graph rebuilds
        self.replays = 0

    @staticmethod
    def _rebuild(todo: list[LoRAWrap], compiled: bool) -> None:
        """Recompute the caches of `todo`: every group whose layers are all in it at once, each other layer alone."""
        ids = {id(w) for w in todo}
        alone = set(ids)
        for group in {id(w._group): w._group for w in todo if w._group is not None}.values():
            if group.ready() and all(id(w) in ids for w in group.layers):
                group.rebuild(compiled)
                alone -= {id(w) for w in group.layers}
        for w in todo:
            if id(w) in alone:
                if w.in_place():
                    w.rebuild(compiled=compiled)
                else:
                    w.cached()  # a first cache of its own (a layer outside any group)

    def __call__(self) -> None:
        active = [w for w in self.layers if w.enabled and (w.merge_nograd or w.mode == "merged")]
        keys = [w._key() for w in active]
        stale = [w for w, k in zip(active, keys, strict=True) if w._cache is None or w._cache_key != k]
        if not stale:
            return
        for w in stale:
            w.attach_cache()
        whole = len(stale) == len(active) and all(w.in_place() for w in active)
        if not whole or not active[0].base.weight.is_cuda:
            self._rebuild(stale, compiled=False)
            for w in stale:
                w._cache_key = w._key()
            return
        # the graph writes into the buffers it was captured with: a dropped and rebuilt cache needs a new one
        ids = tuple((id(w), w._cache[0].data_ptr()) for w in active if w._cache is not None)
        if self.graph is None or self.captured != ids:
            self.graph, self.captured = None, ids
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (compiles; cuBLAS workspaces on this stream); idempotent
                self._rebuild(active, compiled=True)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):  # captured, not run: the replay below runs it
                self._rebuild(active, compiled=True)
            self.graph = graph
        self.graph.replay()
        self.replays += 1
        for w, k in zip(active, keys, strict=True):
            w._cache_key = k


def refresher(unet: nn.Module) -> Callable[[], None] | None:
    """A call that brings the merged weights of every FastLoRA layer in `unet` up to date (None: there are none)."""
    layers = [m for m in unet.modules() if isinstance(m, LoRAWrap)]
    return _Refresh(layers) if layers else None
