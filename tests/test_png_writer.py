"""`generate.PngWriter`: PNGs written by threads are the serial writes' bytes; errors surface; nothing half-written."""

from __future__ import annotations

import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rapm_bench.files import TMP_SUFFIX, atomic_write_bytes
from rapm_bench.generate import PngWriter, png_bytes, png_ok

N_FILES = 8000


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 24 + 8 * (i % 3), 40), generator=gen, dtype=torch.uint8) for i in range(n)]


def test_threads_write_the_serial_bytes(tmp_path):
    images = _images(12)
    with PngWriter(threads=3, pending=2) as pngs:  # pending < images: write() waits for the oldest
        for i, img in enumerate(images):
            pngs.write(tmp_path / f"{i:06d}.png", img)
    for i, img in enumerate(images):
        assert (tmp_path / f"{i:06d}.png").read_bytes() == png_bytes(img)
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}"))


def test_a_writers_error_is_raised(tmp_path):
    (tmp_path / "not-a-folder").write_text("a file")
    pngs = PngWriter(threads=2)
    pngs.write(tmp_path / "ok.png", _images(1)[0])
    pngs.write(tmp_path / "not-a-folder" / "x.png", _images(1)[0])  # its parent is a file
    with pytest.raises(OSError):
        pngs.close()
    assert png_ok(tmp_path / "ok.png")


def test_an_error_in_the_block_leaves_only_complete_files(tmp_path):
    images = _images(40, seed=1)
    with pytest.raises(RuntimeError, match="stop"), PngWriter(threads=2, pending=40) as pngs:
        for i, img in enumerate(images):
            pngs.write(tmp_path / f"{i:06d}.png", img)
        raise RuntimeError("stop")
    for path in tmp_path.iterdir():  # each file there is the complete PNG; queued writes not started are dropped
        assert path.suffix == ".png" and path.read_bytes() == png_bytes(images[int(path.stem)])


def test_atomic_writes_from_threads_keep_the_umask(tmp_path):
    """atomic_write_bytes reads the umask by setting it: threads must neither see nor leave the 0 in between."""
    old, interval = os.umask(0o027), sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes: the unlocked read races at once
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: atomic_write_bytes(tmp_path / f"{i}.bin", b"x"), range(N_FILES)))
        assert os.umask(0o027) == 0o027
    finally:
        sys.setswitchinterval(interval)
        os.umask(old)
    modes = {stat.S_IMODE((tmp_path / f"{i}.bin").stat().st_mode) for i in range(N_FILES)}
    assert modes == {0o640}
