"""Update diagnostics: per-layer spectra of ``scaling * B A``, effective rank, relative size, and a verdict.

LoRA assumes the weight update of fine-tuning has a low "intrinsic rank" (Hu et al. 2021, sec. 4.1 and 7.2).
The spectrum of the trained update tests that on the user's own task: if 90% of the energy sits in a few
directions (<= r/4), the update is genuinely low-rank and a smaller r would do; if it needs (nearly) all r
directions, the adapter is rank-limited: r may be too small, or the task has left LoRA's comfort zone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from lorakit.ops.factors import LayerFactors
from lorakit.ops.rank import effective_rank, singular_values

LOW_RANK = "low-rank"
SATURATED = "uses all of its rank"
MODERATE = "moderate"
EMPTY = "empty"


@dataclass(frozen=True)
class LayerSpectrum:
    """Diagnostics of one layer's update.

    Attributes:
        path: The module path in the base model.
        rank: The adapter's rank on this layer.
        singular_values: Singular values of ``scaling * B A``, descending.
        effective_rank_90: Smallest k keeping 90% of the energy (0 for a zero update).
        effective_rank_99: Smallest k keeping 99% of the energy.
        delta_norm: ``||scaling * B A||_F``.
        relative_norm: ``||dW||_F / ||W||_F`` against the base weight, None without a base model.
    """

    path: str
    rank: int
    singular_values: list[float]
    effective_rank_90: int
    effective_rank_99: int
    delta_norm: float
    relative_norm: float | None = None

    @property
    def verdict(self) -> str:
        """`LOW_RANK` (90% energy within r/4), `SATURATED` (needs >= 3/4 of r), `MODERATE` or `EMPTY`."""
        return _verdict(self.effective_rank_90, self.rank)


@dataclass(frozen=True)
class AdapterReport:
    """The diagnostics of a whole adapter; ``str(report)`` is the summary, `to_dict` is JSON-ready."""

    layers: list[LayerSpectrum]
    verdict: str
    summary: str
    suggested_rank: int | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        for layer, spectrum in zip(out["layers"], self.layers):
            layer["verdict"] = spectrum.verdict
        return out

    def __str__(self) -> str:
        return self.summary


def _verdict(eff90: int, rank: int) -> str:
    if eff90 == 0:
        return EMPTY
    if eff90 <= rank / 4:
        return LOW_RANK
    if eff90 >= math.ceil(0.75 * rank):
        return SATURATED
    return MODERATE


def layer_spectrum(path: str, f: LayerFactors, base_norm: float | None = None) -> LayerSpectrum:
    """Diagnostics of one layer; ``base_norm`` is ``||W||_F`` of the base weight when known."""
    s = singular_values(f)
    norm = float(s.square().sum().sqrt())
    relative = norm / base_norm if base_norm else None
    return LayerSpectrum(
        path=path,
        rank=f.rank,
        singular_values=[float(v) for v in s],
        effective_rank_90=effective_rank(s, 0.90),
        effective_rank_99=effective_rank(s, 0.99),
        delta_norm=norm,
        relative_norm=relative,
    )


def diagnose(
    layers: Mapping[str, LayerFactors], base_norms: Mapping[str, float] | None = None, source: str = ""
) -> AdapterReport:
    """Spectra of every layer and a verdict for the whole adapter (by the median layer)."""
    spectra = [layer_spectrum(p, f, (base_norms or {}).get(p)) for p, f in layers.items()]
    live = [s for s in spectra if s.effective_rank_90 > 0]
    if not live:
        return AdapterReport(
            spectra,
            EMPTY,
            f"{source}: every update is zero (B = 0): the adapter was never trained "
            "or was saved before its first step; it does nothing.",
            None,
            source,
        )
    fractions = sorted(s.effective_rank_90 / s.rank for s in live)
    median_fraction = statistics.median(fractions)
    ranks = sorted({s.rank for s in live})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    counts = {v: sum(s.verdict == v for s in live) for v in (LOW_RANK, MODERATE, SATURATED)}
    need = max(s.effective_rank_90 for s in live)
    suggested = min(2 ** math.ceil(math.log2(need)), max(ranks))
    head = (
        f"{source}: {len(spectra)} layers, r={rank_text}; 90% of the energy needs a median "
        f"{median_fraction:.0%} of r ({counts[LOW_RANK]} layers low-rank, {counts[MODERATE]} moderate, "
        f"{counts[SATURATED]} use all of their rank)."
    )
    if median_fraction <= 0.25 and suggested < max(ranks):
        verdict = LOW_RANK
        advice = (
            f" The update is genuinely low-rank: r={suggested} would keep 90% of every layer's energy "
            f"(try `lorakit resize --rank {suggested}` and compare the eval metric)."
        )
    elif median_fraction <= 0.25:
        verdict, suggested = LOW_RANK, None
        worst = max(live, key=lambda s: s.effective_rank_90)
        advice = (
            f" Most layers are low-rank, but some need more (e.g. {worst.path}: {need} directions for 90%); keep r, "
            "or give those layers a larger rank with rank_pattern and the others a smaller r."
        )
    elif median_fraction >= 0.75:
        verdict, suggested = SATURATED, None
        advice = (
            " The update uses (nearly) all of its rank: LoRA is rank-limited here. Try a larger r or more target "
            "modules (all-linear); if that keeps happening, the task may need full fine-tuning."
        )
    else:
        verdict, suggested = MODERATE, None
        advice = " The update uses a fair share of its rank; r looks reasonable."
    notes = []
    relative = [s.relative_norm for s in live if s.relative_norm is not None]
    if relative:
        notes.append(f"||dW||/||W||: median {statistics.median(relative):.3g}, max {max(relative):.3g}")
        if max(relative) > 0.5:
            notes.append("some updates are large next to their base weights (> 0.5): check the learning rate")
    return AdapterReport(spectra, verdict, head + advice, suggested, source, notes)
