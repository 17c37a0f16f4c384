"""Metrics as a registry (after EDM2's `metric_specs`): each metric declares its detector, its reference data,
the protocol fields its number depends on and its finalisation (docs/design.md §6).

The eval pass runs every detector the registered metrics name once per group of images and keeps its per-image
rows (`Accumulator`); then each metric's `finalize` turns the rows, its reference and the resamples every
metric shares (one bootstrap draw: `Finish.counts`) into its result fields. A metric's hash
(`Protocol.metric_hash`: the caption spec, the fields it reads, its settings) says which results are comparable
on it (`rapm_bench.report.results.comparable_metrics`).

The shipped metrics (FID, KID, CLIP score, retrieval accuracy) register here; a plug-in adds one with
`register_metric` at run time or as an entry point of the group `rapm_bench.metrics` (a MetricSpec, or a
list of them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError
from . import intervals
from .fid import FeatureStats
from .protocols import Protocol

if TYPE_CHECKING:
    from .scorers import Scorer

BETTER = ("lower", "higher")
GROUP = 64  # images per shard group of the eval pass: also the tiny world's retrieval batch (one group's captions)


@dataclass(frozen=True)
class Detector:
    """A per-image output of the eval pass, computed once per group for every metric that reads it."""

    name: str
    run: Callable[[Scorer, torch.Tensor, list[str]], torch.Tensor]  # (scorer, uint8 NCHW, captions) -> (b,)/(b, D)
    dim: Callable[[Scorer], int | None]  # D; 0 for one number per image; None: this scorer cannot run it
    dtype: torch.dtype = torch.float64  # how its rows are kept
    stats: bool = False  # also accumulate FID's exact float64 running mean and covariance (fid.FeatureStats)


@dataclass
class Accumulator:
    """Everything a shard of the eval pass adds up, per detector; merges exactly.

    Each shard writes a detector's per-image rows at their image indices into zero-filled tensors, so the
    all-reduce sum places every row exactly (x + 0 = x) whatever the number of processes; beside them the float64
    sums of the rows (group by group) and, for FID's features, the exact float64 running statistics.
    """

    detectors: dict[str, Detector]  # by name: the ones this scorer can run
    rows: dict[str, torch.Tensor]  # (n,) or (n, D) per detector
    sums: dict[str, torch.Tensor]  # float64 column sums of the rows per detector
    stats: dict[str, FeatureStats]  # the detectors with running statistics (FID's features)

    @classmethod
    def empty(cls, n: int, used: list[Detector], scorer: Scorer) -> Accumulator:
        """Zero sums and zero-filled rows for n images of every detector in `used` this scorer can run."""
        runs, rows, sums, stats = {}, {}, {}, {}
        for d in used:
            dim = d.dim(scorer)
            if dim is None:
                continue
            runs[d.name] = d
            rows[d.name] = torch.zeros((n, dim) if dim else (n,), dtype=d.dtype)
            sums[d.name] = torch.zeros(dim or 1, dtype=torch.float64)  # (1,) for one number an image
            if d.stats:
                stats[d.name] = FeatureStats(dim)
        return cls(runs, rows, sums, stats)

    def tensors(self, device: torch.device) -> list[torch.Tensor]:
        """Flat tensors for an all-reduce (float64 sums and statistics, the rows in their own dtype)."""
        out = [t for name in self.rows for t in (self.rows[name], self.sums[name])]
        for st in self.stats.values():
            assert st.sum is not None and st.sum_sq is not None
            out += [torch.tensor([st.count], dtype=torch.float64), st.sum, st.sum_sq]
        return [t.to(device) for t in out]

    def load_tensors(self, ts: list[torch.Tensor]) -> None:
        """Inverse of `tensors` after the reduce."""
        it = iter(t.cpu() for t in ts)
        for name in self.rows:
            self.rows[name], self.sums[name] = next(it), next(it)
        for st in self.stats.values():
            st.count, st.sum, st.sum_sq = int(next(it)[0]), next(it), next(it)
            st.device = torch.device("cpu")


@dataclass(frozen=True)
class Finish:
    """What a metric's finalisation reads: the pass's rows and sums, the references, the shared resamples."""

    protocol: Protocol
    n: int
    acc: Accumulator
    references: Mapping[str, Any]  # by metric name (`MetricSpec.reference`'s data)
    device: torch.device

    def rows(self, detector: str) -> torch.Tensor | None:
        """A detector's per-image rows (n,) or (n, D), or None where the scorer could not run it."""
        return self.acc.rows.get(detector)

    def mean(self, detector: str) -> float:
        """The mean of a one-number-per-image detector (its float64 sum, group by group, over n)."""
        return float(self.acc.sums[detector]) / self.n

    @functools.cached_property
    def resamples(self) -> int:
        """Bootstrap resamples, sized by FID's features (its resamples are the costly ones: fewer where they are
        large, intervals.default_resamples), so that a plug-in metric leaves every other interval as it is."""
        features = self.acc.rows.get(FID_FEATURES.name)
        return intervals.default_resamples(self.n, 1 if features is None else features.shape[1])

    @functools.cached_property
    def counts(self) -> torch.Tensor:
        """The one set of multinomial resample counts every metric's interval uses."""
        return intervals.multinomial_counts(self.n, self.resamples, intervals.SEED)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its result key, detector, reference, hashed protocol fields and settings, finalisation."""

    name: str  # its result key ("fid")
    label: str  # its table column ("FID")
    detector: Detector  # the per-image rows it reads
    better: str  # "lower" or "higher"
    fields: tuple[str, ...]  # the Protocol fields its number depends on, beside the caption spec (hashed)
    finalize: Callable[[Finish], dict[str, Any]]  # its result fields; a `bootstrap` dict joins the shared one
    settings: Mapping[str, Any] = field(default_factory=dict)  # its own settings (hashed)
    reference: Callable[[Protocol, Scorer, Path | None], Any] | None = None  # reference data, before the pass
    read: Callable[[dict[str, Any]], float | None] | None = None  # its number in a result; None: result[name]
    cell: Callable[[dict[str, Any]], str] | None = None  # its table cell; None: value [interval]
    tol: float = 0.5  # `check`'s default largest |change|
    digits: int = 2  # table and comparison digits
    scale: float = 1.0  # comparison.md's unit: value × scale, labelled "<label>×<scale_label>"
    scale_label: str = ""
    signed: bool = False  # can fall below 0 (an unbiased estimate): plotted on a symlog axis
    headline: bool = True  # in comparison.md's teacher summary
    always: bool = False  # a table column even where no result holds it (the shipped metrics)

    def value(self, result: Mapping[str, Any]) -> float | None:
        """The metric's number in a result record, None where the result has none."""
        v = self.read(dict(result)) if self.read is not None else result.get(self.name)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    def interval(self, result: Mapping[str, Any]) -> list[float] | None:
        """Its 95 % interval `<name>_ci` in a result, None where there is none."""
        ci = result.get(f"{self.name}_ci")
        ok = isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(x, int | float) for x in ci)
        return list(ci) if ok else None

    @property
    def unit_label(self) -> str:
        """The label with comparison.md's unit ("KID×10³")."""
        return f"{self.label}×{self.scale_label}" if self.scale_label else self.label


