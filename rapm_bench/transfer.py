"""Host <-> GPU copies that do not wait for the GPU's queue (issue 14: batches of generation pipelined).

A copy between pageable host memory and a GPU (`t.to("cuda")`, `t.cpu()`) waits until every kernel queued before
it has run, so the host cannot prepare the next batch while the GPU still works on this one. Through pinned memory
the copy is queued like a kernel instead: `to_device` returns at once, `host_copy` returns a function that waits
for its own copy alone (a CUDA event), not for work queued after it. On the CPU both are plain copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t.to(device)`; a host tensor goes to a GPU through pinned memory, queued on the current stream.

    The pinned copy's memory is not reused before the transfer has run (torch's caching host allocator records
    the stream's use of it), so `t` may be dropped or changed right after the call."""
    device = torch.device(device)
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_copy(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start `t.cpu()`; the returned function waits for that copy alone and returns the host tensor.

    On a GPU the copy goes into pinned memory (a pageable copy of a batch of 16 SDXL images ran at ~2 GB/s on an
    H100, 25 ms: results/bench/profiles/profile-vae-half-bounded-b16-h100.txt), queued on the current stream behind
    the kernels that make `t`; kernels queued after it do not delay the wait."""
    if not t.is_cuda:
        host = t.cpu()
        return lambda: host
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))

    def wait() -> torch.Tensor:
        done.synchronize()
        return host

    return wait


def to_pinned_host(t: torch.Tensor) -> torch.Tensor:
    """`t.cpu()`, for a CUDA tensor through pinned memory (`host_copy`, waited for at once)."""
    return host_copy(t)()
