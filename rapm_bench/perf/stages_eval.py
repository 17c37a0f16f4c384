"""The evaluation stages: eval-features (Inception, CLIP), and the precision checks vae-precision and
feature-precision (what bf16 / TF32 move, vs fp32)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..worlds.registry import get_world_spec
from .measure import free_memory
from .stages import Bench
from .worlds import TunedWorld, set_vae_variant

# --- architectures (diffusers / open_clip configs as dicts: nothing is downloaded) ---------------------
CLIP_SMALL: dict[str, Any] = {
    # ViT-g-14's shape (patch 14 at 224 px, mlp ratio 4.3637, 77-token text) with tiny widths
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "mlp_ratio": 4.3637,
                   "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLIP_MODEL = "ViT-g-14"  # the DMD2 protocol's CLIP (open_clip ships its config; weights stay random)


def _decode_latents(world: TunedWorld, n: int, seed: int) -> torch.Tensor:
    """Latents that decode to varied images: random, at the VAE's scale (the decoder divides by the factor)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *world.latent_shape), generator=gen).to(world.device)


def uint8_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max and mean absolute difference of two uint8 image batches, and the share of values that differ."""
    d = (a.to(torch.int16) - b.to(torch.int16)).abs()
    return {"max": int(d.max()), "mean": float(d.float().mean()), "changed_share": float((d > 0).float().mean())}


def stage_vae_precision(b: Bench) -> dict[str, Any]:
    """VAE decode per precision and layout: time per image and the uint8 difference to fp32 (TF32 off)."""
    w, cfg = b.world, b.cfg
    if not hasattr(w.inner, "decoder"):
        return b.stage([], None, note="this world has no VAE (the tiny world decodes by identity)")
    n = cfg.gen.batch
    latents = _decode_latents(w, n, cfg.seed)
    variants = [v for v in cfg.gen.vae_variants if b.device.type == "cuda" or v == "fp32"]
    ms, diffs = [], {}
    reference: torch.Tensor | None = None
    try:
        for vae in ["fp32", *[v for v in variants if v != "fp32"]]:
            precision, layout = set_vae_variant(w, vae), vae.partition("/")[2]
            images = w.decode(latents)
            if reference is None:
                reference = images
            diffs[vae] = uint8_difference(images, reference)
            ms.append(b.measure(f"decode {vae}", lambda: w.decode(latents), "image", n, precision=precision,
                                channels_last="channels_last" in layout, compiled=w.inner.decoder.compiled(), **{f"uint8_{k}": v for k, v in diffs[vae].items()}))
        inside = float(((reference > 0) & (reference < 255)).float().mean()) if reference is not None else None
    finally:
        set_vae_variant(w, "fp32")
    return b.stage(ms, None, images=n, unsaturated_share=inside, differences_vs_fp32=diffs,
                   inputs="random N(0, 1) latents through the random-weight SDXL VAE")


def stage_feature_precision(b: Bench) -> dict[str, Any]:
    """FID and CLIP score computed with TF32 and bf16 feature networks against the same in fp32 (TF32 off)."""
    from ..eval.fid import FeatureStats, fid_from_stats
    from ..precision import compute

    cfg, device = b.cfg, b.device
    gen = torch.Generator().manual_seed(cfg.seed)
    precisions = [p for p in cfg.eval.precisions if device.type == "cuda" or p == "fp32"]
    n = cfg.eval.precision_images
    out: dict[str, Any] = {}
    if get_world_spec(cfg.preset).bench_weights == "shipped" or device.type == "cuda":  # the tiny evaluator: shapes
        from ..eval.tiny_evaluator import load_tiny_evaluator
        from ..worlds.shapes import captions, render_images

        ev = load_tiny_evaluator(device)
        real = render_images(range(n))
        fake = render_images(range(n, 2 * n)).roll(1, dims=-1)  # another set, shifted by a pixel
        text = captions(range(n, 2 * n))
        out["tiny-evaluator"] = _precision_rows(
            precisions, device,
            features=lambda x: ev.image_features(x), real=real, fake=fake,
            clip=lambda: ev.clip_score(fake, text).mean().item() * 100, compute=compute,
            stats=(FeatureStats, fid_from_stats))
    if get_world_spec(cfg.preset).bench_weights == "random":  # SDXL: Inception and ViT-g-14, random weights
        small = cfg.scale == "small"
        inception, clip = build_inception(device), build_clip(small, device)
        size = clip.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        real = torch.randint(0, 256, (n, 3, 299, 299), generator=gen, dtype=torch.uint8)
        fake = torch.nn.functional.avg_pool2d(real.float(), 5, 1, 2).round().to(torch.uint8)  # blurred: FID > 0
        calibrate_batchnorm(inception, (real[:32].to(device).float() - 128) / 128)
        x_clip = torch.randn((min(n, cfg.eval.batch * 4), 3, size, size), generator=gen)
        tokens = torch.randint(0, 49408, (x_clip.shape[0], 77), generator=gen)

        def inception_features(x: torch.Tensor) -> torch.Tensor:
            parts = [inception((c.to(device).float() - 128) / 128).float() for c in x.split(cfg.eval.batch)]
            return torch.cat(parts)

        def clip_score() -> float:
            img = torch.cat([clip.encode_image(c.to(device)).float() for c in x_clip.split(cfg.eval.batch)])
            txt = torch.cat([clip.encode_text(c.to(device)).float() for c in tokens.split(cfg.eval.batch)])
            cos = torch.nn.functional.cosine_similarity(img, txt)
            return float(cos.clamp(min=0).mean() * 100)

        out["inception+clip"] = _precision_rows(precisions, device, features=inception_features, real=real,
                                                fake=fake, clip=clip_score, compute=compute,
                                                stats=(FeatureStats, fid_from_stats))
        del inception, clip
        free_memory(device)
    return b.stage([], None, images=n, networks=out,
                   note="random-weight Inception-v3 and ViT-g-14 (random inputs), and the shipped tiny evaluator "
                        "(shapes renders); each precision's FID and CLIP score beside the fp32 (TF32 off) one")


def _precision_rows(precisions: list[str], device: torch.device, features: Callable[[torch.Tensor], torch.Tensor],
                    real: torch.Tensor, fake: torch.Tensor, clip: Callable[[], float], compute: Any,
                    stats: Any) -> dict[str, Any]:
    """FID(real, fake) and a CLIP score per precision; relative changes against fp32."""
    feature_stats, fid_from_stats = stats
    rows: dict[str, Any] = {}
    for p in precisions:
        with torch.no_grad(), compute(p, device):
            a, c = feature_stats(), feature_stats()
            a.update(features(real).double().cpu())
            c.update(features(fake).double().cpu())
            rows[p] = {"fid": fid_from_stats(a, c), "clip": clip()}
    base = rows.get("fp32")
    for r in rows.values():
        if base is not None:
            r["fid_rel_change"] = abs(r["fid"] - base["fid"]) / max(abs(base["fid"]), 1e-12)
            r["clip_abs_change"] = abs(r["clip"] - base["clip"])
    return rows


def build_inception(device: torch.device) -> nn.Module:
    """torchvision's Inception-v3 (clean-fid's architecture), random weights, pool3 features (2048)."""
    from torchvision.models import inception_v3

    with torch.device(device):
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    net.fc = nn.Identity()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def calibrate_batchnorm(net: nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm statistics from one batch, so random weights give O(1) features (default init: ~1e-8)."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: exactly this batch's statistics
    net.train()
    net(x)
    net.eval()


def build_clip(small: bool, device: torch.device) -> nn.Module:
    """open_clip ViT-g-14 from the config open_clip ships (or its small-width twin), random weights."""
    import open_clip

    cfg = CLIP_SMALL if small else open_clip.get_model_config(CLIP_MODEL)
    with torch.device(device):
        model = open_clip.CLIP(**cfg)
    return model.eval().requires_grad_(False)


def stage_eval_features(b: Bench) -> dict[str, Any]:
    """Feature extraction of one batch per network and precision; inputs already at the network's size."""
    from ..precision import compute

    cfg, device = b.cfg, b.device
    n = cfg.eval.batch
    gen = torch.Generator().manual_seed(cfg.seed)
    from ..eval.protocols import default_protocol

    if default_protocol(cfg.preset).fid_extractor == "tiny-evaluator":  # the world's protocol's networks
        from ..eval.tiny_evaluator import load_tiny_evaluator
        from ..worlds.shapes import eval_captions

        ev = load_tiny_evaluator(device)
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        captions = eval_captions(n)
        ms = [b.measure("fid features", lambda: ev.image_features(images), "image", n),
              b.measure("clip text", lambda: ev.text_embeddings(captions), "caption", n)]
        return b.stage(ms, None, network="tiny evaluator (FID features = its image tower)")
    small = cfg.scale == "small"
    nets = {"inception": build_inception(device), "clip": build_clip(small, device)}
    size = nets["clip"].visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    x_inc = (torch.rand((n, 3, 299, 299), generator=gen) * 255).to(device)
    x_clip = torch.randn((n, 3, size, size), generator=gen).to(device)
    tokens = torch.randint(0, 49408, (n, 77), generator=gen).to(device)
    precisions = [p for p in cfg.eval.precisions if device.type == "cuda" or p == "fp32"]
    calls: dict[str, Callable[[], Any]] = {
        "inception": lambda: nets["inception"]((x_inc - 128) / 128),  # InceptionV3W's input scaling
        "clip-image": lambda: nets["clip"].encode_image(x_clip),
        "clip-text": lambda: nets["clip"].encode_text(tokens),
    }
    ms = []
    try:
        for p in precisions:
            for net_name, fn in calls.items():
                def call(fn: Callable[[], Any] = fn, p: str = p) -> Any:
                    with torch.no_grad(), compute(p, device):
                        return fn()

                ms.append(b.measure(f"{net_name}/{p}", call, "image" if net_name != "clip-text" else "caption", n,
                                    network=net_name, precision=p))
    finally:
        nets.clear()
        free_memory(device)
    return b.stage(ms, None, clip_model=("small " if small else "") + CLIP_MODEL,
                   inputs="random tensors at 299 px (Inception) and 224 px (CLIP): resizing not timed")
