"""Update diagnostics: per-layer spectra and the low-rank / uses-all-of-its-rank verdict."""

from __future__ import annotations

import torch

from lorakit.ops import LayerFactors, diagnose
from lorakit.ops.spectrum import EMPTY, LOW_RANK, MODERATE, SATURATED


def _layer(values: list[float], r: int, seed: int = 0) -> LayerFactors:
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(32, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(24, r, generator=gen, dtype=torch.float64))[0]
    s = torch.tensor(values + [0.0] * (r - len(values)), dtype=torch.float64)
    return LayerFactors(a=v.T.float(), b=(u * s).float(), scaling=1.0)


def test_a_rank_16_adapter_using_2_directions_is_low_rank_and_suggests_r_2():
    report = diagnose({f"l{i}": _layer([5.0, 3.0], 16, seed=i) for i in range(3)}, source="ad")
    assert report.verdict == LOW_RANK and report.suggested_rank == 2
    assert all(s.effective_rank_90 == 2 and s.verdict == LOW_RANK for s in report.layers)
    assert "resize --rank 2" in report.summary


def test_an_adapter_with_a_flat_spectrum_uses_all_of_its_rank():
    report = diagnose({f"l{i}": _layer([1.0] * 8, 8, seed=i) for i in range(3)}, source="ad")
    assert report.verdict == SATURATED and "larger r" in report.summary
    assert all(s.effective_rank_90 == 8 and s.effective_rank_99 == 8 for s in report.layers)


def test_a_half_used_rank_is_moderate():
    assert diagnose({"l": _layer([1.0] * 4, 8)}).verdict == MODERATE


def test_an_untrained_adapter_is_empty():
    report = diagnose({"l": LayerFactors(a=torch.randn(4, 6), b=torch.zeros(5, 4), scaling=2.0)}, source="ad")
    assert report.verdict == EMPTY and "never trained" in report.summary


def test_relative_norm_uses_the_frobenius_norm_of_the_update():
    f = _layer([3.0, 4.0], 4)  # ||dW||_F = 5
    report = diagnose({"l": f}, base_norms={"l": 10.0})
    assert abs(report.layers[0].delta_norm - 5.0) < 1e-5 and abs(report.layers[0].relative_norm - 0.5) < 1e-6
    assert report.to_dict()["layers"][0]["verdict"] == report.layers[0].verdict


def test_low_rank_with_one_wide_layer_does_not_suggest_the_current_rank():
    layers = {f"l{i}": _layer([5.0, 3.0], 16, seed=i) for i in range(4)}
    layers["wide"] = _layer([1.0] * 12, 16, seed=9)
    report = diagnose(layers, source="ad")
    assert report.verdict == LOW_RANK and report.suggested_rank is None and "rank_pattern" in report.summary
