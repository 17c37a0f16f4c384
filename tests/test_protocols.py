"""Protocols are data: stable hashes that change with any field, one-line errors for unknown names."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from rapm_bench.errors import UserError
from rapm_bench.eval.protocols import PROTOCOLS, Protocol, default_protocol, get_protocol

# Changing a shipped protocol changes every result's protocol_hash: update these on purpose only.
PINNED = {"coco30k": "778fef5a8f12",  # 902329df4b88 until it declared TF32 for its VAE and features (issue 14)
           "dmd2-coco10k": "59dca71e1322", "tiny": "5838daec53b3"}


def test_shipped_hashes_are_pinned() -> None:
    assert {name: p.hash() for name, p in PROTOCOLS.items()} == PINNED


def test_hash_is_stable_across_processes() -> None:
    code = "from rapm_bench.eval.protocols import PROTOCOLS; print(' '.join(p.hash() for p in PROTOCOLS.values()))"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""})
        assert out.stdout.split() == list(PINNED.values())


def _other(value: object, field: str) -> object:
    """A different, still valid value for a field."""
    alternatives = {
        "caption_source": "shapes-eval", "caption_sampling": "dmd2", "reference": "all-val2014",
        "resize_filter": "none", "fid_extractor": "tiny-evaluator", "fid_mode": "none",
        "vae_precision": "bf16", "feature_precision": "bf16",
    }
    if field in alternatives and alternatives[field] != value:
        return alternatives[field]
    if field == "crop":
        return None  # only one valid crop: checked separately
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if value is None:
        return "abc"
    return str(value) + "x"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Protocol)])
def test_hash_changes_with_any_field(field: str) -> None:
    base = get_protocol("coco30k")
    new = _other(getattr(base, field), field)
    if new is None:
        pytest.skip("a single allowed value")
    changed = dataclasses.replace(base, **{field: new})
    assert changed.hash() != base.hash()
    assert dataclasses.replace(changed, **{field: getattr(base, field)}).hash() == base.hash()


def test_unknown_name_is_a_one_line_user_error() -> None:
    with pytest.raises(UserError, match=r"^unknown protocol 'coco5k'; use one of coco30k, dmd2-coco10k, tiny$"):
        get_protocol("coco5k")


def test_defaults_per_preset() -> None:
    assert default_protocol("sdxl").name == "coco30k"
    assert default_protocol("tiny").name == "tiny"
    with pytest.raises(UserError, match="unknown preset 'sd15'; known worlds: tiny, sdxl"):  # the registry's
        default_protocol("sd15")


def test_dmd2_protocol_is_references() -> None:
    p = get_protocol("dmd2-coco10k")
    assert (p.caption_sampling, p.caption_seed, p.num_pairs, p.reference) == ("dmd2", 123, 10_000, "paired")
    assert (p.crop, p.resize_filter, p.eval_resolution, p.fid_mode) == ("center", "lanczos", 512, "clean")
    assert (p.clip_model, p.clip_pretrained, p.clip_resize) == ("ViT-g-14", "laion2b_s12b_b42k", 256)
    assert (p.clip_prefix, p.clip_scale, p.clip_clamp) == ("A photo depicts ", 1.0, False)


def test_coco30k_protocol() -> None:
    p = get_protocol("coco30k")
    assert (p.num_pairs, p.reference, p.eval_resolution, p.resize_filter) == (30_000, "paired", 512, "lanczos")
    assert (p.fid_extractor, p.fid_mode, p.clip_model, p.clip_pretrained) == (
        "clean-fid-inception", "clean", "ViT-g-14", "laion2b_s12b_b42k")
    assert (p.clip_scale, p.clip_prefix) == (100.0, "")


def test_invalid_values_and_num_pairs() -> None:
    with pytest.raises(ValueError, match="resize_filter='bicubic'"):
        dataclasses.replace(get_protocol("coco30k"), resize_filter="bicubic")
    small = get_protocol("tiny").with_num_pairs(100)
    assert small.num_pairs == 100 and small.hash() != get_protocol("tiny").hash()
    with pytest.raises(UserError, match="--num-images must be between 1 and 2000"):
        get_protocol("tiny").with_num_pairs(5000)


def test_protocol_is_frozen_and_json() -> None:
    p = get_protocol("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.num_pairs = 3  # type: ignore[misc]
    assert '"name":"tiny"' in p.canonical_json()