# --- the registry --------------------------------------------------------------------------------------------
_BUILTIN: dict[str, MetricSpec] = {}
_registered: dict[str, MetricSpec] = {}
_PROTOCOL_FIELDS = frozenset(f.name for f in dataclasses.fields(Protocol))


def _check(spec: MetricSpec) -> MetricSpec:
    """Refuse a spec the engine or the hash could not use."""
    if not isinstance(spec, MetricSpec):
        raise TypeError(f"{spec!r} is not a MetricSpec")
    unknown = [f for f in spec.fields if f not in _PROTOCOL_FIELDS]
    if unknown:
        raise ValueError(f"metric {spec.name!r} reads unknown protocol fields {', '.join(unknown)}")
    if spec.better not in BETTER:
        raise ValueError(f"metric {spec.name!r}: better must be one of {', '.join(BETTER)}, got {spec.better!r}")
    return spec


@functools.cache
def installed_metrics() -> dict[str, MetricSpec]:
    """The metrics of the installed plug-ins (entry point group `rapm_bench.metrics`), loaded once."""
    from ..plugins import METRICS_GROUP, plugin_entry_points

    found: dict[str, MetricSpec] = {}
    for ep in plugin_entry_points(METRICS_GROUP):
        obj = ep.load()
        for spec in obj if isinstance(obj, list | tuple) else [obj]:
            found[_check(spec).name] = spec
    return found


def metrics() -> dict[str, MetricSpec]:
    """Every known metric by name: the shipped ones, the plug-ins', then those registered at run time."""
    return _BUILTIN | installed_metrics() | _registered


def get_metric(name: str) -> MetricSpec:
    """The metric called `name`, or a one-line error listing the known ones."""
    known = metrics()
    if name not in known:
        raise UserError(f"unknown metric {name!r}; known: {', '.join(known)}")
    return known[name]


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add a metric at run time (it replaces one of the same name); returns it."""
    _registered[_check(spec).name] = spec
    return spec


def unregister_metric(name: str) -> None:
    """Remove a metric registered at run time (tests)."""
    _registered.pop(name, None)


def detectors(specs: list[MetricSpec]) -> list[Detector]:
    """The distinct detectors of these metrics, in order; two different detectors of one name are an error."""
    out: dict[str, Detector] = {}
    for spec in specs:
        d = spec.detector
        if out.setdefault(d.name, d) is not d:
            raise ValueError(f"metric {spec.name!r} declares another detector named {d.name!r}")
    return list(out.values())


def finalize(specs: list[MetricSpec], ctx: Finish) -> dict[str, Any]:
    """Every metric's result fields, the shared `bootstrap` record and `metric_hashes` of those that hold a value."""
    out: dict[str, Any] = {}
    boot = intervals.bootstrap_record(ctx.resamples)
    for spec in specs:
        fields = dict(spec.finalize(ctx))
        boot |= fields.pop("bootstrap", {})
        out |= fields
    out["bootstrap"] = boot
    out["metric_hashes"] = {s.name: ctx.protocol.metric_hash(s) for s in specs if s.value(out) is not None}
    return out


