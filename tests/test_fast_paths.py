"""Issue 14's fast paths equal the paths they replace: merged no-grad passes, CUDA graphs, in-place merged
weights, checkpointing chosen from memory, the VAE and feature precisions as protocol fields."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from rapm_bench.distill.schedule import SlotSchedule

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def small_world(device: str = "cpu"):
    """A random-weight tiny-world teacher small enough for fast tests."""
    from rapm_bench.tiny.train import TeacherArch, build_teacher
    from rapm_bench.worlds.tiny import TinyWorld

    torch.manual_seed(0)
    unet, text_encoder = build_teacher(TeacherArch(block_out_channels=(16, 32), text_width=32, text_layers=1))
    return TinyWorld(unet, text_encoder, device)


def rapm_loss(world, merged_lora: bool = False):
    """RAPMLoss (GAN + regression) on `world` with a rank-1 LoRA whose B is non-zero."""
    from rapm_bench.distill.discriminator import EncoderFeatures, build_heads, feature_channels
    from rapm_bench.distill.rapm import LossWeights, RAPMLoss
    from rapm_bench.fastlora import FastLoRA
    from rapm_bench.lora import attach_lora

    if merged_lora:
        params = FastLoRA(world.unet, 1, seed=0, mode="merged").backward_inputs()  # A, B and the token
    else:
        params = attach_lora(world.unet, 1, seed=0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    feats = EncoderFeatures(world)
    heads = build_heads(feature_channels(feats, world.encode_prompts(["x"])), 16, 0, world.device)
    sched = SlotSchedule(world.alphas_cumprod, 4, 2)
    loss = RAPMLoss(world.predict, sched, world.noise_schedule.prediction_type, LossWeights(), feats, *heads)
    return loss, params, heads


def trajectory(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, 32, 32, generator=g).to(device), torch.randn(4, 3, 32, 32, generator=g).to(device)


def run_terms(loss, params, heads, world, chunk: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Losses and logs summed over chunks, and the LoRA and head gradients, for one trajectory."""
    z_tilde, z_delta = trajectory(str(world.device))
    cond = world.encode_prompts(["a red circle in the centre"])
    heads_params = [p for h in heads for p in h.parameters()]
    for p in [*params, *heads_params]:
        p.grad = None
    sums: dict[str, torch.Tensor] = {}
    for t in loss.chunks(z_tilde, z_delta, cond, torch.Generator(world.device).manual_seed(0), chunk):
        t.g_loss.backward(inputs=list(params))
        t.d_loss.backward(inputs=heads_params)
        for k, v in {"g": t.g_loss.detach(), "d": t.d_loss.detach(), **t.logs}.items():
            sums[k] = sums.get(k, 0) + v
    return sums, [p.grad.clone() for p in [*params, *heads_params]]


def assert_near_terms(a, b, rel: float) -> None:
    """Losses and gradients equal up to round-off, measured on the whole tensor: ‖x − y‖ ≤ rel·‖y‖. The tiny UNet
    runs fp32 with cuDNN's default TF32 convolutions, and another batching or a captured graph may pick another
    algorithm: measured on an H200, ~1.1e-3 of a small gradient's norm (a stale or wrong path moves all of it)."""
    (sa, ga), (sb, gb) = a, b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert float((sa[k] - sb[k]).abs()) <= rel * float(sb[k].abs()) + 1e-7, (k, float(sa[k]), float(sb[k]))
    flat = [(x - y).double().flatten() for x, y in zip(ga, gb, strict=True)]
    total, scale = float(torch.cat(flat).norm()), float(torch.cat([y.double().flatten() for y in gb]).norm())
    assert total <= rel * scale, (total, scale)  # the whole gradient, as the optimiser sees it
    floor = rel * scale / len(flat) ** 0.5  # a tensor's share of the whole norm, spread evenly: near-zero tensors
    for i, (d, y) in enumerate(zip(flat, gb, strict=True)):  # and each tensor, looser: a small tensor's gradient
        err, norm = float(d.norm()), float(y.double().norm())  # cancels more (measured up to 7.5e-3 of its norm)
        assert err <= 4 * rel * norm + floor, (i, err, norm, floor)


def assert_close_terms(a, b, rtol: float, atol: float) -> None:
    (sa, ga), (sb, gb) = a, b
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", [4, 2])
def test_merged_nograd_passes_equal_separate_passes(chunk):
    """The first roll-out jump and the relative-target jumps in one batch give today's losses and gradients."""
    world = small_world()
    loss, params, heads = rapm_loss(world)
    separate = run_terms(loss, params, heads, world, chunk)
    loss.merge_passes = True
    merged = run_terms(loss, params, heads, world, chunk)
    # one batch of 1 + chunk latents instead of two: the same maths, float32 reductions of another blocking
    assert_close_terms(merged, separate, rtol=1e-5, atol=1e-7)


def test_fast_nograd_is_the_eager_path_on_the_cpu():
    """`fast_nograd` applies on a GPU only: the CPU keeps the eager path, bit for bit (the CI baselines)."""
    from rapm_bench.cudagraphs import Graphed
    from rapm_bench.distill.objectives import fast_nograd

    world = small_world()
    loss, params, heads = rapm_loss(world)
    assert fast_nograd(loss, world) is False
    assert loss.nograd_student is loss.student and not loss.merge_passes
    g = Graphed(lambda x: x * 2)
    assert torch.equal(g(torch.ones(3)), torch.full((3,), 2.0)) and g.replays == 0 and not g.graphs


