"""CUDA graphs for fixed-shape UNet passes (issue 14: batch-1 UNet passes are launch-bound).

`Graphed` replays no-grad calls (below); `GradGraphed` replays a differentiable call's forward and
backward (the gradient passes of a RAPM iteration, through torch.cuda.make_graphed_callables).

A diffusers UNet call at batch 1 launches ~2,000 kernels from Python; on an H200 it runs at
0.13 of its compute floor. `Graphed(fn)` captures `fn` once per input signature (shapes,
dtypes, devices, strides, non-tensor arguments) and afterwards replays the captured kernels:
the inputs are copied into the graph's static buffers, the graph is replayed, the outputs are
cloned. Only no-grad calls on a CUDA device are graphed; every other call runs `fn` eagerly,
so the CPU path is the eager path.

The contract of a graph: between capture and replay the module structure stays fixed (no
LoRA attached, fused or removed) and weights change only in place (an optimiser step does;
`rapm_bench.fastlora` rebuilds its merged weights in place, and `prepare` brings them up to
date before each replay). Python control flow is frozen at capture, so one `Graphed` wraps one
kind of call (the student's passes, or the teacher's features: never both). The replayed kernels
are the captured eager kernels, so outputs equal the eager call's (tests/test_fast_paths.py, `gpu`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

_eager = 0  # > 0 inside `eager()`


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Every `Graphed` call inside the block runs `fn` eagerly (FLOP counting, which must see each kernel once)."""
    global _eager
    _eager += 1
    try:
        yield
    finally:
        _eager -= 1


