"""`rapm_bench.fastlora`: the merged gradient path equals the unmerged one and PEFT's (issue #7).

Tolerances (fp32 on the CPU):
- outputs: merged = unmerged = PEFT within 1e-5 relative RMS;
- gradients of A, B and the input: within 1e-4 of their largest entry (per tensor; on the UNet
  at least 1e-3 of the largest LoRA gradient, since some layers' gradients are round-off);
- bf16 / fp16 UNet: finite, within 5e-2 relative RMS of fp32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from diffusers.loaders.peft import PeftAdapterMixin
from helpers.tolerances import GRAD_ATOL, GRAD_RTOL, rel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rapm_bench import bench as bm
from rapm_bench.errors import UserError
from rapm_bench.fastlora import MODES, FastLoRA, LoRAWrap
from rapm_bench.lora import LORA_TARGETS, attach_lora, lora_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def max_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """Largest difference over the largest entry of `want` (at least `floor`)."""
    return float((got.reshape(want.shape).float() - want.float()).abs().max()
                 / max(float(want.abs().max()), floor, 1e-30))


def grad_err(got: torch.Tensor, want: torch.Tensor, scale: float) -> float:
    """Largest difference over its tolerance: GRAD_RTOL of `want`'s largest entry plus the float32
    round-off floor GRAD_ATOL x `scale` (the largest gradient of any layer; helpers/tolerances.py says why)."""
    err = float((got.reshape(want.shape).float() - want.float()).abs().max())
    return err / (GRAD_RTOL * float(want.abs().max()) + GRAD_ATOL * scale)


def randomise(params: list[torch.Tensor], seed: int, std: float = 0.1) -> None:
    """Give LoRA weights (B starts at 0) seeded random values, in place and counted by autograd."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


# --- one layer ------------------------------------------------------------------------------------------
class Host(nn.Module, PeftAdapterMixin):
    """One layer named `layer`, with diffusers' PEFT adapter methods (so `attach_lora` works on it)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    # name: (layer, input shape)
    "linear": (lambda: nn.Linear(12, 10), (3, 5, 12)),
    "linear-no-bias": (lambda: nn.Linear(12, 10, bias=False), (7, 12)),
    "conv3x3-pad1": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 9)),
    "conv3x3-stride2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9)),
    "conv1x1": (lambda: nn.Conv2d(6, 8, 1), (2, 6, 5, 5)),
}


def _layer(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    make, shape = LAYERS[name]
    torch.manual_seed(seed)
    layer = make().requires_grad_(False)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return layer, x


def _run(module: nn.Module, x: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients of (input, *params) of a random linear functional of the output."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((y * probe).sum(), [x, *params])
    return y.detach(), list(grads)


def _peft_reference(name: str, rank: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """PEFT (`attach_lora`) on the layer with random A and B: its state, output and gradients (x, A, B)."""
    layer, x = _layer(name)
    host = Host(layer)
    params = attach_lora(host, rank, ("layer",), "rapm", seed=0)
    randomise(params, seed=3)
    y, grads = _run(host, x, params)
    return lora_state_dict(host, "rapm"), y, grads


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_merged_equals_unmerged_equals_peft(name: str, rank: int):
    state, want_y, want_grads = _peft_reference(name, rank)
    for mode in MODES:
        layer, x = _layer(name)
        host = Host(layer)
        lora = FastLoRA(host, rank, ("layer",), seed=5, mode=mode)
        lora.load_peft_state(state)
        y, grads = _run(host, x, lora.parameters())
        assert rel(y, want_y) < 1e-5, mode
        for what, g, want in zip(("input", "A", "B"), grads, want_grads, strict=True):
            assert max_err(g, want) < 1e-4, (mode, what)
        with torch.no_grad():  # the no-grad path (merged weight) too
            assert rel(host(x), want_y) < 1e-5, mode


def test_layer_merged_conv_with_dilation_equals_the_merged_weight_differentiated():
    """Dilation (PEFT's A ignores it; SDXL has none): the reference is autograd through conv2d(x, W + s·B·A)."""
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2).requires_grad_(False)
    host = Host(conv)
    lora = FastLoRA(host, 2, ("layer",), seed=0, mode="merged")
    randomise(lora.parameters(), seed=1)
    x = torch.randn(2, 6, 11, 11)
    y, grads = _run(host, x, lora.parameters())
    wrap = lora.layers["layer"]
    a, b = wrap.lora_A.detach().clone().requires_grad_(True), wrap.lora_B.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    w = conv.weight + (b @ a.flatten(1)).view(conv.weight.shape)
    yr = F.conv2d(xr, w, conv.bias, conv.stride, conv.padding, conv.dilation)
    probe = torch.randn(yr.shape, generator=torch.Generator().manual_seed(7))
    want = torch.autograd.grad((yr * probe).sum(), [xr, a, b])
    assert rel(y, yr.detach()) < 1e-5
    for g, wg in zip(grads, want, strict=True):
        assert max_err(g, wg) < 1e-4


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(4, 6, 3, padding="same"), lambda: nn.Conv2d(4, 6, 3, groups=2)])
def test_layers_the_merged_path_does_not_take_fall_back_to_unmerged(make):
    torch.manual_seed(0)
    conv = make().requires_grad_(False)
    x = torch.randn(1, 4, 7, 7)
    outs = []
    for mode in MODES:
        host = Host(copy.deepcopy(conv))
        lora = FastLoRA(host, 2, ("layer",), seed=0, mode=mode)
        randomise(lora.parameters(), seed=1)
        assert not lora.layers["layer"].mergeable
        wrap = lora.layers["layer"]  # a captured backward differentiates into its A and B (autograd's gradients)
        assert lora.master.surface() == [lora.master.token, wrap.lora_A, wrap.lora_B]
        outs.append(_run(host, x, lora.parameters()))
    assert rel(outs[1][0], outs[0][0]) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1], strict=True))


