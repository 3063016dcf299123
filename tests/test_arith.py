"""`lorakit.combine` / `resize_adapter` / `inspect_adapter` on PEFT-format folders, against the formulas and PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from arith_helpers import CONFIGS, ids, logits_with, save_random_adapter  # noqa: E402

import lorakit
from lorakit.arith import combine, inspect_adapter, resize_adapter
from lorakit.io.factor_files import factors_of, read_factors


@pytest.fixture
def adapters(tiny_llama, tmp_path):
    return {k: save_random_adapter(tiny_llama, tmp_path / k, seed=i, **c) for i, (k, c) in enumerate(CONFIGS.items())}


def _sum_of_deltas(paths, weights):
    inputs = [read_factors(p) for p in paths]
    layers = {p for a in inputs for p in a.layers}
    return {p: sum(w * a.layers[p].delta() for a, w in zip(inputs, weights) if p in a.layers) for p in layers}


def test_linear_combination_equals_the_weighted_sum_of_deltas_on_the_loaded_model(tiny_llama, adapters, tmp_path):
    combine([adapters["a"], adapters["b"]], [0.7, -0.3], out=tmp_path / "ab")
    model = copy.deepcopy(tiny_llama)
    lorakit.load_adapter(model, tmp_path / "ab")
    expected = _sum_of_deltas([adapters["a"], adapters["b"]], [0.7, -0.3])
    layers = dict(lorakit.layers.iter_lora_layers(model))
    assert set(layers) == set(expected)  # q from both, v from a, k from b
    for path, delta in expected.items():
        torch.testing.assert_close(layers[path].delta_weight("default"), delta, atol=1e-6, rtol=0)
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 6  # ranks concatenate


def _peft_with(base, paths):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(p, adapter_name=f"a{i}")
    return model.eval()


def test_linear_equals_peft_cat_and_loads_in_peft(tiny_llama, adapters, tmp_path):
    paths, weights = [adapters["a"], adapters["b"]], [0.7, -0.3]
    peft_model = _peft_with(tiny_llama, paths)
    peft_model.add_weighted_adapter(["a0", "a1"], weights, "cat", combination_type="cat")
    peft_model.set_adapter("cat")
    with torch.no_grad():
        theirs = peft_model(ids()).logits
    combine(paths, weights, method="cat", out=tmp_path / "ours")
    ours = logits_with(tiny_llama, tmp_path / "ours")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - logits_with(tiny_llama, adapters["a"])).abs().max() > 1e-2  # the check is not vacuous

    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids()).logits, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("ours", "theirs", "density"),
    [("svd", "svd", None), ("ties", "ties_svd", 0.5), ("magnitude_prune", "magnitude_prune_svd", 0.3)],
)
def test_svd_methods_equal_peft_on_every_layer(tiny_llama, adapters, tmp_path, ours, theirs, density):
    paths, weights = [adapters["a"], adapters["c"]], [0.6, 0.8]
    peft_model = _peft_with(tiny_llama, paths)
    peft_model.add_weighted_adapter(["a0", "a1"], weights, "m", combination_type=theirs, svd_rank=3, density=density)
    result = combine(paths, weights, method=ours, rank=3, density=density)
    for path, f in result.layers.items():
        peft_layer = peft_model.base_model.model.get_submodule(path)
        torch.testing.assert_close(f.delta(), peft_layer.get_delta_weight("m"), atol=1e-5, rtol=1e-4)


def test_resize_to_the_full_rank_is_lossless_and_loads_in_peft(tiny_llama, adapters, tmp_path):
    result = resize_adapter(adapters["a"], 4, tmp_path / "r4")
    assert all(abs(r.energy_kept - 1) < 1e-9 for r in result.layers.values())
    torch.testing.assert_close(
        logits_with(tiny_llama, tmp_path / "r4"), logits_with(tiny_llama, adapters["a"]), atol=1e-5, rtol=0
    )
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "r4").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids()).logits, logits_with(tiny_llama, adapters["a"]), atol=1e-5, rtol=0)


def test_resize_down_reports_the_energy_of_the_kept_directions(adapters, tmp_path):
    result = resize_adapter(adapters["a"], 2, tmp_path / "r2")
    src, new = read_factors(adapters["a"]), read_factors(tmp_path / "r2")
    assert new.config.r == 2 and new.config.lora_alpha == src.config.lora_alpha  # alpha kept: scaling alpha / 2
    for path, r in result.layers.items():
        s = torch.linalg.svdvals(src.layers[path].delta(torch.float64))
        assert abs(r.energy_kept - float((s[:2] ** 2).sum() / (s**2).sum())) < 1e-9
        kept = torch.linalg.svdvals(new.layers[path].delta(torch.float64))[:2]
        torch.testing.assert_close(kept, s[:2], atol=1e-5, rtol=0)


def test_resize_above_the_rank_zero_pads_and_warns(tiny_llama, adapters, tmp_path):
    with pytest.warns(UserWarning, match="zero-padded"):
        result = resize_adapter(adapters["b"], 5, tmp_path / "r5")
    assert sorted(result.padded) == sorted(result.layers)
    torch.testing.assert_close(
        logits_with(tiny_llama, tmp_path / "r5"), logits_with(tiny_llama, adapters["b"]), atol=1e-5, rtol=0
    )


def test_inspect_reports_spectra_and_relative_norms_against_the_base(tiny_llama, adapters):
    report = inspect_adapter(adapters["a"], tiny_llama)
    src = read_factors(adapters["a"])
    layer = report.layers[0]
    delta = src.layers[layer.path].delta(torch.float64)
    torch.testing.assert_close(
        torch.tensor(layer.singular_values, dtype=torch.float64), torch.linalg.svdvals(delta)[:4], atol=1e-6, rtol=0
    )
    base = tiny_llama.get_submodule(layer.path).weight.detach()
    assert abs(layer.relative_norm - float(delta.norm() / base.double().norm())) < 1e-6
    assert report.verdict and report.summary.startswith(str(adapters["a"]))


def test_factors_of_a_loaded_model_equal_the_saved_folder(tiny_llama, adapters):
    model = copy.deepcopy(tiny_llama)
    lorakit.load_adapter(model, adapters["b"], name="b")
    from_model, from_disk = factors_of(model, "b"), read_factors(adapters["b"])
    assert list(from_model.layers) == list(from_disk.layers)
    for path, f in from_disk.layers.items():
        torch.testing.assert_close(from_model.layers[path].delta(), f.delta())
    report = inspect_adapter(from_model, model)  # a wrapped model: ||W|| is the base layer's
    assert all(s.relative_norm is not None for s in report.layers)