@dataclass
class _Capture:
    """One captured graph: its static inputs and outputs."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: Any  # the pytree `fn` returned during capture (tensors in the graph's pool)


class Graphed:
    """`fn(*args)` replayed from a CUDA graph per input signature when grad is off and the inputs are on CUDA."""

    def __init__(self, fn: Callable[..., Any], prepare: Callable[[], None] | None = None, warmup: int = 2,
                 max_graphs: int = 16) -> None:
        self.fn, self.prepare = fn, prepare
        self.warmup, self.max_graphs = warmup, max_graphs
        self.graphs: dict[Any, _Capture] = {}
        self.pool: Any = None  # one memory pool for all graphs (replays never overlap: one stream)
        self.replays = 0  # calls served from a graph (tests and the bench read it)

    def _key(self, leaves: list[Any], spec: Any) -> Any:
        """The signature a graph is valid for."""
        sig = tuple((tuple(x.shape), x.dtype, x.device, x.stride()) if isinstance(x, torch.Tensor) else ("v", x)
                    for x in leaves)
        return spec, sig

    def __call__(self, *args: Any) -> Any:
        leaves, spec = pytree.tree_flatten(args)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if _eager or torch.is_grad_enabled() or not tensors or any(x.device.type != "cuda" for x in tensors):
            return self.fn(*args)
        if self.prepare is not None:
            self.prepare()
        key = self._key(leaves, spec)
        cap = self.graphs.get(key)
        if cap is None:
            if len(self.graphs) >= self.max_graphs:  # a caller with ever-changing shapes: stay eager
                return self.fn(*args)
            cap = self.graphs[key] = self._capture(leaves, spec)
        for static, x in zip(cap.inputs, tensors, strict=True):
            static.copy_(x, non_blocking=True)
        cap.graph.replay()
        self.replays += 1
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, cap.outputs)

    def _capture(self, leaves: list[Any], spec: Any) -> _Capture:
        """Warm `fn` up on a side stream (cuBLAS/cuDNN workspaces), then capture one call."""
        statics = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        inputs = [x for x in statics if isinstance(x, torch.Tensor)]
        args = pytree.tree_unflatten(statics, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.fn(*args)
        return _Capture(graph, inputs, outputs)

    def release(self) -> None:
        """Drop every graph and its memory."""
        self.graphs.clear()
        self.pool = None


class _Call(nn.Module):
    """`fn(x, t, cond)` with the conditioning as positional tensors; `net`'s parameters are its own, so that
    make_graphed_callables differentiates into them (the LoRA weights that require grad)."""

    def __init__(self, fn: Callable[..., Any], net: nn.Module | None, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.fn, self.keys = fn, keys
        if net is not None:
            self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, *values: torch.Tensor) -> Any:
        return self.fn(x, t, dict(zip(self.keys, values, strict=True)))


class GradGraphed:
    """A differentiable `fn(x, t, cond)` whose forward and backward replay CUDA graphs when grad is on.

    The gradient passes of a batch-1 RAPM iteration are launch-bound like the no-grad ones (issue 14: ~0.5 s
    of GPU work under ~1 s of host time on an H200). `torch.cuda.make_graphed_callables` captures one forward
    and one backward graph per input signature (shapes, dtypes, strides, requires_grad) and puts them in one
    autograd node: the backward replays the captured backward kernels into the inputs that require grad and
    into `net`'s trainable parameters (the LoRA). Same contract as `Graphed` (fixed modules, weights written in
    place, `prepare` before each replay), plus: no gradient checkpointing inside (the caller checks), and an
    output is used before the next call (outputs are cloned, so that holds by construction). FastLoRA's merged
    layers add their LoRA gradients into its one gradient buffer inside the captured backward (fastlora._Master),
    so the replayed backward hands autograd no per-layer gradients. Every other call
    (grad off, CPU inputs, inside `eager()`) runs `fn` itself.
    """

    def __init__(self, fn: Callable[..., Any], net: nn.Module | None = None, prepare: Callable[[], None] | None = None,
                 max_graphs: int = 4) -> None:
        from .fastlora import masters

        self.fn, self.net, self.prepare, self.max_graphs = fn, net, prepare, max_graphs
        self.graphs: dict[Any, Callable[..., Any]] = {}
        self.replays = 0
        # FastLoRA's gradient buffers: a captured merged backward adds into them in place (fastlora._Master)
        self.masters = masters(net) if net is not None else []
        # what the captured backward differentiates into: FastLoRA's tokens (its A and B get their gradients in place),
        # else `net`'s trainable parameters
        self.surface = nn.ParameterList([p for m in self.masters for p in m.surface()]) if self.masters else net

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> Any:
        if _eager or not torch.is_grad_enabled() or x.device.type != "cuda":
            return self.fn(x, t, cond)
        keys = tuple(cond)
        args = (x, torch.as_tensor(t, device=x.device), *(cond[k] for k in keys))
        key = keys, tuple((tuple(a.shape), a.dtype, a.stride(), a.requires_grad) for a in args)
        graphed = self.graphs.get(key)
        if graphed is None and len(self.graphs) >= self.max_graphs:  # ever-changing shapes: stay eager
            return self.fn(x, t, cond)
        if self.prepare is not None:
            self.prepare()
        for m in self.masters:  # the buffers the captured backward writes are the LoRA's gradients
            m.ensure_all()
        if graphed is None:
            from .fastlora import capturing

            samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            with capturing(self.masters):  # the warm-up's gradients are undone
                graphed = self.graphs[key] = torch.cuda.make_graphed_callables(
                    _Call(self.fn, self.surface, keys), samples, allow_unused_input=True)
        out = graphed(*args)
        self.replays += 1
        return pytree.tree_map(lambda o: o.clone() if isinstance(o, torch.Tensor) else o, out)


def available(device: torch.device | str) -> bool:
    """Whether graphs can run on `device` (a CUDA device)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


@contextlib.contextmanager
def graphed_predict(world: Any, enabled: bool = True) -> Iterator[Graphed | None]:
    """Inside the block, the world's no-grad `predict` calls replay CUDA graphs (generation, trajectories).

    The world's networks must not change inside the block (graphs are dropped at its end). Not for
    callers that hook into the UNet's modules (the discriminator's feature hooks would not run).
    """
    if not enabled or not available(world.device) or "predict" in vars(world):
        yield None
        return
    graphed = Graphed(world.predict)
    world.predict = graphed  # an instance attribute shadows the method until the block ends
    try:
        yield graphed
    finally:
        del world.predict
        graphed.release()
