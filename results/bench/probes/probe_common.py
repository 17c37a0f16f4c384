"""What the probes share: a CUDA-event timer, the compiled TF32 decode timed with one VAEDecoder switch off and on,
and one decode's kernels profiled."""

import os

import torch


def cuda_ms(fn, warm: int = 3, n: int = 10) -> float:
    """Mean milliseconds per call of `fn` over `n` calls, after `warm` untimed ones."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n


def time_decodes(res: dict, switch: str, batches: str, rounds: int = 2, n: int = 6,
                 values: tuple = (False, True)) -> dict:
    """For each batch: the random-weight SDXL VAE's compiled TF32 decode (worlds/sdxl.py VAEDecoder) with
    `switch` at each of `values` (off and on), `rounds` rounds, ms an image and the uint8 difference to the fp32 decode
    into `res`; returns {batch: (decoder, latents, {value: images})}, the decoder left at the last value."""
    from rapm_bench.perf.sdxl import build_vae
    from rapm_bench.perf.stages_eval import uint8_difference
    from rapm_bench.worlds.sdxl import VAEDecoder

    dev = torch.device("cuda")
    decoder = VAEDecoder(build_vae("full", dev))
    runs = {}
    for batch in map(int, os.environ.get("DECODE_BATCHES", batches).split(",")):
        latents = torch.randn(batch, 4, 128, 128, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
        decoder.precision = "fp32"
        reference = torch.cat([decoder(c) for c in latents.split(4)])
        images = {}
        for rnd in range(rounds):
            for on in values:
                decoder.precision = "tf32"
                setattr(decoder, switch, on)
                images[on] = decoder(latents)  # compiles in the first round
                ms = cuda_ms(lambda latents=latents: decoder(latents), warm=2, n=n) / batch
                key = f"decode tf32 batch {batch}, {switch}={on}, round {rnd + 1}"
                res[key] = {"ms_per_image": round(ms, 2)} | uint8_difference(images[on], reference)
                print(key, res[key], flush=True)
        runs[batch] = (decoder, latents, images)
    return runs


def profile_decode(decoder, latents: torch.Tensor, path: str, rows: int = 30) -> None:
    """One call of `decoder` on `latents` (after one untimed call) under the profiler: its kernel table to `path`."""
    from torch.profiler import ProfilerActivity, profile

    decoder(latents)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder(latents)
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90))