def test_merged_weights_are_rebuilt_in_place():
    """After an optimiser step FastLoRA's W + s·B·A is rebuilt into the same buffer (a CUDA graph reads it)."""
    from rapm_bench.fastlora import FastLoRA, refresher

    world = small_world()
    lora = FastLoRA(world.unet, 1, seed=0, mode="merged")
    wrap = next(iter(lora.layers.values()))
    before = wrap.merged_weight()
    ptr = before.data_ptr()
    opt = torch.optim.SGD(lora.parameters(), lr=0.1)
    for p in lora.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    refresh = refresher(world.unet)
    assert refresh is not None
    refresh()
    after = wrap.cached()[0]
    assert after.data_ptr() == ptr
    w = wrap.base.weight
    expected = (w.reshape(w.shape[0], -1).double()
                + wrap.lora_B.double() @ wrap.lora_A.reshape(wrap.lora_A.shape[0], -1).double()).view(w.shape)
    torch.testing.assert_close(after.double(), expected, rtol=1e-6, atol=1e-6)
    assert refresher(small_world().unet) is None  # no FastLoRA layers: nothing to refresh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_into_is_the_layers_merged_weight(dtype):
    """`merge_into` (the GPU's compiled rebuild, run eagerly here) gives `LoRAWrap._merged`'s W + s·B·A, s·A and s·B
    for a Linear and 3×3 / 1×1 convolutions at rank 1 and 2: within an fp32 rounding, one bf16 step at most."""
    from rapm_bench.fastlora import LoRAWrap, merge_into

    gen = torch.Generator().manual_seed(0)
    for base, rank in [(torch.nn.Linear(12, 8), 1), (torch.nn.Conv2d(4, 6, 3), 2), (torch.nn.Conv2d(4, 6, 1), 1)]:
        base = base.to(dtype)
        wrap = LoRAWrap(base, rank, 1.0, gen, "merged")
        with torch.no_grad():
            wrap.lora_B.normal_(generator=gen)
        merged, a_s, b_s = wrap._merged()
        w = base.weight.detach()
        out = (torch.empty_like(w), torch.empty_like(a_s), torch.empty_like(b_s))
        merge_into(w, wrap.lora_A.detach(), wrap.lora_B.detach(), wrap.scale, *out)
        want = merged.view(w.shape).to(dtype)
        step = 2**-7 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(out[0].float(), want.float(), rtol=step, atol=1e-6)
        assert torch.equal(out[1], a_s) and torch.equal(out[2], b_s)


def test_checkpointing_auto_is_decided_and_recorded(tmp_path):
    """`grad_checkpointing=None` becomes a decision before the run starts; a resumed run keeps its own."""
    from rapm_bench.distill.config import DistillConfig
    from rapm_bench.distill.memory import choose_checkpointing, estimate_gib, resolve_checkpointing

    world = small_world()
    cfg = replace(DistillConfig(), grad_checkpointing=None)
    on, why = choose_checkpointing(cfg, world)
    assert on is False and "cpu" in why
    resolved, _ = resolve_checkpointing(cfg, world, tmp_path)
    assert resolved.grad_checkpointing is False
    (tmp_path / "config.json").write_text(replace(cfg, grad_checkpointing=True).to_json())
    kept, why = resolve_checkpointing(cfg, world, tmp_path)
    assert kept.grad_checkpointing is True and "chose" in why
    assert resolve_checkpointing(replace(cfg, grad_checkpointing=False), world, tmp_path)[0].grad_checkpointing is False
    # the estimate grows with the slots of a pass and with the merged-weight copy
    assert estimate_gib(replace(cfg, lora_impl="merged"), world) > estimate_gib(replace(cfg, lora_impl="peft"), world)
    from rapm_bench.worlds.sdxl import activation_gib

    assert activation_gib(1024) == pytest.approx(4 * activation_gib(512))


def test_checkpointing_counts_the_allocators_cached_blocks_as_free(monkeypatch):
    """Memory this process's allocator caches but no tensor uses is free to the passes: the bench decides the
    engine's variant after other variants ran, and must decide as a fresh engine would (an H100 run chose
    checkpointing with 80 GB because the cache looked taken)."""
    from types import SimpleNamespace

    from rapm_bench.distill import memory
    from rapm_bench.distill.config import DistillConfig

    gib = 2**30
    cfg = replace(DistillConfig(), grad_checkpointing=None)
    world = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(memory, "estimate_gib", lambda cfg, world: 40.0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * gib, 80 * gib))
    for reserved, on in ((0, True), (40 * gib, False)):  # 30 GiB free, or 30 + 40 cached: 40 GiB needed
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device, r=reserved: r + 5 * gib)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5 * gib)
        assert memory.choose_checkpointing(cfg, world)[0] is on


def test_sdxl_preset_chooses_checkpointing_and_states_it():
    """The sdxl preset leaves the choice to the free memory; the CLI's dry run shows it undecided (null)."""
    from rapm_bench.distill.config import distill_preset

    assert distill_preset("sdxl").grad_checkpointing is None
    assert distill_preset("tiny").grad_checkpointing is False
    assert json.loads(distill_preset("sdxl").to_json())["fast_nograd"] is True


def test_protocol_precision_fields_keep_every_pinned_hash():
    """The later fields are hashed only when they differ from their defaults: every earlier result stays
    comparable; declaring TF32 makes another protocol."""
    from rapm_bench.eval.protocols import PROTOCOLS

    base = PROTOCOLS["tiny"]  # fp32 throughout: the hash of the record before these fields existed
    assert base.vae_precision == base.feature_precision == "fp32"
    assert "vae_precision" not in base.canonical_json() and "feature_precision" not in base.canonical_json()
    for field in ("vae_precision", "feature_precision"):
        for value in ("tf32", "bf16"):
            assert replace(base, **{field: value}).hash() != base.hash()
    coco = PROTOCOLS["coco30k"]
    assert coco.vae_precision == coco.feature_precision == "tf32" and '"vae_precision":"tf32"' in coco.canonical_json()
    with pytest.raises(ValueError, match="vae_precision"):
        replace(base, vae_precision="fp8")


