"""Per-row adapters in one batch (`lorakit.route`): equal to solo runs, vectorized, restored on errors, trainable."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterNotFoundError, LoraConfig, MergeError, RoutingError
from lorakit.layers import LoraLinear
from lorakit.routing import current_route

ADAPTERS = {
    "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "b": LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "c": LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"], init_lora_weights=False),
}


@pytest.fixture
def multi(tiny_llama):
    for name, cfg in ADAPTERS.items():
        lorakit.add_adapter(tiny_llama, cfg, name=name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ADAPTERS:
            for t in lorakit.adapter_state_dict(tiny_llama, name).values():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    return tiny_llama


def _solo(model, name, ids):
    if name is None:
        with lorakit.disabled(model):
            return model(ids).logits
    lorakit.set_adapter(model, name)
    return model(ids).logits


ROWS = ["a", "b", None, "a", "c", "__base__", "b"]


@torch.no_grad()
def test_each_row_equals_running_it_alone_with_its_adapter(multi):
    ids = torch.randint(0, 128, (len(ROWS), 9), generator=torch.Generator().manual_seed(1))
    with lorakit.route(multi, ROWS):
        mixed = multi(ids).logits
    for i, name in enumerate(ROWS):
        solo = _solo(multi, None if name == "__base__" else name, ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], solo, atol=1e-5, rtol=0)
    assert len({round(float(mixed[i].sum()), 3) for i in (0, 1, 2, 4)}) == 4  # the adapters really differ


@torch.no_grad()
def test_generate_per_row_equals_solo_generate(multi):
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(2))
    rows = ["b", "a", None, "c"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with lorakit.route(multi, rows):
        mixed = multi.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disabled(multi):
                solo = multi.generate(ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **kwargs)
        else:
            lorakit.set_adapter(multi, name)
            solo = multi.generate(ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **kwargs)
        assert torch.equal(mixed[i : i + 1], solo), (i, name)


def test_linear_layers_route_with_batched_matmuls_not_a_loop_over_adapters(multi, monkeypatch):
    def no_loop(self, x, name):
        raise AssertionError("the per-adapter path ran under a route")

    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(5))
    rows = ["a", "b", "a"]
    with torch.no_grad():
        solo = [_solo(multi, name, ids[i : i + 1]) for i, name in enumerate(rows)]
    monkeypatch.setattr(LoraLinear, "lora_forward", no_loop)
    with torch.no_grad(), lorakit.route(multi, rows):
        mixed = multi(ids).logits
    for i in range(len(rows)):
        torch.testing.assert_close(mixed[i : i + 1], solo[i], atol=1e-5, rtol=0)


def test_route_state_is_restored_when_the_forward_raises(multi):
    ids = torch.randint(0, 128, (2, 5))
    with pytest.raises(RoutingError, match="3 adapter names but the input batch has 2 rows"):
        with lorakit.route(multi, ["a", "b", "c"]):
            multi(ids)
    assert current_route() is None
    lorakit.set_adapter(multi, "a")
    torch.testing.assert_close(multi(ids).logits, _solo(multi, "a", ids))


def test_unknown_route_names_fail_before_any_state_changes(multi):
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(6))
    lorakit.set_adapter(multi, "b")
    with torch.no_grad():
        before = multi(ids).logits
    with pytest.raises(AdapterNotFoundError, match="nope"):
        with lorakit.route(multi, ["a", "nope"]):
            pytest.fail("the block must not run")
    assert current_route() is None
    assert lorakit.active_adapters(multi) == ["b"]
    with torch.no_grad():
        assert torch.equal(multi(ids).logits, before)


def test_routing_a_merged_model_is_refused(multi):
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(7))
    lorakit.set_adapter(multi, "a")
    lorakit.merge(multi)
    with torch.no_grad():
        merged = multi(ids).logits
    with pytest.raises(MergeError, match="unmerge"):
        with lorakit.route(multi, ["a", None]):
            pytest.fail("the block must not run")
    assert current_route() is None
    with torch.no_grad():
        assert torch.equal(multi(ids).logits, merged)  # still merged, nothing changed


def test_gpt2_conv1d_and_plain_convs_route_per_row():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False), name="x")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False), name="y")
    ids = torch.randint(0, 128, (3, 7))
    with torch.no_grad(), lorakit.route(model, ["y", "x", None]):
        mixed = model(ids).logits
    for i, name in enumerate(["y", "x", None]):
        torch.testing.assert_close(mixed[i : i + 1], _solo(model, name, ids[i : i + 1]), atol=1e-5, rtol=0)

    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    lorakit.add_adapter(conv, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False), name="p")
    lorakit.add_adapter(conv, LoraConfig(r=3, target_modules=["0"], init_lora_weights=False), name="q")
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad(), lorakit.route(conv, ["q", None, "p"]):
        mixed = conv(x)
    for i, name in enumerate(["q", None, "p"]):
        if name is None:
            with lorakit.disabled(conv):
                solo = conv(x[i : i + 1])
        else:
            lorakit.set_adapter(conv, name)
            solo = conv(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], solo, atol=1e-5, rtol=0)


def _row_losses(model, ids):
    logits = model(ids).logits[:, :-1]
    return nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(dim=1)  # (batch,)


def test_two_adapters_train_in_one_routed_step_as_each_alone(multi):
    """Gradients reach only each row's adapter and equal training that adapter alone on its rows."""
    multi.train()  # dropout is 0: deterministic
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(3))
    rows = ["a", "b", "b", "a"]
    lorakit.set_trainable(multi, ["a", "b"])
    with lorakit.route(multi, rows):
        _row_losses(multi, ids).sum().backward()
    routed = {n: {k: t.grad.clone() for k, t in lorakit.adapter_state_dict(multi, n).items()} for n in ("a", "b")}
    assert all(t.grad is None for t in lorakit.adapter_state_dict(multi, "c").values())

    solo_model = copy.deepcopy(multi)
    solo_model.zero_grad(set_to_none=True)
    for name in ("a", "b"):
        picked = torch.tensor([i for i, r in enumerate(rows) if r == name])
        lorakit.set_adapter(solo_model, name)
        lorakit.set_trainable(solo_model, name)
        _row_losses(solo_model, ids[picked]).sum().backward()
        for k, t in lorakit.adapter_state_dict(solo_model, name).items():
            torch.testing.assert_close(routed[name][k], t.grad, atol=1e-5, rtol=1e-4)