# --- the shipped detectors and metrics -----------------------------------------------------------------------
FID_FEATURES = Detector("fid-features", lambda scorer, images, captions: scorer.features(images),
                        lambda scorer: scorer.feature_dim, torch.float32, stats=True)
CLIP_SCORES = Detector("clip-scores", lambda scorer, images, captions: scorer.clip_scores(images, captions),
                       lambda scorer: 0)
RETRIEVAL_HITS = Detector("retrieval-hits", lambda scorer, images, captions: scorer.retrieval_hits(images, captions),
                          lambda scorer: None if scorer.retriever is None else 0)
FID_FIELDS = ("reference", "eval_resolution", "crop", "resize_filter", "fid_extractor", "fid_weights_sha256",
              "fid_mode", "feature_precision")
CLIP_FIELDS = ("clip_model", "clip_pretrained", "clip_resize", "feature_precision")
BOOTSTRAP = {"interval": "bootstrap percentile", "level": intervals.LEVEL, "seed": intervals.SEED}


def _fid_reference(protocol: Protocol, scorer: Scorer, data_dir: Path | None) -> Any:
    from . import reference

    return reference.reference_stats(protocol, scorer, data_dir)


def _kid_reference(protocol: Protocol, scorer: Scorer, data_dir: Path | None) -> Any:
    from . import reference

    return reference.reference_features(protocol, scorer, data_dir)


def _fid(ctx: Finish) -> dict[str, Any]:
    """FID against the reference statistics (clean-fid's distance), its interval and reliability."""
    from .fid import checked_fid

    stats, ref = ctx.acc.stats[FID_FEATURES.name], ctx.references["fid"]
    point = checked_fid(stats, ref, ("generated", "reference"))
    ref_mean, ref_cov = torch.from_numpy(ref.mean()), torch.from_numpy(ref.cov())
    ci, shift = intervals.fid_interval(ctx.acc.rows[FID_FEATURES.name], ref_mean, ref_cov, ctx.counts,
                                      device=ctx.device)
    return {"fid": point, "fid_reliable": ctx.n >= (stats.dim or 0), "fid_ci": ci, "bootstrap": {"fid_shift": shift}}


def _kid(ctx: Finish) -> dict[str, Any]:
    """KID by torchmetrics on the same features against the reference features."""
    return {"kid": intervals.kid(ctx.acc.rows[FID_FEATURES.name], ctx.references["kid"], device=ctx.device)}


def _mean_metric(name: str, detector: Detector) -> Callable[[Finish], dict[str, Any]]:
    """The finalisation of a per-image mean: the mean and its interval (None where the detector cannot run)."""
    def fin(ctx: Finish) -> dict[str, Any]:
        rows = ctx.rows(detector.name)
        if rows is None:
            return {name: None, f"{name}_ci": None}
        return {name: ctx.mean(detector.name), f"{name}_ci": intervals.mean_interval(rows, ctx.counts)}

    return fin


def _kid_mean(result: dict[str, Any]) -> float | None:
    kid = result.get("kid")
    return kid.get("mean") if isinstance(kid, dict) else None


def _kid_cell(result: dict[str, Any]) -> str:
    """KID as `mean ± std` over its subsets (usual units, not ×1000), a dash for results without it."""
    kid = result.get("kid")
    if not isinstance(kid, dict) or kid.get("mean") is None:
        return "–"
    return f"{kid['mean']:.4f} ± {kid.get('std', 0.0):.4f}"


for _spec in (
    MetricSpec("fid", "FID", FID_FEATURES, "lower", FID_FIELDS, _fid, BOOTSTRAP, _fid_reference, always=True),
    MetricSpec("kid", "KID", FID_FEATURES, "lower", FID_FIELDS, _kid,
               {"subsets": intervals.KID_SUBSETS, "subset_size": intervals.KID_SUBSET_SIZE, "seed": intervals.SEED},
               _kid_reference, read=_kid_mean, cell=_kid_cell, tol=0.005, scale=1e3, scale_label="10³", signed=True,
               always=True),
    MetricSpec("clip_score", "CLIP", CLIP_SCORES, "higher", (*CLIP_FIELDS, "clip_prefix", "clip_scale", "clip_clamp"),
               _mean_metric("clip_score", CLIP_SCORES), BOOTSTRAP, always=True),
    MetricSpec("retrieval_accuracy", "retrieval", RETRIEVAL_HITS, "higher", CLIP_FIELDS,
               _mean_metric("retrieval_accuracy", RETRIEVAL_HITS), BOOTSTRAP | {"group": GROUP}, tol=0.005, digits=3,
               headline=False, always=True),
):
    _BUILTIN[_check(_spec).name] = _spec
