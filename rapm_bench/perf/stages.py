"""The stages that time the pipeline: matmul, unet-forward, rapm-iteration, trajectories, generate."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..fastlora import FastLoRA
from ..worlds.base import Cond
from ..worlds.registry import get_world_spec
from .config import BenchConfig, RapmVariant, parse_variant
from .measure import Measurement, count_flops, free_memory, measure
from .worlds import TunedWorld, build_world, compiled_unet, set_channels_last, set_sdpa, set_vae_variant

STREAMED = 4  # batches a `generate` measurement runs in a row (generate.generate_batches: an eval group at batch 16)

# --- the run context ---------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every stage needs: the config, device, peak and (lazily) the world."""

    cfg: BenchConfig
    device: torch.device
    peak_tflops: float | None
    _world: TunedWorld | None = None

    @property
    def world(self) -> TunedWorld:
        """The preset's world, built on first use."""
        if self._world is None:
            self._world = build_world(self.cfg, self.device)
        return self._world

    def measure(self, name: str, fn: Callable[[], Any], unit: str, units: int, warmup: int | None = None,
                min_repeats: int = 1, **extra: Any) -> Measurement:
        """`measure` with this run's device, repeats (at least `min_repeats`) and warm-up."""
        from ..generate import oom_hint

        free_memory(self.device)
        warm = self.cfg.warmup if warmup is None else warmup
        with oom_hint(f"timing {name!r}", "the stages finished before it are kept: rerun with --resume and a smaller "
                      "--gen-batch / --traj-batch, or --stages without this one"):
            return measure(name, fn, self.device, max(self.cfg.repeats, min_repeats), warm, unit, units, **extra)

    def distill_config(self) -> Any:
        """The distill preset whose iteration is benchmarked."""
        from ..distill.config import distill_preset

        return distill_preset(self.cfg.preset)

    def stage(self, ms: list[Measurement], headline: str | None, **extra: Any) -> dict[str, Any]:
        """A stage's JSON: its measurements' rows and which one is the headline."""
        return {"variants": [m.row(self.peak_tflops) for m in ms], "headline": headline, **extra}


def headline_row(stage: dict[str, Any]) -> dict[str, Any] | None:
    """The stage's headline measurement row."""
    return next((r for r in stage["variants"] if r["name"] == stage["headline"]), None)


# --- stages ------------------------------------------------------------------------------------------------
def stage_matmul(b: Bench) -> dict[str, Any]:
    """bf16 n³ matrix product (fp32 on the CPU): the measured ceiling beside the table's peak."""
    n = b.cfg.matmul_size if b.device.type == "cuda" else min(b.cfg.matmul_size, 1024)
    dtype = torch.bfloat16 if b.device.type == "cuda" else torch.float32
    gen = torch.Generator(b.device).manual_seed(b.cfg.seed)
    x = torch.randn(n, n, device=b.device, dtype=dtype, generator=gen)
    y = torch.randn(n, n, device=b.device, dtype=dtype, generator=gen)
    m = b.measure(f"{n}^3 {str(dtype).removeprefix('torch.')}", lambda: x @ y, "product", 1, min_repeats=10)
    return b.stage([m], m.name)


def _unet_inputs(world: TunedWorld, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, Cond]:
    """Latents, timesteps and conditioning for one UNet call."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *world.latent_shape), generator=gen).to(world.device)
    t = torch.full((batch,), 499, device=world.device)
    return x, t, world.encode_prompts([f"bench prompt {i}" for i in range(batch)])


def stage_unet_forward(b: Bench) -> dict[str, Any]:
    """Plain no-grad UNet passes: each batch size, the CFG pair as two calls, and the optimisations undone."""
    w, opts = b.world, b.cfg.opts
    ms: list[Measurement] = []

    def run(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> Callable[[], Any]:
        return torch.no_grad()(lambda: w.predict(x, t, cond))

    def timed(name: str, fn: Callable[[], Any], batch: int) -> Measurement:
        return b.measure(name, fn, "image", batch, min_repeats=10)  # cheap calls: 10 timed calls at least

    with compiled_unet(w, opts.compile, bool(opts.compile_blocks)):
        for batch in b.cfg.forward.batches:
            ms.append(timed(f"batch {batch}", run(*_unet_inputs(w, batch, b.cfg.seed)), batch))
    x, t, cond = _unet_inputs(w, 2, b.cfg.seed)
    w.calls_per_batch = 2
    ms.append(timed("batch 2 as two calls (no CFG batching)", run(x, t, cond), 2))
    w.calls_per_batch = 1
    big = max(b.cfg.forward.batches)  # the other switches where the GPU, not the launch queue, is the limit
    x, t, cond = _unet_inputs(w, big, b.cfg.seed)
    unet = w.unet
    set_sdpa(unet, not opts.sdpa)
    ms.append(timed(f"batch {big}, sdpa {'off' if opts.sdpa else 'on'}", run(x, t, cond), big))
    set_sdpa(unet, opts.sdpa)
    set_channels_last(unet, not opts.channels_last)
    w.opts = replace(opts, channels_last=not opts.channels_last)
    ms.append(timed(f"batch {big}, channels_last {'off' if opts.channels_last else 'on'}", run(x, t, cond), big))
    set_channels_last(unet, opts.channels_last)
    w.opts = opts
    return b.stage(ms, f"batch {b.cfg.forward.batches[0]}")


@dataclass
class RapmSetup:
    """One RAPM iteration's moving parts (engine.distill phases 2 and 4)."""

    loss_fn: Any
    params: list[nn.Parameter]  # what backward runs into
    opt_params: list[nn.Parameter]  # what the optimiser steps and the clipping reads (FastLoRA: one tensor)
    head_params: list[nn.Parameter]
    optimizers: list[torch.optim.Optimizer]
    z_tilde: torch.Tensor
    z_delta: torch.Tensor
    cond: Cond  # the prompt's encoding, made once (the engine encodes each trajectory's prompt once and keeps it)
    chunk: int
    grad_clip: float
    seed: int
    cleanup: Callable[[], None]