def test_route_rows_must_be_names_or_none(multi):
    with pytest.raises(lorakit.ConfigError, match="adapter names or None"):
        with lorakit.route(multi, ["a", 3]):
            pass


@torch.no_grad()
def test_new_routes_reuse_stacked_factors_until_an_adapter_changes(multi):
    """A request joining a served batch opens a new route: it must not restack every adapter, nor go stale."""
    layer = multi.model.layers[0].self_attn.q_proj
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    with lorakit.route(multi, ["a", "b", None]):
        first = multi(ids).logits
    stacks = layer.stack_cache[1]
    with lorakit.route(multi, ["b", "b", "a"]):
        second = multi(ids).logits
    assert layer.stack_cache[1] is stacks
    torch.testing.assert_close(first[:2], torch.cat([_solo(multi, n, ids[i : i + 1]) for i, n in enumerate("ab")]),
                               atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(second[2:], _solo(multi, "a", ids[2:]), atol=1e-5, rtol=0)  # reused stacks still right
    layer.lora_B["a"].weight.mul_(3.0)  # in place: the version counter moves
    with lorakit.route(multi, ["a", None, None]):
        mixed = multi(ids).logits
    assert layer.stack_cache[1] is not stacks
    torch.testing.assert_close(mixed[:1], _solo(multi, "a", ids[:1]), atol=1e-5, rtol=0)
    lorakit.delete_adapter(multi, "c")
    assert multi.model.layers[0].self_attn.o_proj.stack_cache is None