class OpLog(TorchDispatchMode):
    """The aten ops a region runs, views and metadata left out."""

    SKIP = ("view", "t", "_unsafe_view", "reshape", "expand", "detach", "alias", "permute", "transpose",
            "empty", "new_empty", "unsqueeze", "squeeze")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        if name not in self.SKIP:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["linear", "conv3x3-stride2"])
def test_merged_grad_forward_runs_the_bare_layers_kernels_and_saves_only_x(name: str):
    layer, x = _layer(name)
    bare = copy.deepcopy(layer)
    host = Host(layer)
    lora = FastLoRA(host, 1, ("layer",), seed=0, mode="merged")
    randomise(lora.parameters(), seed=1)
    xg = x.clone().requires_grad_(True)
    host(xg)  # builds the cache
    wrap: LoRAWrap = lora.layers["layer"]
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with OpLog() as merged_ops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = host(xg)
    with OpLog() as bare_ops:
        bare(xg)
    assert merged_ops.ops == bare_ops.ops  # one kernel, as the layer without LoRA
    assert [t.data_ptr() for t in saved] == [xg.data_ptr()]  # only x goes through save_for_backward
    assert all(a is b for a, b in zip(y.grad_fn.cache, wrap.cached(), strict=True))  # W', s·A, s·B: the cache


@pytest.mark.parametrize("rank", [1, 4])
def test_merged_conv_backward_runs_two_convolution_backwards_and_one_copy_of_x(rank: int):
    """∂L/∂x and ∂L/∂A through cuDNN, u = conv2d(x, sA) forward, v and ∂L/∂B as batched products over the pixels; the
    rank-r convolutions read one channels_last copy of x (no 1×1 convolution: it made cuDNN copy g to NHWC)."""
    layer, x = _layer("conv3x3-stride2")
    host = Host(layer)
    lora = FastLoRA(host, rank, ("layer",), seed=0, mode="merged")
    randomise(lora.parameters(), seed=1)
    y = host(x.clone().requires_grad_(True))
    with OpLog() as log:
        y.sum().backward()
    assert log.ops.count("convolution_backward") == 2 and log.ops.count("convolution") == 1
    assert log.ops.count("clone") == 1 and log.ops.count("bmm") == 2


# --- a tiny SDXL-architecture UNet ---------------------------------------------------------------------------
SMALL_UNET = bm.SDXL_UNET_SMALL | {"transformer_layers_per_block": (1, 1, 1)}  # every module kind, one deep