def test_vae_decoder_precisions_on_the_sdxl_architecture():
    """The VAE decode in fp32 equals the plain decode; TF32 is fp32 on the CPU; bf16 stays within a few levels."""
    from rapm_bench.bench import build_sdxl_vae, uint8_difference
    from rapm_bench.worlds.sdxl import VAEDecoder

    vae = build_sdxl_vae(True, torch.device("cpu"))
    dec = VAEDecoder(vae)
    assert dec.precision == "tf32"  # `generate`'s default; `eval` sets the protocol's
    dec.precision = "fp32"
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    plain = (plain / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(dec(latents), plain)
    dec.precision = "tf32"
    assert torch.equal(dec(latents), plain)
    dec.channels_last = True
    assert uint8_difference(dec(latents), plain)["max"] <= 1
    dec.precision, dec.channels_last = "bf16", False
    d = uint8_difference(dec(latents), plain)
    assert d["max"] <= 16 and d["mean"] < 2
    assert dec.network() is not vae and next(dec.network().parameters()).dtype == torch.bfloat16


def test_vae_decode_is_compiled_on_a_gpu_only_and_never_in_fp32():
    """`VAEDecoder.compiled()`: a GPU, a precision other than fp32 and `compile` on; the CPU decodes eagerly."""
    from rapm_bench.bench import build_sdxl_vae
    from rapm_bench.worlds.sdxl import VAEDecoder

    dec = VAEDecoder(build_sdxl_vae(True, torch.device("cpu")))
    assert dec.compile and not dec.compiled()  # the CPU
    if torch.cuda.is_available():
        dec = VAEDecoder(build_sdxl_vae(True, torch.device("cuda")))
        assert dec.compiled()
        dec.precision = "fp32"
        assert not dec.compiled() and dec.network() is dec.vae


@pytest.mark.gpu
@cuda
def test_compiled_vae_decode_is_within_one_level_of_eager_and_compiles():
    """The compiled TF32 decode: within one level of the eager TF32 decode on under 10 % of the values, the fp32
    decode still the VAE itself; it compiles (dynamo graphs) even when its first call is under FLOP counting."""
    from torch._dynamo.utils import counters

    from rapm_bench.bench import build_sdxl_vae, uint8_difference
    from rapm_bench.perf.measure import count_flops
    from rapm_bench.worlds.sdxl import VAEDecoder

    dec = VAEDecoder(build_sdxl_vae(True, torch.device("cuda")))
    latents = torch.randn(2, 4, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    dec.compile = False
    eager = dec(latents)
    dec.compile = True
    torch._dynamo.reset()  # a decode compiled earlier in this process (same shapes) would be reused
    graphs = counters["stats"]["unique_graphs"]
    assert count_flops(lambda: dec(latents)) > 0  # eager under the counter, and no skipped frame after it
    compiled = dec(latents)
    assert counters["stats"]["unique_graphs"] > graphs
    d = uint8_difference(compiled, eager)
    assert d["max"] <= 1 and d["changed_share"] < 0.10, d
    dec.precision = "fp32"
    assert dec.network() is dec.vae


@pytest.mark.gpu
@cuda
def test_decoded_images_reach_the_host_through_pinned_memory_unchanged():
    """On a GPU the decode's images come back in pinned host memory, equal to a pageable copy; a CPU tensor as is.
    Host tensors reach the GPU through pinned memory unchanged, and may be changed as soon as the call returns."""
    from rapm_bench.bench import build_sdxl_vae
    from rapm_bench.transfer import host_copy, to_device, to_pinned_host
    from rapm_bench.worlds.sdxl import VAEDecoder

    t = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, device="cuda")
    host = to_pinned_host(t)
    assert host.is_pinned() and torch.equal(host, t.cpu())
    assert to_pinned_host(host.clone()).device.type == "cpu"
    wait = host_copy(t * 2)  # the product's kernel is queued before the copy; the wait covers both
    assert torch.equal(wait(), (t * 2).cpu())
    x = torch.randn(1 << 20)
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):  # keep the GPU busy, so that the copy waits in the queue
        big = big @ big / 64
    on_gpu = to_device(x, "cuda")
    expected = x.clone()
    x.zero_()  # the caller's tensor changes at once: the copy read the pinned copy, not x
    assert torch.equal(on_gpu.cpu(), expected) and to_device(x, "cpu") is x
    dec = VAEDecoder(build_sdxl_vae(True, torch.device("cuda")))
    dec.compile = False
    assert dec(torch.randn(2, 4, 32, 32, device="cuda")).is_pinned()
    dec.pinned_host = False
    assert not dec(torch.randn(2, 4, 32, 32, device="cuda")).is_pinned()


@pytest.mark.gpu
@cuda
def test_a_queued_generation_batch_never_waits_for_the_gpu():
    """Once warm (graphs captured, blocks compiled), queuing a DDIM batch (encode, noise, four UNet passes, the
    finiteness check, the decode, the copies back) makes no synchronising call (torch's sync debug mode raises on
    one); a stream of batches gives the images one batch at a time gives."""
    from rapm_bench.cudagraphs import graphed_predict
    from rapm_bench.generate import _collect, _queue, generate_batch, generate_batches
    from rapm_bench.perf.worlds import RandomSDXLWorld
    from rapm_bench.sampling import DDIM_TRAILING

    world = RandomSDXLWorld(True, torch.device("cuda"), torch.bfloat16, seed=0)
    world.set_vae_precision("tf32")
    jobs = [([f"prompt {i}", f"prompt {i + 1}"], [i, i + 1]) for i in range(0, 8, 2)]
    with graphed_predict(world):
        one_by_one = [generate_batch(world, p, s, DDIM_TRAILING, 4, 1.0) for p, s in jobs]  # warm-up too
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            queued = _queue(world, *jobs[0], DDIM_TRAILING, 4, 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(_collect(*queued), one_by_one[0])
        streamed = list(generate_batches(world, jobs, DDIM_TRAILING, 4, 1.0))
    assert all(torch.equal(a, b) for a, b in zip(streamed, one_by_one, strict=True))


def test_adamw_is_fused_on_a_gpu_only_and_resumes_across_implementations():
    """The engine's AdamW: the CPU's default implementation on the CPU; a fused optimiser's state loads into a
    default one (and back) with each keeping its own implementation and the same update."""
    from rapm_bench.distill.optim import adamw, load_optimizer

    p = torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(0)))
    opt = adamw([p], 1e-2, (0.9, 0.99), 0.0, "cpu")
    assert not opt.param_groups[0]["fused"]
    p.grad = torch.ones(5)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    fused = torch.optim.AdamW([q], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, fused=True)  # a GPU run's state
    load_optimizer(fused, copy.deepcopy(opt.state_dict()))  # copies: a checkpoint's tensors are its own
    assert fused.param_groups[0]["fused"]
    load_optimizer(opt, copy.deepcopy(fused.state_dict()))
    assert not opt.param_groups[0]["fused"]
    p.grad = q.grad = torch.full((5,), 0.5)
    opt.step()
    fused.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fused_adamw_step_reaches_the_merged_lora_weights():
    """A fused step (a GPU run's; the CPU has the fused kernel too) must reach FastLoRA's merged weights, which are
    cached by the parameters' version counters: torch's fused kernel leaves them alone, the engine's AdamW bumps
    them, so the next merged pass runs W + s·B·A of the updated A and B."""
    from rapm_bench.distill.optim import AdamW
    from rapm_bench.fastlora import FastLoRA

    layer = torch.nn.Sequential(torch.nn.Linear(6, 6))
    lora = FastLoRA(layer, 1, targets=("0",), seed=0, mode="merged")
    params = lora.parameters()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    opt = AdamW(params, lr=0.1, fused=True)
    with torch.no_grad():
        before = layer(x)  # builds and caches W'
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after = layer(x)
        lora.layers["0"].drop_cache()  # a rebuilt W', from the updated A and B
        rebuilt = layer(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, rebuilt, rtol=0, atol=0)


