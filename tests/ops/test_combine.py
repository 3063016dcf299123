"""Adapter arithmetic on factors, checked against the formulas and hand-computed small examples."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import IncompatibleAdapterError
from lorakit.ops import LayerFactors, check_compatible, combine_factors, combine_layer, magnitude_trim, random_drop


def _factors(out: int, inp: int, r: int, scaling: float = 1.0, seed: int = 0) -> LayerFactors:
    gen = torch.Generator().manual_seed(seed)
    return LayerFactors(a=torch.randn(r, inp, generator=gen), b=torch.randn(out, r, generator=gen), scaling=scaling)


def _dense(delta: torch.Tensor) -> LayerFactors:
    """Factors whose update is exactly ``delta`` (A = I)."""
    return LayerFactors(a=torch.eye(delta.shape[1]), b=delta.clone(), scaling=1.0)


def test_linear_is_the_weighted_sum_of_updates_with_rank_the_sum_of_ranks():
    fs = [_factors(12, 10, 4, 2.0, seed=1), _factors(12, 10, 2, 0.5, seed=2)]
    out = combine_layer("l", fs, [0.7, -0.3], "linear", None)
    assert out.rank == 6 and out.scaling == 1.0
    expected = 0.7 * fs[0].delta() - 0.3 * fs[1].delta()
    torch.testing.assert_close(out.delta(), expected, atol=1e-6, rtol=0)


def test_svd_at_full_rank_is_lossless_and_truncation_is_the_best_rank_k_approximation():
    fs = [_factors(12, 10, 4, 2.0, seed=1), _factors(12, 10, 3, 0.5, seed=2)]
    exact = 0.5 * fs[0].delta() + 1.5 * fs[1].delta()
    full = combine_layer("l", fs, [0.5, 1.5], "svd", rank=7)
    torch.testing.assert_close(full.delta(), exact, atol=1e-5, rtol=0)
    u, s, vh = torch.linalg.svd(exact.double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    k3 = combine_layer("l", fs, [0.5, 1.5], "svd", rank=3)
    assert k3.rank == 3
    torch.testing.assert_close(k3.delta(torch.float64), best, atol=1e-5, rtol=0)


def test_svd_rank_defaults_to_the_largest_input_rank_as_in_peft():
    fs = [_factors(8, 8, 4, seed=1), _factors(8, 8, 2, seed=2)]
    assert combine_layer("l", fs, [1, 1], "svd", None).rank == 4


def test_magnitude_trim_keeps_the_top_density_fraction():
    d = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    torch.testing.assert_close(magnitude_trim(d, 0.5), torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    assert magnitude_trim(d, 1.0) is d


def test_ties_hand_computed_example():
    d1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])  # trimmed to 50%: [[3, 0], [0, 2]]
    d2 = torch.tensor([[5.0, -4.0], [1.0, 0.1]])  # trimmed to 50%: [[5, -4], [0, 0]]
    # elected sign of the trimmed sum [[8, -4], [0, 2]]: [[+, -], [+, +]]; weights 1 and 0.5
    # disjoint mean: [0,0] (1*3 + 0.5*5) / 2 = 2.75; [0,1] 0.5*-4 / 1 = -2; [1,0] nothing agrees -> 0; [1,1] 2
    out = combine_layer("l", [_dense(d1), _dense(d2)], [1.0, 0.5], "ties", rank=2, density=0.5)
    torch.testing.assert_close(out.delta(), torch.tensor([[2.75, -2.0], [0.0, 2.0]]), atol=1e-5, rtol=0)


def test_ties_frequency_sign_counts_signs_not_magnitudes():
    d1, d2, d3 = torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[-10.0]])
    fs = [_dense(d1), _dense(d2), _dense(d3)]
    total = combine_layer("l", fs, [1, 1, 1], "ties", rank=1, density=1.0, majority_sign="total")
    freq = combine_layer("l", fs, [1, 1, 1], "ties", rank=1, density=1.0, majority_sign="frequency")
    torch.testing.assert_close(total.delta(), torch.tensor([[-10.0]]))
    torch.testing.assert_close(freq.delta(), torch.tensor([[1.0]]))


def test_dare_drops_with_probability_1_minus_density_and_rescales_the_rest():
    d = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    dropped = random_drop(d, 0.3, torch.Generator().manual_seed(1))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.03
    torch.testing.assert_close(dropped[kept], d[kept] / 0.3)


def test_dare_linear_hand_computed_with_the_same_seeded_masks():
    from lorakit.ops.combination import layer_seed

    d1, d2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[-1.0, 0.5], [2.0, -3.0]])
    gen = torch.Generator().manual_seed(layer_seed(7, "layer"))
    m1 = torch.bernoulli(torch.full((2, 2), 0.5), generator=gen)
    m2 = torch.bernoulli(torch.full((2, 2), 0.5), generator=gen)
    expected = 0.6 * d1 * m1 / 0.5 + 0.4 * d2 * m2 / 0.5
    out = combine_layer("layer", [_dense(d1), _dense(d2)], [0.6, 0.4], "dare_linear", rank=2, density=0.5, seed=7)
    torch.testing.assert_close(out.delta(), expected, atol=1e-5, rtol=0)


def test_dare_with_density_1_is_the_plain_weighted_sum():
    fs = [_factors(6, 5, 2, seed=1), _factors(6, 5, 2, seed=2)]
    out = combine_layer("l", fs, [0.7, 0.3], "dare_linear", rank=4, density=1.0)
    torch.testing.assert_close(out.delta(), 0.7 * fs[0].delta() + 0.3 * fs[1].delta(), atol=1e-5, rtol=0)


def test_dare_masks_of_a_layer_do_not_depend_on_the_other_layers():
    a = {"x": _factors(6, 5, 2, seed=1), "y": _factors(6, 5, 2, seed=3)}
    b = {"x": _factors(6, 5, 2, seed=2)}
    both = combine_factors([a, b], [1, 1], "dare_linear", rank=2, density=0.5, seed=3)
    alone = combine_factors([{"x": a["x"]}, b], [1, 1], "dare_linear", rank=2, density=0.5, seed=3)
    torch.testing.assert_close(both["x"].delta(), alone["x"].delta())


def test_a_layer_only_one_adapter_has_gets_only_its_update():
    a = {"x": _factors(6, 5, 2, seed=1), "y": _factors(4, 5, 3, seed=3)}
    b = {"x": _factors(6, 5, 2, seed=2)}
    out = combine_factors([a, b], [0.5, 2.0], "linear")
    assert list(out) == ["x", "y"]
    torch.testing.assert_close(out["y"].delta(), 0.5 * a["y"].delta(), atol=1e-6, rtol=0)


def test_different_shapes_name_the_layer():
    a = {"model.layers.0.q_proj": _factors(6, 5, 2)}
    b = {"model.layers.0.q_proj": _factors(6, 7, 2)}
    with pytest.raises(IncompatibleAdapterError, match=r"model\.layers\.0\.q_proj.*\(6, 5\).*\(6, 7\)"):
        check_compatible([a, b], ["first", "second"])


def test_dare_ties_with_density_1_is_ties_without_trimming():
    fs = [_factors(6, 5, 2, seed=1), _factors(6, 5, 2, seed=2), _factors(6, 5, 3, seed=4)]
    dare = combine_layer("l", fs, [0.7, 0.3, 1.0], "dare_ties", rank=5, density=1.0)
    ties = combine_layer("l", fs, [0.7, 0.3, 1.0], "ties", rank=5, density=1.0)
    torch.testing.assert_close(dare.delta(), ties.delta())


def test_svd_default_rank_is_the_largest_over_all_layers_so_every_layer_gets_it():
    a = {"x": _factors(6, 5, 4, seed=1), "y": _factors(6, 5, 2, seed=3)}
    b = {"y": _factors(6, 5, 2, seed=2)}
    out = combine_factors([a, b], [1, 1], "svd")
    assert out["x"].rank == 4 and out["y"].rank == 4
