"""The SDXL world: two CLIP text encoders, `time_ids`, a 4-channel VAE latent space.

Precision policy (docs/design.md §8) lives here and nowhere else: text encoders and UNet
in half precision on a GPU (fp32 on the CPU), the VAE always fp32 unless an fp16-fixed
VAE is given, latents and model outputs fp32 outside `predict`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..lora import check_lora_fits, quiet_peft_loader, read_lora_file, to_diffusers_unet_lora
from ..transfer import host_copy, to_device
from .base import Cond, NoiseSchedule, World, pick_device, pick_dtype

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
HOW_TO_GET = (
    f"download it with `huggingface-cli download {SDXL_HUB_ID} --local-dir DIR` "
    "and pass --teacher DIR (or unset HF_HUB_OFFLINE so the hub id can be fetched)"
)

ACTIVATION_GIB_1024 = 9.1  # one latent's UNet gradient pass at 1024 px, bf16: a train step's peak without
#                            checkpointing (13.9 GiB, docs/reference.md) less the frozen weights (4.8 GiB)


def activation_gib(resolution: int) -> float:
    """`World.grad_activation_gib` of an SDXL-architecture UNet at `resolution` px (activations scale with pixels)."""
    return ACTIVATION_GIB_1024 * (resolution / 1024) ** 2


# a compiled TF32 decode's convolutions on fp16 tensor cores (worlds/halfconv.py): "bounded" those reading
# silu(GroupNorm) (no per-image statistic), "everywhere" those and the rest scaled per image (30K eval on an H100
# 58.3 -> 54.9 min, one level of fp32 on 5.4 % of the values against 4.9 %), "" none; a new VAEDecoder's default
# (perf.scaling's --vae-half-convolutions sets it in its worker processes)
HALF_CONVOLUTIONS = "everywhere"
# a compiled TF32 decode's attention products on fp16 tensor cores with power-of-two scales (worlds/attention.py;
# the decode at batch 16 on an H100 33.3 -> 31.4 ms an image, the same uint8 difference to fp32); a new VAEDecoder's
# default (perf.scaling's --no-vae-half-attention clears it in its worker processes)
HALF_ATTENTION = True
# a compiled TF32 decode's upsamplers (nearest 2x, then 3x3) as one 2x2 convolution of the small input
# (worlds/subpixel.py: 4 of the 9 products a value, the repeated input never written); a new VAEDecoder's default.
# Off: on an H100 at batch 16 it made the decode 31.8 -> 36.7 ms an image, the phases' interleave costing more than
# the 2.3 ms of convolutions it saves (results/bench/README.md, fifteenth session)
SUBPIXEL_UPSAMPLE = False


class VAEDecoder:
    """The SDXL VAE decode in a declared precision (precision.COMPUTE_PRECISIONS; the protocol's
    `vae_precision`): "fp32" with TF32 off, "tf32", or a bf16 copy of the VAE; channels_last optional.

    On a GPU the TF32 and bf16 decodes run compiled (`compile`, inductor's fused normalisation and SiLU
    kernels; one graph per batch shape): on an H200 at 1024 px, TF32, 0.064 s an image against 0.108 eager,
    with images within one level of the eager TF32 decode (4.2 % of the values at batch 4), as close to fp32 as
    the eager TF32 decode (one level on 4.7 %). The fp32 decode, the exact one, stays eager. On a GPU the TF32
    decode's attention runs as two TF32 matrix products (worlds/attention.py) instead of SDPA's fp32 kernel, a
    compiled decode's GroupNorm statistics are reduced over chunks of each group (worlds/groupnorm.py), and the
    compiled TF32 decode's convolutions run on fp16 tensor cores with TF32's input precision and power-of-two scales
    (worlds/halfconv.py; HALF_CONVOLUTIONS: those that read silu(GroupNorm) with data-independent scales, the rest
    scaled per image; an H100 at batch 16: 35.2 ms an image against TF32's 50.6, within one level of fp32 on 5.4 % of
    the values against 4.4 %), and so do its attention's two products (`half_attention`, worlds/attention.py). With
    `subpixel_upsample` (SUBPIXEL_UPSAMPLE) the compiled TF32 decode's upsamplers run as 2x2 convolutions of their small
    input (worlds/subpixel.py).
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae
        self.precision = "tf32"  # `generate`'s (PyTorch's default ran TF32 convolutions); `eval`: the protocol's
        self.channels_last = False
        self.compile = True  # compiled TF32/bf16 decodes on CUDA (above); False: eager in every precision
        self.gemm_attention = True  # the TF32 decode's attention as TF32 matrix products on CUDA; False: SDPA
        self.half_attention = HALF_ATTENTION  # those products on fp16 tensor cores when compiled (worlds/attention.py)
        self.chunked_group_norm = True  # a compiled decode's GroupNorm statistics over chunks (worlds/groupnorm.py)
        self.half_convolutions = HALF_CONVOLUTIONS
        self.subpixel_upsample = SUBPIXEL_UPSAMPLE  # the compiled TF32 decode's upsamplers (worlds/subpixel.py)
        self.pinned_host = True  # images to the host through pinned memory on CUDA (a pageable copy: ~2 GB/s, H100)
        self._copies: dict[tuple[str, bool, bool, bool, bool, str, bool, bool], torch.nn.Module] = {}

    def compiled(self) -> bool:
        """Whether this decode runs compiled: a GPU, a precision other than the exact fp32, `compile` on."""
        return self.compile and self.precision != "fp32" and next(self.vae.parameters()).is_cuda

    def network(self) -> torch.nn.Module:
        """The VAE in this precision and memory format (copies made once; the fp32 NCHW eager one is the VAE)."""
        import copy

        from .attention import has_fp32_out_bmm

        cuda = next(self.vae.parameters()).is_cuda
        gemm = self.gemm_attention and self.precision == "tf32" and cuda  # attention on TF32 tensor cores
        chunked = self.chunked_group_norm and self.compiled() and not self.channels_last
        if self.half_convolutions not in ("", "bounded", "everywhere"):
            raise ValueError(f"half_convolutions {self.half_convolutions!r}: one of '', 'bounded', 'everywhere'")
        half = self.half_convolutions if self.precision == "tf32" and self.compiled() else ""
        half_attention = gemm and self.half_attention and self.compiled() and has_fp32_out_bmm()
        subpixel = self.subpixel_upsample and self.precision == "tf32" and self.compiled()
        key = ("bf16" if self.precision == "bf16" else "fp32", self.channels_last, self.compiled(), gemm, chunked, half,
               half_attention, subpixel)
        if key == ("fp32", False, False, False, False, "", False, False) or self.vae.dtype != torch.float32:  # an fp16-fixed VAE: as given
            return self.vae
        if key not in self._copies:
            net = copy.deepcopy(self.vae).to(torch.bfloat16 if key[0] == "bf16" else torch.float32)
            net = net.to(memory_format=torch.channels_last) if key[1] else net
            if gemm:
                from .attention import use_gemm_attention

                use_gemm_attention(net, half=half_attention)
            if chunked:
                from .groupnorm import use_chunked_group_norm

                use_chunked_group_norm(net.decoder)
            if half:
                from .halfconv import use_half_convolutions

                use_half_convolutions(net.decoder, everywhere=half == "everywhere")
            if subpixel:
                from .subpixel import use_subpixel_upsamplers

                use_subpixel_upsamplers(net.decoder, half=half == "everywhere")
            if key[2]:  # the decode path only: post_quant_conv, then the decoder
                from ..regions import persist_cache

                persist_cache()
                net.post_quant_conv.compile(dynamic=False)
                net.decoder.compile(dynamic=False)
            self._copies[key] = net
        return self._copies[key]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> uint8 images (B, 3, H, W) on the CPU (VaeImageProcessor.postprocess's rounding)."""
        return self.start(latents)()

    @torch.no_grad()
    def start(self, latents: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Queue the decode of `latents` and the copy of its images to the CPU; the returned function waits for
        them and returns the uint8 images (`World.decode_start`)."""
        from ..precision import tf32

        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = to_device(torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents.dtype), latents.device)
            std = to_device(torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents.dtype), latents.device)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        net = self.network()
        x = latents.to(net.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with tf32(self.precision == "tf32"):
            image = net.decode(x, return_dict=False)[0].float()
        # [-1, 1] -> [0, 1] -> round(255 x)
        image = (image / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        if self.pinned_host:
            return host_copy(image)
        host = image.cpu()
        return lambda: host


def _load_pipeline(source: str, dtype: torch.dtype) -> Any:
    """StableDiffusionXLPipeline from a local diffusers folder or a hub id (hub cache when offline)."""
    import warnings

    import diffusers
    import transformers
    from diffusers import StableDiffusionXLPipeline

    for lib in (diffusers, transformers):  # our own progress bar and errors say what matters
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    local = Path(source).expanduser()
    looks_local = local.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_local and not (local / "model_index.json").is_file():
        what = "does not exist" if not local.exists() else "is not a diffusers SDXL folder (no model_index.json)"
        raise UserError(f"SDXL teacher {source} {what}: {HOW_TO_GET}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # `torch_dtype` is renamed `dtype` in newer diffusers
            return StableDiffusionXLPipeline.from_pretrained(
                str(local) if looks_local else source,
                torch_dtype=dtype,
                add_watermarker=False,
                local_files_only=looks_local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"),
            )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the SDXL teacher {source!r} ({first}): {HOW_TO_GET}") from None


class SDXLWorld(World):
    """SDXL (or any SDXL-architecture pipeline) behind the world interface."""

    name = "sdxl"
    default_guidance = 5.0  # diffusers' SDXL default CFG scale
    # a cold compile of the no-grad blocks at one batch size takes ~40 s on an H100 and saves ~1.7 ms an image a
    # UNet pass at batch 16 against torch's default eager pass (results/bench/README.md): a few thousand images
    # pay it back; fewer run eagerly
    compile_blocks_from = 16_384

    def __init__(
        self,
        source: str = SDXL_HUB_ID,
        device: str | torch.device | None = None,
        precision: str = "auto",
        resolution: int | None = None,
        vae: str | None = None,
    ) -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        self.source = source
        self.pipe = _load_pipeline(source, self.dtype)
        if vae is not None:  # an fp16-fixed VAE may run in half precision
            from diffusers import AutoencoderKL

            self.pipe.vae = AutoencoderKL.from_pretrained(vae, torch_dtype=self.dtype)
        else:
            self.pipe.vae.to(torch.float32)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet
        self.vae = self.pipe.vae
        self.decoder = VAEDecoder(self.vae)
        self._ids: torch.Tensor | None = None  # `_time_ids`' row on the device (resolution and dtype are fixed)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._resolution = resolution or self.unet.config.sample_size * self.vae_scale
        if self._resolution % self.vae_scale:
            raise UserError(f"--resolution must be a multiple of {self.vae_scale}, got {self._resolution}")
        cfg = self.pipe.scheduler.config
        self.noise_schedule = NoiseSchedule(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            beta_schedule=cfg.beta_schedule,
            prediction_type=cfg.prediction_type,
            rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
        )

    # --- geometry -----------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self._resolution // self.vae_scale
        return (self.unet.config.in_channels, side, side)

    @property
    def image_size(self) -> int:
        return self._resolution

    def grad_activation_gib(self) -> float:
        return activation_gib(self._resolution)

    # --- conditioning -------------------------------------------------------------------
    def _time_ids(self, n: int) -> torch.Tensor:
        """SDXL micro-conditioning: (original size, crop top-left, target size) = (H, W, 0, 0, H, W)."""
        if self._ids is None:  # made once: a tensor built on the GPU from a list waits for the GPU's queue
            side = self._resolution
            ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=self.dtype)
            proj_dim = self.pipe.text_encoder_2.config.projection_dim
            expected = self.unet.add_embedding.linear_1.in_features
            if self.unet.config.addition_time_embed_dim * ids.shape[1] + proj_dim != expected:
                raise UserError("this UNet does not take SDXL time_ids: is the teacher an SDXL pipeline?")
            self._ids = to_device(ids, self.device)
        return self._ids.repeat(n, 1)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`pipe.encode_prompt(prompts, do_classifier_free_guidance=False)`'s prompt and pooled embeddings (no LoRA
        scale, no clip skip): the penultimate hidden states of both text encoders, concatenated, and the second
        encoder's projected output. The token ids go to the GPU through pinned memory (`transfer.to_device`):
        diffusers copies them from pageable memory, which waits for every queued kernel, so that a batch could not
        be encoded while the GPU still ran the previous one (generate.generate_batches)."""
        pipe = self.pipe
        pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        embeds, pooled = [], None
        for tokenizer, encoder in pairs:
            if tokenizer is None:  # an SDXL refiner: the second encoder alone
                continue
            text = pipe.maybe_convert_prompt(prompts, tokenizer)  # textual-inversion tokens, as encode_prompt
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(to_device(ids, encoder.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected output of the encoder that has one
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        if pooled is None:
            raise UserError("this pipeline's text encoders give no pooled embedding: is the teacher an SDXL pipeline?")
        dtype = (pipe.text_encoder_2 if pipe.text_encoder_2 is not None else pipe.unet).dtype
        return torch.concat(embeds, dim=-1).to(dtype=dtype, device=self.device), pooled

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        embeds, pooled = self._encode(prompts)
        return {"prompt_embeds": embeds, "text_embeds": pooled, "time_ids": self._time_ids(len(prompts))}

    @torch.no_grad()
    def negative_cond(self, cond: Cond) -> Cond:
        n = cond["prompt_embeds"].shape[0]
        if self.pipe.config.force_zeros_for_empty_prompt:  # SDXL base: zero embeddings, not ""
            neg = {"prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
                   "text_embeds": torch.zeros_like(cond["text_embeds"])}
        else:
            e, p = self._encode([""] * n)
            neg = {"prompt_embeds": e, "text_embeds": p}
        return neg | {"time_ids": cond["time_ids"]}

    # --- networks -----------------------------------------------------------------------
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        out = self.unet(
            x.to(self.dtype),
            t,
            encoder_hidden_states=cond["prompt_embeds"],
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
            return_dict=False,
        )[0]
        return out.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def decode_start(self, latents: torch.Tensor) -> Callable[[], torch.Tensor]:
        return self.decoder.start(latents)

    # --- LoRA -----------------------------------------------------------------------------
    def load_lora(self, path: Path, adapter_name: str = "default", scale: float = 1.0) -> None:
        state = read_lora_file(path)
        converted, _ = to_diffusers_unet_lora(state, self.pipe.unet.config)
        check_lora_fits(self.pipe.unet, converted, path, "this SDXL teacher")
        try:
            with quiet_peft_loader():
                self.pipe.load_lora_weights(state, adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"LoRA {path} does not fit this SDXL teacher: {str(e).splitlines()[0]}") from None
        if scale != 1.0:
            self.pipe.set_adapters([adapter_name], adapter_weights=[scale])

    def fuse_lora(self) -> None:
        self.pipe.fuse_lora()

    def unload_lora(self) -> None:
        self.pipe.unfuse_lora()
        self.pipe.unload_lora_weights()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"teacher": self.source, "resolution": self._resolution,
                                     "dtype": str(self.dtype).removeprefix("torch.")}