# --- CUDA: graphs replay the eager kernels -------------------------------------------------------------------
@pytest.mark.gpu
@cuda
def test_graphed_predict_equals_eager():
    """A replayed UNet call equals the eager one; another input shape captures another graph."""
    from rapm_bench.cudagraphs import Graphed

    world = small_world("cuda")
    cond = world.encode_prompts(["a red circle", "a blue square"])
    g = Graphed(world.predict)
    for step in range(3):
        x = torch.randn(2, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        t = torch.tensor([999 - 100 * step, 500], device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(g(x, t, cond), world.predict(x, t, cond), rtol=0, atol=0)
    assert g.replays == 3 and len(g.graphs) == 1
    with torch.no_grad():
        g(torch.zeros(1, 3, 32, 32, device="cuda"), torch.tensor([10], device="cuda"),
          {k: v[:1] for k, v in cond.items()})
    assert len(g.graphs) == 2
    x = torch.randn(2, 3, 32, 32, device="cuda", requires_grad=True)
    g(x, torch.tensor([1, 2], device="cuda"), cond).sum().backward()  # grad on: eager, differentiable
    assert x.grad is not None and g.replays == 4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("merged_lora", "grad", "blocks"),
                         [(True, False, False), (False, False, False), (True, True, False), (True, True, True)])
def test_fast_iterations_equal_eager(merged_lora, grad, blocks):
    """Three RAPM iterations (optimiser steps between) with the no-grad passes graphed and merged (and with
    `grad`, the gradient passes graphed too, forward and backward: FastLoRA merged; with `blocks`, each UNet block
    compiled by inductor as well) equal the eager path's losses and gradients within round-off: the graphs see
    every update of the LoRA (in place, refreshed)."""
    from rapm_bench import regions
    from rapm_bench.distill.objectives import fast_grad, fast_nograd

    results = []
    for fast in (False, True):
        world = small_world("cuda")
        loss, params, heads = rapm_loss(world, merged_lora)
        if fast:
            assert not blocks or regions.compile_blocks(world.unet) > 0
            assert fast_nograd(loss, world) and (not grad or fast_grad(loss, world))
        # SGD: Adam's first updates are lr·sign(g), so round-off in a near-zero gradient would flip one
        opt = torch.optim.SGD([*params, *[p for h in heads for p in h.parameters()]], lr=1e-2)
        run = []
        for _ in range(3):
            run.append(run_terms(loss, params, heads, world, 4))
            opt.step()
        if fast:
            assert loss.nograd_student.replays > 0 and loss.real_features.replays > 0
            assert not grad or (loss.grad_student.replays == 3 and loss.grad_features.replays == 3)
        results.append(run)
    for a, b in zip(*results, strict=True):
        assert_near_terms(a, b, 5e-3)


@pytest.mark.gpu
@cuda
def test_rapm_iteration_never_synchronises_the_stream():
    """After a first iteration (graph captures, the schedule's device tables), a RAPM iteration on the fast paths
    (roll-out, relative targets, the discriminator, both backward passes) and an optimiser step make no host-device
    synchronisation: each one drained the GPU's queue, which then waited on the host (issue 14)."""
    from rapm_bench.distill.objectives import fast_grad, fast_nograd

    world = small_world("cuda")
    loss, params, heads = rapm_loss(world, True)
    assert fast_nograd(loss, world) and fast_grad(loss, world)
    z_tilde, z_delta = trajectory("cuda")
    cond = world.encode_prompts(["a red circle in the centre"])
    head_params = [p for h in heads for p in h.parameters()]
    opt = torch.optim.SGD([*params, *head_params], lr=1e-2)

    def iteration(seed: int) -> None:
        for t in loss.chunks(z_tilde, z_delta, cond, torch.Generator("cuda").manual_seed(seed), 4):
            t.g_loss.backward(inputs=list(params))
            t.d_loss.backward(inputs=head_params)
        opt.step()

    for seed in range(2):
        iteration(seed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        iteration(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert loss.nograd_student.replays > 0 and loss.grad_student.replays == 3


def test_take_is_list_indexing():
    """`take` (a slice and a flip for a chunk's consecutive slots) is indexing by the list, also for other lists."""
    from rapm_bench.distill.rapm import slot_chunks, take

    x = torch.randn(7, 3)
    for chunk in (1, 2, 3, 4, 7):
        for slots in slot_chunks(7, chunk):
            assert torch.equal(take(x, slots), x[slots])
    assert torch.equal(take(x, [5, 1, 3]), x[[5, 1, 3]])


@pytest.mark.gpu
@cuda
def test_grad_graphed_input_gain_equals_eager():
    """The bench's plain variant: the gradient of a scalar gain on the input, through a graphed UNet call
    (forward and backward replayed), equals the eager gradient over three calls."""
    from rapm_bench.cudagraphs import GradGraphed

    world = small_world("cuda")
    cond = world.encode_prompts(["a red circle", "a blue square"])
    gain = torch.nn.Parameter(torch.ones((), device="cuda"))

    def student(x, t, c):
        return world.predict(x * gain, t, c)

    g = GradGraphed(student, torch.nn.ParameterList([gain]))
    for step in range(3):
        x = torch.randn(2, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        t = torch.tensor([999 - 100 * step, 500], device="cuda")
        grads = []
        for fn in (student, g):
            gain.grad = None
            (fn(x, t, cond) ** 2).mean().backward()
            grads.append(gain.grad.clone())
        assert grads[0].abs() > 0
        assert abs(float(grads[1] - grads[0])) <= 5e-3 * abs(float(grads[0])), (float(grads[1]), float(grads[0]))
    assert g.replays == 3


def test_fast_grad_is_eager_on_the_cpu():
    """On the CPU `fast_grad` does not apply, and a GradGraphed call is the function itself (differentiable)."""
    from rapm_bench.cudagraphs import GradGraphed
    from rapm_bench.distill.objectives import fast_grad

    world = small_world()
    loss, params, _ = rapm_loss(world, True)
    assert not fast_grad(loss, world) and loss.grad_student is loss.student
    g = GradGraphed(world.predict, world.unet)
    x, t, cond = torch.randn(2, 3, 32, 32), torch.tensor([999, 500]), world.encode_prompts(["a", "b"])
    out = g(x, t, cond)
    torch.testing.assert_close(out, world.predict(x, t, cond), rtol=0, atol=0)
    out.sum().backward(inputs=params)
    assert g.replays == 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("pack", "compiled"), [(True, True), (True, False), (False, False), (False, True)])
def test_graphed_refresh_rebuilds_every_merged_weight(monkeypatch, pack, compiled):
    """On CUDA the rebuild after an optimiser step is one replayed graph; every W' equals the eager rebuild
    (bit for bit with the eager per-layer kernels; within an fp32 rounding with the packed groups' kernels or the
    compiled `merge_into`). Packed, the first refresh already runs from the graph (the caches are the stacks'
    views); unpacked, it builds them eagerly."""
    from rapm_bench import fastlora
    from rapm_bench.fastlora import FastLoRA, refresher

    monkeypatch.setattr(fastlora, "COMPILE_REBUILD", compiled)
    monkeypatch.setattr(fastlora, "TRITON_REBUILD", False)  # the compiled merges (the Triton one: its own test)
    tol = {"rtol": 1e-6, "atol": 1e-7} if compiled or pack else {"rtol": 0, "atol": 0}
    world = small_world("cuda")
    lora = FastLoRA(world.unet, 1, seed=0, mode="merged", pack_weights=pack)
    assert bool(lora.groups) == pack
    refresh = refresher(world.unet)
    refresh()
    first = refresh.replays
    assert first == (1 if pack else 0)
    opt = torch.optim.AdamW(lora.parameters(), lr=0.1)
    for step in range(2):
        for p in lora.parameters():
            p.grad = torch.randn(p.shape, device=p.device, generator=torch.Generator("cuda").manual_seed(step))
        opt.step()
        refresh()
        assert refresh.replays == first + step + 1
        for wrap in lora.layers.values():
            key = wrap._cache_key
            got = wrap.cached()  # up to date: no eager rebuild here
            assert wrap._cache_key == key
            w, a, b = wrap.base.weight, wrap.lora_A.detach(), wrap.lora_B.detach()
            want = torch.addmm(w.reshape(w.shape[0], -1).float(), b, a.reshape(a.shape[0], -1)).view(w.shape)
            torch.testing.assert_close(got[0], want.to(w.dtype), **tol)
            torch.testing.assert_close(got[1], a.to(w.dtype), rtol=0, atol=0)
        refresh()  # fresh: nothing to do
        assert refresh.replays == first + step + 1
    wrap = next(iter(lora.layers.values()))
    wrap.drop_cache()  # unpacked: a new buffer, so the graph is captured again (it writes into the buffers it
    #                   was made with); packed: the same views of the group's stacks again
    wrap.cached()
    for p in lora.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    refresh()
    w, a, b = wrap.base.weight, wrap.lora_A.detach(), wrap.lora_B.detach()
    want = torch.addmm(w.reshape(w.shape[0], -1).float(), b, a.reshape(a.shape[0], -1)).view(w.shape)
    torch.testing.assert_close(wrap.cached()[0], want.to(w.dtype), **tol)
    assert refresh.replays == first + 3
    if compiled:  # compiled, and no fallback to the eager rebuild
        assert fastlora._compiled[fastlora.merge_rank1 if pack else fastlora.merge_into] is not None


@pytest.mark.gpu
@cuda
def test_triton_merge_rank1_is_the_eager_merge():
    """`kernels.merge_rank1_triton` (a packed group's rebuild in one launch) on shapes that end inside a tile and
    on poisoned outputs: W' within one bf16 rounding step of the fp32 sum rounded once (fp32: equal within
    round-off), every element written; s·A and s·B exact."""
    from rapm_bench import kernels

    assert kernels.available(torch.zeros(1, device="cuda"))
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for g, o, k in [(3, 64, 96), (1, 33, 300), (5, 48, 24), (2, 1280, 1157)]:
            w = torch.randn((g, o, k), generator=gen).to("cuda", dtype)
            a = torch.randn((g, 1, k), generator=gen).cuda() * 0.05
            b = torch.randn((g, o, 1), generator=gen).cuda() * 0.05
            out = (torch.full_like(w, float("nan")), torch.full((g, 1, k), float("nan"), dtype=dtype, device="cuda"),
                   torch.full((g, o, 1), float("nan"), dtype=dtype, device="cuda"))
            kernels.merge_rank1_triton(w, a, b, 0.5, *out)
            want = torch.baddbmm(w.float(), b, a, alpha=0.5)
            if dtype == torch.float32:
                torch.testing.assert_close(out[0], want, rtol=1e-6, atol=1e-6)
            else:
                ulp = (out[0].float() - want).abs() / want.abs().clamp_min(1e-30) * 2**7
                assert float(ulp.max()) <= 1.01 and float((out[0] != want.to(dtype)).float().mean()) < 0.01
            assert torch.equal(out[1], (a * 0.5).to(dtype)) and torch.equal(out[2], (b * 0.5).to(dtype))
    with pytest.raises(ValueError, match="contiguous"):
        w = torch.zeros((2, 4, 6), device="cuda")
        kernels.merge_rank1_triton(w, torch.zeros(2, 1, 12, device="cuda")[:, :, ::2], torch.zeros(2, 4, 1,
                                   device="cuda"), 1.0, torch.empty_like(w), torch.empty(2, 1, 6, device="cuda"),
                                   torch.empty(2, 4, 1, device="cuda"))


@pytest.mark.gpu
@cuda
def test_compiled_merges_are_the_eager_merge_in_bf16():
    """The compiled `merge_into` on the SDXL UNet's layer kinds (Linear, 3×3 and 1×1 convolutions, channels_last)
    and the compiled `merge_rank1` on stacked rows (a packed group) in bf16: W' within one bf16 rounding step of
    the eager fp32 addmm rounded once, on few weights; s·A, s·B exact; dynamo compiled both."""
    from torch._dynamo.utils import counters

    from rapm_bench import fastlora

    def check(got: torch.Tensor, want: torch.Tensor, what: object) -> None:
        ulp = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30) * 2**7
        assert float(ulp.max()) <= 1.01 and float((got != want).float().mean()) < 0.01, what

    gen = torch.Generator().manual_seed(0)
    graphs = counters["stats"]["unique_graphs"]
    for shape, rank in [((64, 96), 1), ((32, 16, 3, 3), 1), ((48, 24, 1, 1), 1), ((64, 96), 4)]:
        w = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
        a = torch.randn((rank, *shape[1:]), generator=gen).cuda() * 0.05
        b = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=gen).cuda() * 0.05
        for layout in (torch.contiguous_format, torch.channels_last) if len(shape) == 4 else (torch.contiguous_format,):
            out = (torch.empty_like(w, memory_format=layout), torch.empty_like(a, dtype=w.dtype),
                   torch.empty_like(b, dtype=w.dtype))
            assert fastlora.run_compiled(fastlora.merge_into, w, a, b, 1.0, *out)
            want = torch.addmm(w.reshape(shape[0], -1).float(), b.reshape(shape[0], rank), a.reshape(rank, -1))
            check(out[0], want.view(shape).to(torch.bfloat16), (shape, layout))
            assert torch.equal(out[1], a.to(w.dtype)) and torch.equal(out[2], b.to(w.dtype))
    for g, o, k in [(3, 64, 96), (1, 32, 144), (5, 48, 24)]:
        w = torch.randn((g, o, k), generator=gen).to("cuda", torch.bfloat16)
        a = torch.randn((g, 1, k), generator=gen).cuda() * 0.05
        b = torch.randn((g, o, 1), generator=gen).cuda() * 0.05
        out = (torch.empty_like(w), torch.empty_like(a, dtype=w.dtype), torch.empty_like(b, dtype=w.dtype))
        assert fastlora.run_compiled(fastlora.merge_rank1, w, a, b, 1.0, *out)
        check(out[0], torch.baddbmm(w.float(), b, a).to(torch.bfloat16), (g, o, k))
        assert torch.equal(out[1], a.to(w.dtype)) and torch.equal(out[2], b.to(w.dtype))
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo compiled them (no fall back to eager unseen)


@pytest.mark.gpu
@cuda
def test_engine_fast_paths_equal_eager_on_sdxl(tmp_path, tiny_sdxl):
    """`distill --preset sdxl --lora-impl merged` on the random SDXL pipeline: with every CUDA-graph path on
    (no-grad and gradient passes, the graphed rebuild) and the blocks compiled, the logged losses and gradient norms of 4 iterations
    equal the eager run's (SGD-like regime: lr 1e-4, so that Adam's sign-like first steps stay small)."""
    from rapm_bench.distill.config import resolve_distill
    from rapm_bench.distill.engine import distill

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog on a beach\na bowl of soup\n")
    logs = []
    for fast in (False, True):
        cfg = resolve_distill("sdxl", teacher=str(tiny_sdxl), prompts=str(prompts), num_trajectories=2, iters=4,
                              substeps=2, lr=1e-4, warmup=0, log_every=1, device="cuda", precision="fp32", lora_impl="merged",
                              grad_checkpointing=False, fast_nograd=fast, fast_grad=fast, compile_blocks=fast,
                              sample_every=0,
                              cache_dir=str(tmp_path / "cache"), out=str(tmp_path / f"run{fast}"))
        distill(cfg, progress=False)
        rows = (tmp_path / f"run{fast}" / "train_log.jsonl").read_text().splitlines()
        logs.append([json.loads(r) for r in rows])
    eager, graphed = logs
    assert len(eager) == len(graphed) == 4
    for a, b in zip(eager, graphed, strict=True):
        for k in ("g_loss", "d_loss", "mse_abs", "mse_rel", "grad_norm"):
            # measured on an H200 with the fused AdamW: mse_abs 1.0e-4 relative at the 4th iteration (the graphed
            # kernels' last-bit differences, grown by Adam's normalised first steps); 1e-4 was met before
            assert b[k] == pytest.approx(a[k], rel=3e-4, abs=1e-7), (a["step"], k)


@pytest.mark.gpu
@cuda
def test_graphed_generation_equals_eager_and_ignores_batch_size():
    """Generation inside `graphed_predict` gives the eager images; an image does not depend on its batch."""
    from rapm_bench.cudagraphs import graphed_predict
    from rapm_bench.generate import generate_batch
    from rapm_bench.sampling import DDIM_TRAILING

    world = small_world("cuda")
    prompts, seeds = ["a red circle", "a blue square", "a green triangle", "two stars"], [0, 1, 2, 3]
    eager = generate_batch(world, prompts, seeds, DDIM_TRAILING, 4, 1.0)
    with graphed_predict(world) as g:
        graphed = generate_batch(world, prompts, seeds, DDIM_TRAILING, 4, 1.0)
        singles = torch.cat([generate_batch(world, [p], [s], DDIM_TRAILING, 4, 1.0)
                             for p, s in zip(prompts, seeds, strict=True)])
        assert g is not None and g.replays > 0
    assert "predict" not in vars(world)  # the block restores the method
    assert torch.equal(graphed, eager)
    d = (singles.int() - graphed.int()).abs()
    # cuDNN picks its kernels per batch size: on an H200, 1.5 % of the values move by one level (the CPU: none)
    assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 0.05


def test_compiled_blocks_give_the_eager_losses_and_gradients():
    """Each UNet block compiled (regions.compile_blocks) through dynamo with the `aot_eager` backend (the graph
    breaks at FastLoRA's eager layers and the autograd of the compiled pieces, without inductor's kernels): dynamo
    compiles graphs, and the RAPM losses and the LoRA and head gradients equal the eager ones; uncompiling restores
    the eager blocks (no new graphs)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from rapm_bench import regions

    world = small_world()
    loss, params, heads = rapm_loss(world, True)
    eager = run_terms(loss, params, heads, world, 4)
    assert not regions.compiled(world.unet)
    counter = CompileCounterWithBackend("aot_eager")
    n = regions.compile_blocks(world.unet, backend=counter)
    try:
        assert n == len(regions.blocks(world.unet)) > 0 and regions.compiled(world.unet)
        compiled = run_terms(loss, params, heads, world, 4)
        assert counter.frame_count > 0 and counter.op_count > 0  # the blocks' ops went through dynamo's graphs
    finally:
        regions.uncompile_blocks(world.unet)
    assert not regions.compiled(world.unet)
    frames = counter.frame_count
    run_terms(loss, params, heads, world, 4)
    assert counter.frame_count == frames  # eager again
    assert_close_terms(eager, compiled, 1e-6, 1e-7)


def test_engine_compiles_blocks_only_where_it_applies(monkeypatch):
    """The engine's rule (distill.engine.compile_blocks_here): asked for, a GPU, FastLoRA, no checkpointing, a torch
    that inlines modules (regions.supported)."""
    from rapm_bench import regions
    from rapm_bench.distill.config import distill_preset
    from rapm_bench.distill.engine import compile_blocks_here

    cfg = replace(distill_preset("sdxl"), lora_impl="merged", grad_checkpointing=False)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_blocks_here(cfg, gpu) and not compile_blocks_here(cfg, cpu)
    assert not compile_blocks_here(replace(cfg, compile_blocks=False), gpu)
    assert not compile_blocks_here(replace(cfg, lora_impl="peft"), gpu)
    assert not compile_blocks_here(replace(cfg, grad_checkpointing=True), gpu)
    monkeypatch.setattr(regions, "supported", lambda: False)
    assert not compile_blocks_here(cfg, gpu)



def test_gemm_attention_is_sdpa_in_any_chunking():
    """The VAE's attention as two matrix products (worlds.attention.gemm_attention) = SDPA, in one chunk of queries
    and in several with a remainder."""
    import torch.nn.functional as F

    from rapm_bench.worlds.attention import gemm_attention

    q, k, v = torch.randn(3, 2, 3, 50, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    want = F.scaled_dot_product_attention(q, k, v)
    for max_scores in (2**26, 2 * 3 * 50 * 7):  # everything at once; 7 queries a chunk (8 chunks, the last of 1)
        torch.testing.assert_close(gemm_attention(q, k, v, max_scores), want, rtol=1e-5, atol=1e-6)


def test_gemm_attention_processor_decodes_as_sdpa():
    """`use_gemm_attention` on an SDXL-architecture VAE: both attention layers change processor and the decode equals
    SDPA's within fp32 round-off; a call with a mask or encoder states goes to diffusers' processor unchanged."""
    from diffusers.models.attention_processor import Attention

    from rapm_bench.bench import build_sdxl_vae
    from rapm_bench.worlds.attention import GemmAttnProcessor, use_gemm_attention

    vae = build_sdxl_vae(True, torch.device("cpu"))
    gemm = copy.deepcopy(vae)
    assert use_gemm_attention(gemm) == 2
    assert all(isinstance(m.processor, GemmAttnProcessor) for m in gemm.modules() if isinstance(m, Attention))
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = vae.decode(z, return_dict=False)[0], gemm.decode(z, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    attn = next(m for m in gemm.modules() if isinstance(m, Attention))
    x, ctx = torch.randn(1, 5, attn.query_dim), torch.randn(1, 7, attn.query_dim)
    with torch.no_grad():
        torch.testing.assert_close(attn.processor(attn, x, ctx), attn.processor.fallback(attn, x, ctx))


def test_vae_decoder_uses_gemm_attention_for_tf32_on_a_gpu_only():
    """The CPU's TF32 decode is the VAE itself (fp32 exactly); on a GPU the TF32 copy has the GEMM attention, the
    bf16 and fp32 decodes and `gemm_attention=False` keep SDPA."""
    from diffusers.models.attention_processor import Attention

    from rapm_bench.bench import build_sdxl_vae
    from rapm_bench.worlds.attention import GemmAttnProcessor
    from rapm_bench.worlds.sdxl import VAEDecoder

    def gemm(net: torch.nn.Module) -> bool:
        return any(isinstance(m.processor, GemmAttnProcessor) for m in net.modules() if isinstance(m, Attention))

    dec = VAEDecoder(build_sdxl_vae(True, torch.device("cpu")))
    assert dec.precision == "tf32" and dec.network() is dec.vae and not gemm(dec.vae)
    if torch.cuda.is_available():
        dec = VAEDecoder(build_sdxl_vae(True, torch.device("cuda")))
        dec.compile = False
        assert gemm(dec.network()) and not gemm(dec.vae)
        dec.gemm_attention = False
        assert not gemm(dec.network())
        dec.gemm_attention, dec.precision = True, "bf16"
        assert not gemm(dec.network())


def test_chunked_group_norm_is_group_norm():
    """GroupNorm with its statistics over chunks of each group (worlds.groupnorm) = F.group_norm within fp32
    round-off: 4-D and 3-D inputs, one chunk, several, a group size with no equal split (one chunk), no affine."""
    import torch.nn.functional as F

    from rapm_bench.worlds.groupnorm import chunked_group_norm, chunks

    gen = torch.Generator().manual_seed(0)
    for shape, chunk in (((2, 64, 16, 16), 16), ((2, 64, 16, 16), 10**6), ((1, 32, 7, 5), 8), ((3, 64, 10), 4)):
        x = torch.randn(shape, generator=gen) * 3 + 1
        w, b = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen)
        for weight, bias in ((w, b), (None, None)):
            torch.testing.assert_close(chunked_group_norm(x, 32, weight, bias, 1e-6, chunk),
                                       F.group_norm(x, 32, weight, bias, 1e-6), rtol=1e-5, atol=1e-5)
    assert chunks(2 * 256, 16) == 32 and chunks(35, 8) == 1 and chunks(8 * 1024 * 1024, 65536) == 128


def test_vae_decodes_alike_with_chunked_group_norm():
    """`use_chunked_group_norm` on an SDXL-architecture VAE's decoder: every GroupNorm of it changes and the decode
    equals the plain one's within fp32 round-off; the VAEDecoder gives a GPU's compiled decode the chunked
    statistics only (the CPU's decode is the VAE itself)."""
    from torch import nn

    from rapm_bench.bench import build_sdxl_vae
    from rapm_bench.worlds.groupnorm import use_chunked_group_norm
    from rapm_bench.worlds.sdxl import VAEDecoder

    vae = build_sdxl_vae(True, torch.device("cpu"))
    chunked = copy.deepcopy(vae)
    norms = [m for m in chunked.decoder.modules() if type(m) is nn.GroupNorm]
    assert use_chunked_group_norm(chunked.decoder) == len(norms) > 0
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = vae.decode(z, return_dict=False)[0], chunked.decode(z, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    dec = VAEDecoder(vae)
    assert dec.network() is vae and "forward" not in vars(next(m for m in vae.modules() if type(m) is nn.GroupNorm))


@pytest.mark.gpu
@cuda
def test_tf32_decode_with_gemm_attention_is_as_close_to_fp32_as_sdpa():
    """The TF32 decode with its attention on TF32 tensor cores stays within one level of the exact fp32 decode,
    on about as many values as the TF32 decode through SDPA (compiled, as generation runs it)."""
    from helpers.sdxl import decode_differences

    gemm, sdpa = decode_differences("cuda", {}, {"gemm_attention": False})
    assert gemm["max"] <= 1 and gemm["changed_share"] <= sdpa["changed_share"] + 0.02, (gemm, sdpa)


@pytest.mark.gpu
@cuda
def test_compiled_decode_with_chunked_group_norm_is_as_close_to_fp32():
    """The compiled TF32 decode with the chunked GroupNorm statistics stays within one level of the exact fp32
    decode, on about as many values as with inductor's GroupNorm."""
    from helpers.sdxl import decode_differences

    chunked, plain = decode_differences("cuda", {}, {"chunked_group_norm": False})
    assert chunked["max"] <= 1 and chunked["changed_share"] <= plain["changed_share"] + 0.02, (chunked, plain)


def test_generation_compiles_blocks_where_it_pays(monkeypatch, tmp_path):
    """`regions.pays`: never off a CUDA GPU or on a torch that cannot; --compile-blocks/--no-compile-blocks decide;
    unasked, from the world's `compile_blocks_from` passes on (SDXL), never for the tiny world. `blocks_compiled`
    compiles for its block only and leaves compiled blocks alone; `persist_cache` keeps a set TORCHINDUCTOR_CACHE_DIR."""
    from types import SimpleNamespace

    from rapm_bench import regions
    from rapm_bench.worlds.sdxl import SDXLWorld
    from rapm_bench.worlds.tiny import TinyWorld

    gpu = torch.device("cuda")
    sdxl = SimpleNamespace(device=gpu, compile_blocks_from=SDXLWorld.compile_blocks_from)
    tiny = SimpleNamespace(device=gpu, compile_blocks_from=TinyWorld.compile_blocks_from)
    n = SDXLWorld.compile_blocks_from
    assert regions.pays(sdxl, n) and not regions.pays(sdxl, n - 1) and not regions.pays(sdxl, n, False)
    assert not regions.pays(tiny, 10**9) and regions.pays(tiny, 1, True)
    assert not regions.pays(SimpleNamespace(device=torch.device("cpu"), compile_blocks_from=1), 10**9, True)
    monkeypatch.setattr(regions, "supported", lambda: False)
    assert not regions.pays(sdxl, 10**9, True)

    world = small_world()
    with regions.blocks_compiled(world.unet, False) as k:
        assert k == 0 and not regions.compiled(world.unet)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("RAPM_BENCH_CACHE", str(tmp_path))
    with regions.blocks_compiled(world.unet, True) as k:  # the blocks compile lazily: nothing runs here
        assert k == len(regions.blocks(world.unet)) > 0 and regions.compiled(world.unet)
        import os

        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path.resolve() / "inductor")
        with regions.blocks_compiled(world.unet, True) as inner:
            assert inner == 0
        assert regions.compiled(world.unet)
    assert not regions.compiled(world.unet)
    with regions.blocks_compiled(world.unet, True, regions.WIDE) as k:  # generation's regions
        wide = regions.blocks(world.unet, regions.WIDE)
        assert k == len(wide) > 0 and "Transformer2DModel" in {type(m).__name__ for m in wide}
        assert all(m._compiled_call_impl is not None for m in wide)
    assert not regions.compiled(world.unet)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert regions.persist_cache() == tmp_path / "mine"


def test_generate_config_writes_compile_blocks_only_where_set():
    """A folder written before `compile_blocks` existed still resumes: the field enters config.json only when set."""
    from rapm_bench.config import GenerateConfig, WorldConfig

    cfg = GenerateConfig(world=WorldConfig(), out="x")
    assert "compile_blocks" not in json.loads(cfg.to_json())
    assert json.loads(replace(cfg, compile_blocks=False).to_json())["compile_blocks"] is False


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("classes", ["BLOCKS", "WIDE"])
def test_generation_with_compiled_blocks_is_within_a_level_of_eager(classes):
    """Generation with the UNet's regions compiled (inductor; WIDE as `generate` and `eval` run it, BLOCKS as the
    engine's teacher) and from CUDA graphs: within one level of the eager images on under 5 % of the values."""
    from rapm_bench import regions
    from rapm_bench.cudagraphs import graphed_predict
    from rapm_bench.generate import generate_batch
    from rapm_bench.sampling import DDIM_TRAILING

    world = small_world("cuda")
    prompts, seeds = ["a red circle", "a blue square", "a green triangle", "two stars"], [0, 1, 2, 3]
    eager = generate_batch(world, prompts, seeds, DDIM_TRAILING, 4, 1.0)
    with regions.blocks_compiled(world.unet, True, getattr(regions, classes)) as n, graphed_predict(world):
        compiled = generate_batch(world, prompts, seeds, DDIM_TRAILING, 4, 1.0)
    assert n > 0 and not regions.compiled(world.unet)
    d = (compiled.int() - eager.int()).abs()
    assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 0.05, (int(d.max()), float((d > 0).float().mean()))


def test_wide_regions_compile_each_transformer_whole_and_give_the_eager_output():
    """regions.WIDE (generation's regions, results/bench/probes/probe_regions.py) on the SDXL architecture at
    small widths: the outermost modules of those classes (each Transformer2DModel whole, none of the
    BasicTransformerBlocks inside it), compiled through dynamo with `aot_eager`, give the eager no-grad output exactly;
    uncompiling restores the eager modules, whatever classes were compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from rapm_bench import regions
    from rapm_bench.perf.sdxl import build_unet

    unet = build_unet("small", torch.device("cpu"))
    found = regions.blocks(unet, regions.WIDE)
    names = {type(m).__name__ for m in found}
    assert names == {"ResnetBlock2D", "Transformer2DModel"}
    inner = {id(c) for m in found for c in m.modules() if c is not m}
    assert not any(id(m) in inner for m in found)  # outermost only
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999, 499])
    cond = {"encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.ones(2, 6) * 32}}
    with torch.no_grad():
        eager = unet(x, t, **cond).sample
        counter = CompileCounterWithBackend("aot_eager")
        try:
            assert regions.compile_blocks(unet, backend=counter, classes=regions.WIDE) == len(found)
            assert regions.compiled(unet)
            compiled = unet(x, t, **cond).sample
            assert counter.frame_count > 0
        finally:
            regions.uncompile_blocks(unet)
        assert not regions.compiled(unet)
    assert torch.equal(compiled, eager)
