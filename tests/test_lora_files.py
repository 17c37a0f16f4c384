"""LoRA files from the internet: pickles are read weights-only, code-carrying ones refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from rapm_bench.errors import UserError
from rapm_bench.lora import read_lora_file, resolve_lora_path

MARK = Path("/tmp/rapm-bench-pwned")


class Evil:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {MARK}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    MARK.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"unet.x.lora_A.weight": Evil()}, f)
    with pytest.raises(UserError, match="refused|cannot read"):
        read_lora_file(path)
    assert not MARK.exists(), "the pickle's code ran"


def test_plain_tensor_pickle_is_read(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"unet.a.lora_A.weight": torch.ones(1, 4)}, path)
    assert torch.equal(read_lora_file(path)["unet.a.lora_A.weight"], torch.ones(1, 4))


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("missing.safetensors", None, "not found"),
    ("weights.txt", b"hello", "unknown suffix"),
    ("broken.safetensors", b"\x00\x01garbage", "cannot read"),
])
def test_bad_lora_files(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        read_lora_file(path)


def test_folder_with_several_weight_files_is_ambiguous(tmp_path):
    for n in ("a.safetensors", "b.safetensors"):
        (tmp_path / n).write_bytes(b"")
    with pytest.raises(UserError, match="exactly one"):
        resolve_lora_path(tmp_path)


def test_saved_lora_bytes_do_not_depend_on_metadata_order(tmp_path):
    """safetensors writes its metadata in hash-map order, which changes between processes: save_lora sorts the
    header, so equal weights and metadata give the same file (and sha256) in every process."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    code = ("import sys, torch; from pathlib import Path; from rapm_bench.lora import save_lora\n"
            "state = {'down_blocks.0.attn.to_q.lora_A.weight': torch.arange(8.).view(2, 4)}\n"
            "save_lora(Path(sys.argv[1]), state, 2, metadata={'b': '1', 'a': '2', 'rapm_bench': '{}'})\n")
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for f in files:  # separate processes: separate hash seeds
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, timeout=120)
    assert len({f.read_bytes() for f in files}) == 1
    assert load_file(str(files[0]))["unet.down_blocks.0.attn.to_q.lora_A.weight"].tolist()[1] == [4.0, 5.0, 6.0, 7.0]
