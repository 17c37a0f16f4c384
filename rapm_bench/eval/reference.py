"""A protocol's reference data: its captions in pair order, and its reference FID statistics and per-image features
(COCO: prepared by `rapm-bench data coco`; the tiny protocol: rendered once and cached)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..files import default_cache_dir
from .fid import FeatureStats
from .protocols import Protocol
from .scorers import Scorer


def protocol_captions(protocol: Protocol, data_dir: Path | None) -> list[str]:
    """The protocol's captions in pair order."""
    if protocol.caption_source == "shapes-eval":
        from ..worlds.shapes import eval_captions

        return eval_captions(protocol.num_pairs)
    from .coco import load_pairs, pairs_path

    path = pairs_path(data_dir or default_cache_dir(), protocol)
    if not path.is_file():
        raise UserError(f"no caption pairs for protocol {protocol.name} in {path.parent}: run `rapm-bench data coco "
                        f"--protocol {protocol.name} --annotations captions_val2014.json --images val2014/` first")
    return [p.caption for p in load_pairs(path)]


def reference_stats(protocol: Protocol, scorer: Scorer, data_dir: Path | None) -> FeatureStats:
    """The protocol's reference FID statistics (all its pairs), cached by protocol and weights hash."""
    from ..locks import wait_for
    from .coco import load_reference_stats, stats_path

    path = stats_path(data_dir or default_cache_dir(), protocol, scorer.weights_sha256)
    if path.is_file():
        return load_reference_stats(path)
    if protocol.caption_source != "shapes-eval":
        raise UserError(f"no reference statistics for protocol {protocol.name} ({path} missing): run "
                        f"`rapm-bench data coco --protocol {protocol.name} ...` with the same Inception weights")
    with wait_for(path, "reference statistics"):  # another job building them: wait, then reuse its file
        return load_reference_stats(path) if path.is_file() else _build_tiny_reference(protocol, scorer, data_dir)[0]


def reference_features(protocol: Protocol, scorer: Scorer, data_dir: Path | None) -> torch.Tensor:
    """The protocol's reference per-image FID features (float32, KID needs them), cached beside the statistics."""
    from .coco import features_path, load_reference_features

    path = features_path(data_dir or default_cache_dir(), protocol, scorer.weights_sha256)
    if path.is_file():
        return load_reference_features(path)
    if protocol.caption_source != "shapes-eval":
        raise UserError(f"no reference features for protocol {protocol.name} ({path} missing; caches made before "
                        f"KID hold only statistics): rerun `rapm-bench data coco --protocol {protocol.name} ...` "
                        "with the same Inception weights")
    from ..locks import wait_for
    from .coco import stats_path

    with wait_for(stats_path(data_dir or default_cache_dir(), protocol, scorer.weights_sha256),
                  "reference statistics"):  # the same build writes both files: wait for it, then reuse them
        return load_reference_features(path) if path.is_file() else _build_tiny_reference(protocol, scorer,
                                                                                            data_dir)[1]


def _build_tiny_reference(protocol: Protocol, scorer: Scorer, data_dir: Path | None
                          ) -> tuple[FeatureStats, torch.Tensor]:
    """Render the tiny protocol's reference images once: statistics and per-image features, both cached."""
    from ..worlds.shapes import render_images, split_indices
    from .coco import features_path, save_reference_features, stats_path

    cache = data_dir or default_cache_dir()
    stats = FeatureStats(scorer.feature_dim)
    feats = []
    idx = split_indices("eval", protocol.num_pairs)
    for start in range(0, len(idx), 4096):
        f = scorer.features(render_images(idx[start : start + 4096]))
        stats.update(f)
        feats.append(f.float().cpu())
    features = torch.cat(feats)
    path = stats_path(cache, protocol, scorer.weights_sha256)
    if not path.is_file():  # an existing file holds these same sums: leave it as it is
        stats.save(path)  # atomic: concurrent processes may build the same statistics
    save_reference_features(features_path(cache, protocol, scorer.weights_sha256), features)
    return stats, features