def rapm_setup(world: TunedWorld, dcfg: Any, variant: RapmVariant, seed: int) -> RapmSetup:
    """Student (LoRA or none), discriminator heads, loss and optimisers as `engine.distill` builds them."""
    from ..cudagraphs import GradGraphed
    from ..distill.discriminator import EncoderFeatures, build_heads, feature_channels
    from ..distill.engine import ADAPTER
    from ..distill.objectives import fast_grad, fast_nograd
    from ..distill.optim import adamw
    from ..distill.rapm import LossWeights, RAPMLoss
    from ..distill.schedule import SlotSchedule
    from ..lora import attach_lora

    unet, device = world.unet, world.device
    if variant.ckpt:
        unet.enable_gradient_checkpointing()
    cleanups: list[Callable[[], None]] = [unet.disable_gradient_checkpointing] if variant.ckpt else []
    if variant.blocks and device.type == "cuda":  # as the engine: the CPU path stays eager (like /graphs)
        from .. import regions

        regions.compile_blocks(unet)
        cleanups.append(lambda: regions.uncompile_blocks(unet))
    student: Callable[..., torch.Tensor] = world.predict
    if variant.lora == "peft":
        params = attach_lora(unet, dcfg.rank, dcfg.lora_targets, ADAPTER, dcfg.seed)
        opt_params = params
        cleanups.append(unet.unload_lora)
    elif variant.lora in ("fast", "merged"):  # FastLoRA; "merged": gradient passes through W + s·B·A too
        lora = FastLoRA(unet, dcfg.rank, dcfg.lora_targets, dcfg.seed, merge_nograd=variant.merged,
                        mode="merged" if variant.lora == "merged" else "unmerged")
        params = lora.backward_inputs()  # A and B, and the token a graphed backward is reached through
        opt_params = lora.master_parameters()  # as the engine: one tensor for the optimiser and the clipping
        cleanups.append(lora.remove)
    else:  # no LoRA: the same passes with the gradient going to the student's input (a scalar gain)
        # a Parameter, so that the ParameterList GradGraphed differentiates into holds this very tensor (a plain
        # tensor would be wrapped in a new Parameter, and backward(inputs=[gain]) would skip the UNet's backward)
        gain = nn.Parameter(torch.ones((), device=device))
        params = opt_params = [gain]

        def student(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            return world.predict(x * gain, t, cond)

    sched = SlotSchedule(world.alphas_cumprod, dcfg.slots, dcfg.substeps)
    cond = world.encode_prompts(["bench prompt"])  # once: the engine keeps each trajectory prompt's encoding
    rc = dcfg.method("rapm")  # RAPM's settings (distill/rapm_config.py)
    weights = LossWeights(rc.lambda_abs, rc.lambda_rel, rc.lambda_reg, rc.distance, rc.huber_c)
    features = EncoderFeatures(world) if rc.adversarial else None
    heads_abs = heads_rel = None
    head_params: list[nn.Parameter] = []
    if features is not None:
        channels = feature_channels(features, cond)
        heads_abs, heads_rel = build_heads(channels, dcfg.disc_hidden, dcfg.seed, device)
        head_params = [*heads_abs.parameters(), *heads_rel.parameters()]
    loss_fn = RAPMLoss(student, sched, world.noise_schedule.prediction_type, weights, features, heads_abs, heads_rel)
    if variant.graphs:
        fast_nograd(loss_fn, world)
    if variant.grad_graphs and fast_grad(loss_fn, world) and variant.lora == "plain":
        loss_fn.grad_student = GradGraphed(student, nn.ParameterList(params))  # the gain is what trains
    optimizers = [adamw(opt_params, dcfg.lr, dcfg.betas, dcfg.weight_decay, device)]  # the engine's (fused on a GPU)
    if head_params:
        optimizers.append(adamw(head_params, dcfg.disc_lr, dcfg.betas, 0.0, device))
    gen = torch.Generator().manual_seed(seed)
    shape = world.latent_shape
    z_tilde = torch.randn((dcfg.slots + 1, *shape), generator=gen).to(device)
    z_delta = torch.randn((dcfg.slots, *shape), generator=gen).to(device)

    def cleanup() -> None:
        for fn in reversed(cleanups):
            fn()

    return RapmSetup(loss_fn, params, opt_params, head_params, optimizers, z_tilde, z_delta, cond,
                     variant.chunk or dcfg.slot_chunk, dcfg.grad_clip, dcfg.seed, cleanup)


def rapm_iteration(world: TunedWorld, s: RapmSetup, step: int) -> None:
    """One iteration as `engine.distill` step 4 runs it: roll-out, chunked backward, clip, update."""
    from ..distill.engine import derived_seed

    gen = torch.Generator(world.device).manual_seed(derived_seed(s.seed, "step", step))
    for opt in s.optimizers:
        opt.zero_grad(set_to_none=True)
    for terms in s.loss_fn.chunks(s.z_tilde, s.z_delta, s.cond, gen, s.chunk):
        if terms.g_loss is not None:
            terms.g_loss.backward(inputs=s.params)
        if terms.d_loss is not None:
            terms.d_loss.backward(inputs=s.head_params)
    torch.nn.utils.clip_grad_norm_(s.opt_params, s.grad_clip if s.grad_clip > 0 else math.inf)
    for opt in s.optimizers:
        opt.step()


def engine_variant(b: Bench) -> RapmVariant:
    """The RAPM variant `rapm-bench distill` runs with the distill preset on this device (the stage's headline)."""
    from ..distill.engine import compile_blocks_here

    dcfg, opts = b.distill_config(), b.cfg.opts
    ckpt = dcfg.grad_checkpointing
    if ckpt is None:  # auto: what the engine would choose on this device
        from ..distill.memory import choose_checkpointing

        ckpt = choose_checkpointing(dcfg, b.world)[0]
    graphs = bool(dcfg.fast_nograd) and b.device.type == "cuda"
    impl = opts.lora or dcfg.lora_impl
    return RapmVariant(impl, ckpt, impl == "merged" or (impl == "fast" and opts.lora is not None and opts.merge_lora),
                       graphs=graphs,  # the engine's "fast" runs its no-grad passes through the low-rank branch too
                       grad_graphs=graphs and bool(dcfg.fast_grad) and impl == "merged" and not ckpt,
                       blocks=compile_blocks_here(replace(dcfg, grad_checkpointing=ckpt, lora_impl=impl), b.device))


def stage_rapm_iteration(b: Bench) -> dict[str, Any]:
    """One RAPM iteration per variant; each LoRA variant's time over the plain one with the same checkpointing."""
    dcfg, opts = b.distill_config(), b.cfg.opts
    variants = [parse_variant(v, opts.merge_lora) for v in b.cfg.rapm.variants]
    ms: list[Measurement] = []
    for v in variants:
        s = rapm_setup(b.world, dcfg, v, b.cfg.seed)
        try:
            steps = iter(range(10**9))
            ms.append(b.measure(v.name, lambda s=s, it=steps: rapm_iteration(b.world, s, next(it)), "iteration", 1,
                                warmup=max(int(v.blocks), min(b.cfg.warmup, 1 if v.graphs
                                                              else get_world_spec(b.cfg.preset).bench_rapm_warmup)),
                                # the counted call warms up, but eagerly: graphs are captured and blocks compiled
                                # in the warm-up
                                lora=v.lora, grad_checkpointing=v.ckpt, graphs=v.graphs, grad_graphs=v.grad_graphs,
                                blocks=v.blocks,
                                merged_nograd=v.merged and v.lora in ("fast", "merged"),
                                merged_grad=v.lora == "merged",
                                slot_chunk=s.chunk,
                                lora_params=sum(p.numel() for p in s.opt_params) if v.lora != "plain" else 0))
        finally:
            s.cleanup()
            del s
    def same(m: Measurement) -> tuple[Any, ...]:
        return (m.extra["grad_checkpointing"], m.extra["slot_chunk"], m.extra["graphs"], m.extra["grad_graphs"],
                m.extra["blocks"])

    plain = {same(m): m.median for m in ms if m.extra["lora"] == "plain"}
    for m in ms:  # over the plain variant with the same checkpointing, chunking and no-grad path
        base = plain.get(same(m))
        m.extra["vs_plain"] = None if base is None else m.median / base
    want = engine_variant(b)
    ckpt = want.ckpt
    names = [m.name for m in ms]
    headline = want.name if want.name in names else next((n for n in names if not n.startswith("plain")), names[0])
    flat = dcfg.flat()  # config.json's names: RAPM's fields unprefixed
    return b.stage(ms, headline, objective={k: flat[k] for k in (
        "slots", "substeps", "slot_chunk", "rank", "distance", "lambda_abs", "lambda_rel", "lambda_reg",
        "disc_hidden", "grad_checkpointing", "fast_nograd", "fast_grad", "compile_blocks")},
        engine_grad_checkpointing=ckpt)


def stage_trajectories(b: Bench) -> dict[str, Any]:
    """One batch of teacher trajectories (`teacher_trajectories`): N·M CFG DDIM sub-steps, replayed from CUDA graphs
    where the engine replays them (its headline), and without graphs."""
    from ..cudagraphs import graphed_predict
    from ..distill.schedule import SlotSchedule
    from ..distill.trajectories import teacher_trajectories
    from ..sampling import cfg_denoiser

    dcfg, w, batch = b.distill_config(), b.world, b.cfg.traj.batch
    guidance = w.default_guidance if dcfg.guidance is None else dcfg.guidance
    engine = engine_variant(b)
    blocks = b.cfg.opts.compile_blocks
    if blocks is None:  # as the engine: its teacher passes run compiled blocks where its iterations do
        blocks = engine.blocks
    blocks = blocks and b.device.type == "cuda"  # elsewhere eager (compiled_unet)
    graphs = engine.graphs  # as the engine (fast_nograd, a GPU): the teacher's CFG passes replay CUDA graphs
    sched = SlotSchedule(w.alphas_cumprod, dcfg.slots, dcfg.substeps)
    prompts = [f"bench prompt {i}" for i in range(batch)]
    seeds = range(b.cfg.seed, b.cfg.seed + batch)
    calls = dcfg.slots * dcfg.substeps  # CFG UNet calls per trajectory batch
    x, t, cond = _unet_inputs(w, batch, b.cfg.seed)
    step = cfg_denoiser(w, cond, guidance)
    ms = []
    w.calls_per_batch = 1 if b.cfg.opts.cfg_batch else 2
    name = "cfg batched" if b.cfg.opts.cfg_batch else "cfg two calls"
    run = lambda: teacher_trajectories(w, prompts, seeds, guidance, sched)  # noqa: E731
    try:
        with compiled_unet(w, b.cfg.opts.compile, blocks), torch.no_grad():
            step_flops = count_flops(lambda: step(x, t[0]))  # eager (a graph's replay has no ops to count)
            if graphs:  # the engine's path first (the headline); a graph is captured in the warm-up call
                with graphed_predict(w):
                    ms.append(b.measure(f"{name}, graphs", run, "trajectory", batch, warmup=1, count=False))
            # the counted CFG step warmed the UNet up, but eagerly (measure.count_flops): compiled code compiles in
            # a warm-up call
            ms.append(b.measure(name, run, "trajectory", batch, warmup=int(b.cfg.opts.compile or blocks),
                                count=False))
    finally:
        w.calls_per_batch = 1
    ms = [replace(m, flops=step_flops * calls) for m in ms]
    return b.stage(ms, ms[0].name, guidance=guidance, slots=dcfg.slots, substeps=dcfg.substeps, compiled_blocks=blocks,
                   graphs=graphs, unet_calls_per_batch=calls * (1 if b.cfg.opts.cfg_batch else 2), unet_batch=2 * batch)


def _random_lora_b(unet: nn.Module, seed: int, std: float = 0.02) -> None:
    """Give a freshly attached LoRA non-zero B weights (attach_lora starts at B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * std)


def stage_generate(b: Bench) -> dict[str, Any]:
    """The student recipe (`generate_batch`: DDIM trailing, 4 steps, guidance 1, decode): LoRA merged or not, the
    UNet eager or from CUDA graphs, the VAE in each precision, and a bigger batch."""
    from ..cudagraphs import graphed_predict
    from ..distill.engine import ADAPTER
    from ..eval.protocols import default_protocol
    from ..generate import generate_batch, generate_batches
    from ..lora import attach_lora
    from ..regions import WIDE, pays
    from ..sampling import DDIM_TRAILING

    cfg, w, dcfg = b.cfg, b.world, b.distill_config()
    protocol_vae = default_protocol(cfg.preset).vae_precision
    cuda = b.device.type == "cuda"
    # as `generate` and `eval` at the estimate's image count, unless --compile-blocks/--no-compile-blocks
    blocks = pays(w, cfg.gen.images * cfg.gen.steps, cfg.opts.compile_blocks)

    def runner(batch: int) -> Callable[[], torch.Tensor]:
        prompts = [f"bench prompt {i}" for i in range(batch)]
        seeds = list(range(cfg.seed, cfg.seed + batch))
        return lambda: generate_batch(w, prompts, seeds, DDIM_TRAILING, cfg.gen.steps, 1.0)

    def streamer(batch: int) -> Callable[[], int]:
        """STREAMED batches in a row as `generate` and `eval` run them: each queued before the last is waited for."""
        jobs = [([f"bench prompt {k * batch + i}" for i in range(batch)],
                 list(range(cfg.seed + k * batch, cfg.seed + (k + 1) * batch))) for k in range(STREAMED)]
        return lambda: sum(1 for _ in generate_batches(w, jobs, DDIM_TRAILING, cfg.gen.steps, 1.0))

    run, n = runner(cfg.gen.batch), cfg.gen.batch
    ms = []
    w.set_vae_precision("fp32", channels_last=False)
    with compiled_unet(w, cfg.opts.compile, blocks, WIDE):  # generation's regions
        ms.append(b.measure("teacher weights, no LoRA", run, "image", n))
    attach_lora(w.unet, dcfg.rank, dcfg.lora_targets, ADAPTER, dcfg.seed)
    _random_lora_b(w.unet, cfg.seed)
    try:
        ms.append(b.measure("LoRA unmerged (peft)", run, "image", n))
        w.unet.fuse_lora()
        with compiled_unet(w, cfg.opts.compile, blocks, WIDE):
            ms.append(b.measure("LoRA merged", run, "image", n))
        if cuda:
            with compiled_unet(w, False, blocks, WIDE), graphed_predict(w):
                for vae in cfg.gen.vae_variants:
                    set_vae_variant(w, vae)
                    ms.append(b.measure(f"LoRA merged, graphs, VAE {vae}", run, "image", n, warmup=1))
                set_vae_variant(w, protocol_vae + ("/channels_last" if cfg.gen.vae_channels_last else ""))
                # FLOPs per image do not depend on the batch: the batch-n count scaled, not counted again (counting
                # runs the decode eagerly: at batch 16 its per-image fp16 scaling outgrew an 80 GiB H100)
                counted = next(m.flops for m in ms if m.name == "LoRA merged")
                for big in cfg.gen.big_batches:
                    ms.append(b.measure(f"LoRA merged, graphs, VAE {protocol_vae}, batch {big}", runner(big),
                                        "image", big, warmup=2, flops=counted and round(counted / n * big),
                                        flops_from=f"LoRA merged, batch {n}, scaled to {big}"))
                for big in cfg.gen.big_batches[-1:]:  # a run of many batches: the host queues one ahead of the GPU
                    ms.append(b.measure(f"LoRA merged, graphs, VAE {protocol_vae}, batch {big}, {STREAMED} streamed",
                                        streamer(big), "image", big * STREAMED, warmup=1,
                                        flops=counted and round(counted / n * big * STREAMED),
                                        flops_from=f"LoRA merged, batch {n}, scaled to {big * STREAMED}"))
        w.unet.unfuse_lora()
    finally:
        w.unet.unload_lora()
        set_vae_variant(w, "fp32")
    names = [m.name for m in ms]
    layout = "/channels_last" if cfg.gen.vae_channels_last else ""
    best = [f"LoRA merged, graphs, VAE {protocol_vae}, batch {big}{more}" for big in cfg.gen.big_batches[-1:]
            for more in (f", {STREAMED} streamed", "")]  # a 30K run is a stream of batches
    headline = next((x for x in [*best, f"LoRA merged, graphs, VAE {protocol_vae}{layout}"] if x in names),
                    "LoRA merged" if cfg.opts.merge_lora else "LoRA unmerged (peft)")
    return b.stage(ms, headline, steps=cfg.gen.steps, guidance=1.0, resolution=w.image_size,
                   protocol_vae_precision=protocol_vae, compiled_blocks=blocks)