@pytest.fixture(scope="module")
def base_unet() -> nn.Module:
    """SDXL's modules at tiny widths (random weights, fp32); each test works on a copy."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SMALL_UNET).eval().requires_grad_(False)


def unet_inputs(unet: nn.Module, batch: int = 2, side: int = 8) -> dict[str, torch.Tensor]:
    """Latents, timesteps and SDXL conditioning (text states, pooled text, time ids)."""
    gen = torch.Generator().manual_seed(11)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {"sample": torch.randn(batch, cfg.in_channels, side, side, generator=gen),
            "timestep": torch.tensor([999, 499][:batch]),
            "encoder_hidden_states": torch.randn(batch, 7, cfg.cross_attention_dim, generator=gen),
            "text_embeds": torch.randn(batch, pooled, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}


def call(unet: nn.Module, inp: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The world's UNet call: inputs in the UNet's dtype, output in fp32."""
    return unet(inp["sample"].to(dtype), inp["timestep"], encoder_hidden_states=inp["encoder_hidden_states"].to(dtype),
                added_cond_kwargs={"text_embeds": inp["text_embeds"].to(dtype), "time_ids": inp["time_ids"].to(dtype)},
                return_dict=False)[0].float()


def graph_nodes(y: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind `y`."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [f for f, _ in node.next_functions]
    return {type(n).__name__ for n in seen}


def grads_of(unet: nn.Module, inp: dict[str, torch.Tensor], params: list[torch.Tensor],
             dtype: torch.dtype = torch.float32, nodes: set[str] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the LoRA gradients of a random linear functional of it (`nodes` collects the graph's node names)."""
    y = call(unet, inp, dtype)
    if nodes is not None:
        nodes |= graph_nodes(y)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    return y.detach(), list(torch.autograd.grad((y * probe).mean(), params))


@pytest.fixture(scope="module")
def peft_rank(base_unet: nn.Module) -> Callable[[int], dict]:
    """Per rank (cached): PEFT's state with random A and B, its output, its gradients, with and without checkpointing."""
    cache: dict[int, dict] = {}

    def get(rank: int) -> dict:
        if rank not in cache:
            unet = copy.deepcopy(base_unet)
            inp = unet_inputs(unet)
            params = attach_lora(unet, rank, LORA_TARGETS, "rapm", seed=0)
            randomise(params, seed=rank, std=0.05)
            out, grads = grads_of(unet, inp, params)
            unet.enable_gradient_checkpointing()
            out_ckpt, grads_ckpt = grads_of(unet, inp, params)
            cache[rank] = {"state": lora_state_dict(unet, "rapm"), "out": out, "grads": grads,
                           "out_ckpt": out_ckpt, "grads_ckpt": grads_ckpt,
                           "shapes": [tuple(p.shape) for p in params]}
        return cache[rank]

    return get


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("rank", [1, 4])
def test_unet_merged_equals_unmerged_equals_peft(base_unet: nn.Module, peft_rank, rank: int, ckpt: bool):
    ref = peft_rank(rank)
    want_out, want_grads = (ref["out_ckpt"], ref["grads_ckpt"]) if ckpt else (ref["out"], ref["grads"])
    scale = max(float(g.abs().max()) for g in want_grads)
    for mode in MODES:
        unet = copy.deepcopy(base_unet)
        inp = unet_inputs(unet)
        if ckpt:
            unet.enable_gradient_checkpointing()
        lora = FastLoRA(unet, rank, seed=0, mode=mode)
        lora.load_peft_state(ref["state"])
        calls = []
        probe = next(w for n, w in lora.layers.items() if n.startswith("down_blocks.1") and n.endswith("to_q"))
        probe.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        nodes: set[str] = set()
        out, grads = grads_of(unet, inp, lora.parameters(), nodes=nodes)
        assert len(calls) == (2 if ckpt else 1)  # checkpointing recomputed the block in backward
        merged_nodes = {"_MergedLinearBackward", "_MergedConv2dBackward"}
        assert merged_nodes <= nodes if mode == "merged" else not merged_nodes & nodes
        assert rel(out, want_out) < 1e-5, mode
        assert len(grads) == len(want_grads)
        for i, (g, want) in enumerate(zip(grads, want_grads, strict=True)):  # attach_lora's order: A, B per layer
            assert grad_err(g, want, scale) <= 1.0, (mode, i)
        lora.remove()


def test_teacher_mode_switches_the_merged_lora_off_and_on(base_unet: nn.Module, peft_rank):
    from rapm_bench.distill.discriminator import teacher_mode

    unet = copy.deepcopy(base_unet)
    inp = unet_inputs(unet)
    with torch.no_grad():
        plain = call(unet, inp)
    unet.enable_gradient_checkpointing()
    lora = FastLoRA(unet, 1, seed=0, mode="merged")
    lora.load_peft_state(peft_rank(1)["state"])
    student, grads = grads_of(unet, inp, lora.parameters())
    assert rel(student, plain) > 1e-3  # the LoRA matters
    with teacher_mode(unet):
        with torch.no_grad():
            assert torch.equal(call(unet, inp), plain)
        teacher = call(unet, inp)  # a grad pass as the teacher: no path to the LoRA
        assert torch.equal(teacher.detach(), plain) and not teacher.requires_grad
    again, grads2 = grads_of(unet, inp, lora.parameters())  # the student again, the same merged weights
    assert torch.equal(again, student) and all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))
    lora.remove()
    with torch.no_grad():
        assert torch.equal(call(unet, inp), plain)  # removed: the plain UNet again
    assert not getattr(unet, "_hf_peft_config_loaded", False)


def test_state_dict_has_peft_keys_shapes_and_parameter_order(base_unet: nn.Module, peft_rank):
    ref = peft_rank(4)
    unet = copy.deepcopy(base_unet)
    lora = FastLoRA(unet, 4, seed=0, mode="merged")
    fresh = lora.state_dict()
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in ref["state"].items()}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous() for v in fresh.values())
    want = [s[:2] if i % 2 and len(s) == 4 else s for i, s in enumerate(ref["shapes"])]  # A, B; conv B is (out, r)
    assert [tuple(p.shape) for p in lora.parameters()] == want
    lora.load_peft_state(ref["state"])
    back = lora.state_dict()
    assert all(torch.equal(back[k], v) for k, v in ref["state"].items())  # exact round trip
    with pytest.raises(UserError, match="does not fit this UNet .*1 unexpected keys, 0 missing"):
        lora.load_peft_state(ref["state"] | {"nope.lora_A.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="0 unexpected keys, 1 missing"):
        lora.load_peft_state(dict(list(ref["state"].items())[1:]))
    key = next(iter(ref["state"]))
    with pytest.raises(UserError, match=f"{key} is"):
        lora.load_peft_state(ref["state"] | {key: torch.zeros(3)})
    lora.remove()


def test_passes_after_an_optimiser_step_use_the_new_weights(base_unet: nn.Module, peft_rank):
    unet = copy.deepcopy(base_unet)
    inp = unet_inputs(unet)
    lora = FastLoRA(unet, 1, seed=0, mode="merged")
    lora.load_peft_state(peft_rank(1)["state"])
    with torch.no_grad():
        before = call(unet, inp)
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    _, grads = grads_of(unet, inp, lora.parameters())
    for p, g in zip(lora.parameters(), grads, strict=True):
        p.grad = g
    opt.step()
    with torch.no_grad():
        after = call(unet, inp)
    grad_pass, _ = grads_of(unet, inp, lora.parameters())
    lora.set_mode("unmerged")
    lora.set_merge_nograd(False)
    with torch.no_grad():
        want = call(unet, inp)  # no cache on this path
    assert rel(after, before) > 1e-4 and rel(after, want) < 1e-5 and rel(grad_pass, want) < 1e-5
    lora.set_mode("merged")
    lora.load_peft_state(peft_rank(1)["state"])  # loading invalidates too
    with torch.no_grad():
        assert rel(call(unet, inp), before) < 1e-6
        lora.parameters()[1].data.mul_(2)  # `.data` writes are not counted by autograd: drop_cache
        lora.drop_cache()
        assert rel(call(unet, inp), before) > 1e-4
    lora.remove()


@pytest.mark.parametrize("mode", MODES)
def test_backward_lands_in_one_gradient_buffer_equal_to_autograds(base_unet: nn.Module, peft_rank, monkeypatch,
                                                                 mode: str):
    """`.backward()` into the LoRA: a merged layer adds A's and B's gradients into views of one buffer (autograd gets
    none), an unmerged one through autograd's accumulation into the same views; the master's `.grad` equals
    torch.autograd.grad's gradients, accumulates over two passes, restarts from zero after an optimiser's
    zero_grad(set_to_none=True), and a backward that does not ask for the LoRA leaves it alone."""
    from rapm_bench import fastlora

    unet = copy.deepcopy(base_unet)
    inp = unet_inputs(unet)
    lora = FastLoRA(unet, 1, seed=0, mode=mode)
    lora.load_peft_state(peft_rank(1)["state"])
    params, (master,) = lora.parameters(), lora.master_parameters()
    _, want = grads_of(unet, inp, params)  # returned to autograd.grad: no buffer involved
    want_flat = torch.cat([g.permute(0, 2, 3, 1).reshape(-1) if g.ndim == 4 and p.is_contiguous(
        memory_format=torch.channels_last) and not p.is_contiguous() else g.reshape(-1) for p, g in zip(
        params, want, strict=True)])
    sunk = []
    real = fastlora._sink
    monkeypatch.setattr(fastlora, "_sink", lambda layer, ctx: sunk.append(real(layer, ctx)) or sunk[-1])
    opt = torch.optim.AdamW(lora.master_parameters(), lr=1e-3)
    probe = torch.randn(call(unet, inp).shape, generator=torch.Generator().manual_seed(7))
    for passes in (1, 2):
        opt.zero_grad(set_to_none=True)
        assert master.grad is None
        for _ in range(passes):
            (call(unet, inp) * probe).mean().backward(inputs=params)
        assert master.grad is not None and all(p.grad.untyped_storage().data_ptr() == master.grad.untyped_storage()
                                               .data_ptr() for p in params)
        for p, g in zip(params, want, strict=True):
            assert grad_err(p.grad, passes * g, float(max(w.abs().max() for w in want))) <= 1
        assert float((master.grad - passes * want_flat).abs().max()) <= 1e-4 * float(want_flat.abs().max())
    merged_layers = sum(w.mode == "merged" and w._mergeable for w in lora.layers.values())
    assert len(lora.master.surface()) == 1 + (0 if mode == "merged" else len(params))  # the token alone when merged
    assert sum(v is not None for v in sunk) == (3 * merged_layers if mode == "merged" else 0)  # one a layer a pass
    before = master.grad.clone()
    x = inp["sample"].clone().requires_grad_(True)
    (call(unet, inp | {"sample": x}) * probe).mean().backward(inputs=[x])
    assert x.grad is not None and torch.equal(master.grad, before)
    lora.remove()


def test_an_older_per_layer_optimiser_state_resumes_as_the_master_state(base_unet: nn.Module, peft_rank):
    """A per-layer AdamW state (checkpoints before the master tensor) converts to the master's: the next step is the
    same as the per-layer optimiser's."""
    unet = copy.deepcopy(base_unet)
    inp = unet_inputs(unet)
    lora = FastLoRA(unet, 1, seed=0, mode="merged")
    lora.load_peft_state(peft_rank(1)["state"])
    params, (master,) = lora.parameters(), lora.master_parameters()
    _, grads = grads_of(unet, inp, params)
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    per_layer = torch.optim.AdamW(copies, lr=1e-2)
    for _ in range(2):
        for c, g in zip(copies, grads, strict=True):
            c.grad = g.clone()
        per_layer.step()
    flat = torch.optim.AdamW([master], lr=1e-2)
    flat.load_state_dict(lora.master.to_flat_state(per_layer.state_dict()))
    with torch.no_grad():
        for p, c in zip(params, copies, strict=True):
            p.copy_(c)
    for c, g in zip(copies, grads, strict=True):
        c.grad = g.clone()
    per_layer.step()
    lora.master.ensure_all()
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.grad.copy_(g)
    flat.step()
    for p, c in zip(params, copies, strict=True):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(UserError, match="holds 3 LoRA tensors"):
        lora.master.to_flat_state({"state": {}, "param_groups": [{"params": [0, 1, 2]}]})
    lora.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_groups_rebuild_all_their_layers_at_once(base_unet: nn.Module, dtype: torch.dtype,
                                                        channels_last: bool):
    """The frozen weights are packed by shape, values and strides kept; a refresh rebuilds each group in five ops
    whatever its size (A and B stacked, one addcmul, s·A, s·B), and every cache equals the layer's own rebuild
    (W' within an fp32 rounding, one bf16 step at most; s·A, s·B exactly) in the weight's layout. `remove` gives
    every weight its own storage back, unchanged; dropping every cache frees the stacks."""
    from rapm_bench.fastlora import refresher

    unet = copy.deepcopy(base_unet).to(dtype)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    before = {n: (p.detach().clone(), p.stride()) for n, p in unet.named_parameters()}
    lora = FastLoRA(unet, 1, seed=0, mode="merged")
    assert 1 < len(lora.groups) < len(lora.layers) / 2
    assert sorted(id(w) for g in lora.groups for w in g.layers) == sorted(id(w) for w in lora.layers.values())
    for g in lora.groups:
        assert all(w.base.weight.data_ptr() == g.weight[i].data_ptr() for i, w in enumerate(g.layers))
    params = dict(unet.named_parameters())
    for name, (value, stride) in before.items():
        base = params[name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
                      if name.rsplit(".", 1)[0] in lora.layers else name]
        assert torch.equal(base, value) and base.stride() == stride, name
    refresh = refresher(unet)
    assert refresh is not None
    refresh()  # the first: the caches are allocated as views of the stacks
    randomise(lora.parameters(), 3)  # an optimiser step's in-place writes
    log = OpLog()
    with log:
        refresh()
    ops = sorted(op for op in log.ops if op != "select")  # views of the stacks' slots (the readiness checks)
    assert ops == sorted(["stack", "stack", "addcmul", "mul", "mul"] * len(lora.groups))
    step = 2**-7 if dtype == torch.bfloat16 else 1e-6
    for name, w in lora.layers.items():
        got = w.cached()
        merged, a_s, b_s = w._merged()
        weight = w.base.weight
        torch.testing.assert_close(got[0].float(), merged.view(weight.shape).to(dtype).float(), rtol=step,
                                   atol=1e-6, msg=name)
        assert torch.equal(got[1], a_s) and torch.equal(got[2], b_s), name
        assert got[0].stride() == weight.stride(), name  # W' in W's layout (the kernels a CUDA graph holds)
    lora.drop_cache()
    assert all(g.stacks is None for g in lora.groups)
    lora.remove()
    params = dict(unet.named_parameters())
    assert all(torch.equal(params[n], v) and params[n].stride() == st for n, (v, st) in before.items())
    storages = {p.untyped_storage().data_ptr() for p in params.values()}
    assert len(storages) == len(params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merged_is_finite_and_close_to_fp32(base_unet: nn.Module, peft_rank, dtype: torch.dtype):
    ref = peft_rank(1)
    unet = copy.deepcopy(base_unet).to(dtype)
    inp = unet_inputs(unet)
    lora = FastLoRA(unet, 1, seed=0, mode="merged")
    lora.load_peft_state(ref["state"])
    assert all(p.dtype == torch.float32 for p in lora.parameters())  # fp32 masters
    out, grads = grads_of(unet, inp, lora.parameters(), dtype)
    assert torch.isfinite(out).all() and rel(out, ref["out"]) < 5e-2
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    flat, want = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref["grads"]])
    assert rel(flat, want) < 5e-2
    with torch.no_grad():
        assert rel(call(unet, inp, dtype), ref["out"]) < 5e-2
    lora.remove()


def test_bad_mode_and_rank():
    host = Host(nn.Linear(3, 3))
    with pytest.raises(UserError, match="unknown LoRA mode 'fused'; use one of unmerged, merged"):
        FastLoRA(host, 1, ("layer",), mode="fused")
    with pytest.raises(UserError, match="--rank must be at least 1, got 0"):
        FastLoRA(host, 0, ("layer",))
    with pytest.raises(UserError, match="none of the LoRA targets"):
        FastLoRA(host, 1, ("nope",))


def test_rebuild_benchmark_runs_every_form_on_the_cpu(tmp_path):
    """`python -m rapm_bench.perf.rebuild` (the GPU's timing of the three rebuild forms) runs on a CPU with the
    tiny SDXL-architecture UNet and writes its JSON; the packed forms have fewer groups than layers."""
    import json

    from rapm_bench.perf import rebuild

    result = rebuild.main(["--size", "tiny", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "rebuild-cpu.json").read_text())
    assert [r["name"] for r in saved["forms"]] == list(rebuild.FORMS) == [r["name"] for r in result["forms"]]
    layers = saved["forms"][0]["layers"]
    for r in saved["forms"]:
        packed = r["name"].startswith("packed")
        assert (0 < r["groups"] < layers) if packed else r["groups"] == 0, r["name"]
        assert r["layers"] == layers and r["floor_seconds"] > 0
    assert saved["command"].startswith("python -m rapm_bench.perf.rebuild --size tiny")
