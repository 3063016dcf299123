"""One matmul for the A of q/k/v and gate/up (lorakit.layers.fused): the same numbers as the per-layer path."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.layers import LoraLinear, fused_a_enabled, set_fused_a
from lorakit.state import adapter_state_dict

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _restore_switch():
    """Every test here flips the process-wide switch: put the previous setting back afterwards."""
    before = fused_a_enabled()
    yield
    set_fused_a(before)


@pytest.fixture
def fusion():
    """Fusion on for the test."""
    set_fused_a(True)


@pytest.fixture
def per_layer_calls(monkeypatch):
    """Counts the LoRA branches that ran the per-layer path (`LoraLinear.add_lora`)."""
    calls = []
    original = LoraLinear.add_lora

    def counted(self, result, x, name):
        calls.append(name)
        return original(self, result, x, name)

    monkeypatch.setattr(LoraLinear, "add_lora", counted)
    return calls


def _model(targets="all-linear", dropout=0.0, **kwargs):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, init_lora_weights=False)
    return lorakit.add_adapter(tiny_llama(**kwargs), config).train()


def _loss_and_grads(model, fused: bool, ids=IDS):
    set_fused_a(fused)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, want, atol=1e-6):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-5, msg=k)


def _plain(x, layer):
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return F.linear(x, layer.base_layer.weight) + F.linear(F.linear(x, a), b) * layer.scaling["default"]


def test_qkv_gradients_equal_the_plain_formula(fusion, per_layer_calls):
    attn = _model(["q_proj", "k_proj", "v_proj"]).model.layers[0].self_attn
    x = torch.randn(2, 5, 32, requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    outs = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    weights = [torch.randn(o.shape, generator=gen) for o in outs]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    assert per_layer_calls == []  # all three A's came from one matmul
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    params = [p for m in layers for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    got = [x.grad.clone(), *(p.grad.clone() for p in params)]
    x.grad = None
    for p in params:
        p.grad = None
    refs = [_plain(x, m) for m in layers]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=0)
    sum((r * w).sum() for r, w in zip(refs, weights)).backward()
    for g, want in zip(got, [x.grad, *(p.grad for p in params)]):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)  # fp32 rounding of a wider matmul


def test_model_gradients_equal_the_per_layer_path(per_layer_calls):
    model = _model()
    loss, grads = _loss_and_grads(model, fused=False)
    assert len(per_layer_calls) == 14  # 7 linear layers x 2 blocks
    per_layer_calls.clear()
    fused_loss, fused_grads = _loss_and_grads(model, fused=True)
    assert len(per_layer_calls) == 4  # only o_proj and down_proj: q/k/v and gate/up are fused
    torch.testing.assert_close(fused_loss, loss, atol=1e-6, rtol=0)
    _assert_same(fused_grads, grads)


def test_fused_gradients_equal_peft(fusion):
    peft = pytest.importorskip("peft")
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ours = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs)).train()
    their_params = dict(theirs.named_parameters())
    state = adapter_state_dict(ours, "default")
    with torch.no_grad():
        for key, tensor in state.items():
            their_params["base_model.model." + key].copy_(tensor)
    ours_loss, ours_grads = _loss_and_grads(ours, fused=True)
    their_loss = theirs(input_ids=IDS, labels=IDS).loss
    their_loss.backward()
    torch.testing.assert_close(ours_loss, their_loss.detach(), atol=1e-6, rtol=1e-6)
    for key in state:
        torch.testing.assert_close(ours_grads[key], their_params["base_model.model." + key].grad, atol=1e-6, rtol=1e-4)


def test_dropout_in_training_keeps_per_layer_masks(fusion, per_layer_calls):
    model = _model(dropout=0.2)
    model(input_ids=IDS)
    assert len(per_layer_calls) == 14  # masks differ per layer: no sharing
    per_layer_calls.clear()
    model.eval()  # dropout off: fusion is exact again
    with torch.no_grad():
        fused = model(input_ids=IDS).logits
    assert len(per_layer_calls) == 4
    set_fused_a(False)
    with torch.no_grad():
        torch.testing.assert_close(fused, model(input_ids=IDS).logits, atol=1e-6, rtol=0)


def _fp64_adapters(model):
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.lora_A.to(torch.float64)
            m.lora_B.to(torch.float64)


def _two_active(model):
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), name="b")
    lorakit.set_adapter(model, ["default", "b"])


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(_two_active, id="two_active"),
        pytest.param(lambda m: lorakit.merge(m), id="merged"),
        pytest.param(_fp64_adapters, id="x_dtype_differs_from_A"),
    ],
)
def test_unusual_states_take_the_per_layer_path(fusion, per_layer_calls, setup):
    model = _model().eval()
    setup(model)
    with torch.no_grad():
        set_fused_a(True)
        fused = model(input_ids=IDS).logits
        fused_calls = len(per_layer_calls)
        set_fused_a(False)
        plain = model(input_ids=IDS).logits
    assert fused_calls == len(per_layer_calls) - fused_calls  # nothing was fused
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)


def test_disabled_and_routed_forwards_equal_the_per_layer_path(fusion):
    model = _model().eval()
    with torch.no_grad():
        with lorakit.disabled(model):
            off = model(input_ids=IDS).logits
        with lorakit.route(model, ["default", None]):
            routed = model(input_ids=IDS).logits
        full = model(input_ids=IDS).logits
        set_fused_a(False)
        with lorakit.disabled(model):
            torch.testing.assert_close(off, model(input_ids=IDS).logits, atol=0, rtol=0)
        with lorakit.route(model, ["default", None]):
            torch.testing.assert_close(routed, model(input_ids=IDS).logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], off[1], atol=1e-5, rtol=0)


def test_a_sibling_given_another_tensor_uses_its_own_input(fusion):
    """Equal values in a different tensor (or other values) must not pick up a slice computed from another x."""
    attn = _model(["q_proj", "k_proj", "v_proj"]).model.layers[0].self_attn
    x1 = torch.randn(2, 5, 32, requires_grad=True)
    x2 = torch.randn(2, 5, 32, requires_grad=True)
    x3 = x1.detach().clone().requires_grad_()
    outs = [attn.q_proj(x1), attn.k_proj(x2), attn.v_proj(x3), attn.q_proj(x1)]
    sum(o.square().sum() for o in outs).backward()
    got = [t.grad.clone() for t in (x1, x2, x3)]
    for t in (x1, x2, x3):
        t.grad = None
    refs = [_plain(x, m) for x, m in zip((x1, x2, x3, x1), (attn.q_proj, attn.k_proj, attn.v_proj, attn.q_proj))]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=0)
    sum(r.square().sum() for r in refs).backward()
    for g, t in zip(got, (x1, x2, x3)):
        torch.testing.assert_close(g, t.grad, atol=1e-6, rtol=1e-5)


def _groups(model):
    return {id(g): g for m in model.modules() if (g := m.__dict__.get("_sibling_group")) is not None}.values()


def test_no_tensor_is_kept_after_a_forward_even_one_that_raises(fusion):
    model = _model()
    assert len(_groups(model)) == 4  # q/k/v and gate/up in each of 2 blocks
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(weakref.ref(i[0])))
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(g.stash is None for g in _groups(model))
    assert seen[0]() is None  # the shared input was freed: nothing holds it
    k_proj = model.model.layers[1].self_attn.k_proj
    handle = k_proj.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=IDS)
    handle.remove()
    assert all(g.stash is None for g in _groups(model))


def test_gradient_checkpointing_gives_the_same_gradients(fusion):
    model = _model()
    _, plain = _loss_and_grads(model, fused=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    _, ckpt = _loss_and_grads(model, fused=True)
    _assert_same(ckpt, plain)


def test_compiled_model_gradients_equal_eager(fusion):
    model = _model()
    _, eager = _loss_and_grads(model, fused=True)
    compiled = torch.compile(model, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    compiled(input_ids=IDS, labels=IDS).loss.backward()
    _assert_same({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, eager)


def test_bf16_autocast_fused_matches_per_layer(fusion):
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, per_layer = _loss_and_grads(model, fused=False)
        fused_loss, fused = _loss_and_grads(model, fused=True)
    torch.testing.assert_close(fused_loss, loss, atol=1e-2, rtol=1e-2)
    for k in per_layer:
        assert fused[k].dtype == torch.float32
        assert (fused[k] - per_layer[k]).norm() <= 0.05 * per_layer[k].norm() + 1e-6  # bf16 rounding only


def test_unload_and_delete_remove_the_groups_and_hooks():
    model = _model()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["o_proj"]), name="o_only")
    assert len(_groups(model)) == 4
    lorakit.delete_adapter(model, "default")  # q/k/v/gate/up lose their only adapter and are unwrapped
    assert len(_groups(model)) == 0
    assert all(not m._forward_hooks for m in model.modules())
    model = lorakit.unload(_model(), merge=False)
    assert all(not m._forward_hooks for m in model.modules())
