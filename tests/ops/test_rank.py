"""Rank tools: exact low-rank SVD, energy kept, effective rank, truncated-SVD resize."""

from __future__ import annotations

import torch

from lorakit.ops import LayerFactors, effective_rank, energy_kept, lowrank_svd, resize, singular_values


def _random(out: int = 20, inp: int = 16, r: int = 6, scaling: float = 2.0, seed: int = 0) -> LayerFactors:
    gen = torch.Generator().manual_seed(seed)
    return LayerFactors(a=torch.randn(r, inp, generator=gen), b=torch.randn(out, r, generator=gen), scaling=scaling)


def _with_spectrum(values: list[float], r: int = 8, out: int = 24, inp: int = 20) -> LayerFactors:
    """Rank-``r`` factors whose update has exactly the singular values ``values`` (the rest 0)."""
    gen = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(out, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inp, r, generator=gen, dtype=torch.float64))[0]
    s = torch.tensor(values + [0.0] * (r - len(values)), dtype=torch.float64)
    return LayerFactors(a=v.T.float(), b=(u * s).float(), scaling=1.0)


def test_lowrank_svd_matches_the_svd_of_the_full_update():
    f = _random()
    u, s, vh = lowrank_svd(f)
    torch.testing.assert_close(s, torch.linalg.svdvals(f.delta(torch.float64))[:6], atol=1e-9, rtol=0)
    torch.testing.assert_close((u * s) @ vh, f.delta(torch.float64), atol=1e-9, rtol=0)


def test_effective_rank_of_a_constructed_rank_3_update_is_3():
    f = _with_spectrum([1.0, 1.0, 1.0])
    s = singular_values(f)
    assert effective_rank(s, 0.90) == 3 and effective_rank(s, 0.99) == 3


def test_effective_rank_levels_follow_the_energy():
    s = singular_values(_with_spectrum([10.0, 5.0, 2.0]))  # energies 100, 25, 4: cumulative .775, .969, 1
    assert effective_rank(s, 0.90) == 2 and effective_rank(s, 0.99) == 3
    assert abs(energy_kept(s, 1) - 100 / 129) < 1e-6


def test_zero_update_keeps_all_energy_and_has_effective_rank_0():
    f = LayerFactors(a=torch.randn(4, 6), b=torch.zeros(5, 4), scaling=1.0)
    s = singular_values(f)
    assert energy_kept(s, 1) == 1.0 and effective_rank(s, 0.9) == 0


def test_resize_to_the_full_rank_is_lossless():
    layers = {"l0": _random(seed=1), "l1": _random(r=6, seed=2)}
    new, report = resize(layers, 6, lambda path: 0.25)
    for path, f in layers.items():
        assert new[path].rank == 6 and new[path].scaling == 0.25
        torch.testing.assert_close(new[path].delta(), f.delta(), atol=1e-5, rtol=0)
        assert abs(report[path].energy_kept - 1.0) < 1e-12 and not report[path].padded


def test_resize_down_keeps_the_top_directions_and_reports_their_energy():
    f = _with_spectrum([4.0, 2.0, 1.0, 0.5])
    new, report = resize({"l": f}, 2, lambda path: 1.0)
    assert abs(report["l"].energy_kept - 20 / 21.25) < 1e-6
    torch.testing.assert_close(
        singular_values(new["l"]), torch.tensor([4.0, 2.0], dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_resize_above_the_rank_zero_pads_without_changing_the_update():
    f = _random(r=3)
    new, report = resize({"l": f}, 5, lambda path: 1.0)
    assert new["l"].rank == 5 and report["l"].padded and report["l"].energy_kept == 1.0
    torch.testing.assert_close(new["l"].delta(), f.delta(), atol=1e-5, rtol=0)
    assert torch.all(new["l"].b[:, 3:] == 0) and torch.all(new["l"].a[3:] != 0)  # padded rank can still train
