"""The chunked head + cross-entropy equals the unchunked path: loss, hidden-state, head and adapter gradients."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama

import lorakit
from lorakit.training import loss as loss_mod
from lorakit.training.loss import causal_lm_loss, chunked_head_loss


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|, in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _leaves(n=37, d=16, vocab=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    head = torch.nn.Linear(d, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=g))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g))
    labels = torch.randint(0, vocab, (n,), generator=g)
    return hidden, head, labels


def _grads(hidden, head, loss):
    params = [hidden, *head.parameters()]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_fp32_loss_and_all_grads_equal_the_full_logits(reduction, chunk):
    hidden, head, labels = _leaves()
    ref = F.cross_entropy(head(hidden).float(), labels, reduction=reduction)
    ours = chunked_head_loss(hidden, head, labels, reduction, chunk)
    assert rel(ours, ref) < 1e-6
    for g, r in zip(_grads(hidden, head, ours * 0.37), _grads(hidden, head, ref * 0.37)):  # a scale from outside
        assert rel(g, r) < 1e-6


def test_bf16_autocast_rounds_like_autocast():
    hidden, head, labels = _leaves(n=64, d=32, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(head(hidden).float(), labels, reduction="sum") / 7
        ours = chunked_head_loss(hidden, head, labels, "sum", chunk=16) / 7
    assert rel(ours, ref) < 1e-6
    (g_h, g_w, g_b), (r_h, r_w, r_b) = _grads(hidden, head, ours), _grads(hidden, head, ref)
    assert g_h.dtype == r_h.dtype and rel(g_h, r_h) < 1e-6  # row by row the same bf16 ops
    # the head's own gradient sums over rows (fp32 partial sums here, one bf16 matmul there): equal up to a rare
    # flip of the final bf16 rounding
    assert rel(g_w, r_w) < 4e-3 and rel(g_b, r_b) < 4e-3


def test_no_grad_gives_the_same_loss():
    hidden, head, labels = _leaves()
    with torch.no_grad():
        assert rel(chunked_head_loss(hidden, head, labels, "mean", 5), F.cross_entropy(head(hidden), labels)) < 1e-6


def _batch(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, 8:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _model(tied: bool, train_embeddings: bool):
    model = tiny_llama(tie_word_embeddings=tied)
    torch.manual_seed(1)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    if train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(True)
        model.get_output_embeddings().weight.requires_grad_(True)
    return model


def _loss_and_grads(model, batch, autocast: bool, **kw):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = causal_lm_loss(model, batch, reduction="sum", **kw) / 17
    return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_and_adapter_and_embedding_grads_fp32(tied):
    model, batch = _model(tied, train_embeddings=True), _batch()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    loss, grads = _loss_and_grads(model, batch, False, chunk_size=4)
    for ref_kw in ({"chunk_size": 0}, {"split_head": False}):
        ref_loss, ref = _loss_and_grads(model, batch, False, **ref_kw)
        assert rel(loss, ref_loss) < 1e-6
        assert grads.keys() == ref.keys() and any("lora_A" in k for k in grads)
        for k in grads:
            assert rel(grads[k], ref[k]) < 1e-6, k


def test_model_adapter_grads_under_bf16_autocast_tied_head():
    model, batch = _model(tied=True, train_embeddings=False), _batch()
    loss, grads = _loss_and_grads(model, batch, True, chunk_size=4)
    ref_loss, ref = _loss_and_grads(model, batch, True, chunk_size=0)
    assert rel(loss, ref_loss) < 1e-6
    assert len(grads) == 8  # lora_A and lora_B of q and v in two layers
    for k in grads:
        assert rel(grads[k], ref[k]) < 1e-6, k


def test_default_chunk_is_the_module_constant_and_zero_turns_it_off(monkeypatch):
    model, batch = _model(tied=True, train_embeddings=False), _batch()
    calls = []
    real = loss_mod.chunked_head_loss
    monkeypatch.setattr(loss_mod, "chunked_head_loss", lambda *a: calls.append(a[-1]) or real(*a))
    causal_lm_loss(model, batch)
    monkeypatch.setattr(loss_mod, "CE_CHUNK_ROWS", 0)
    causal_lm_loss(model, batch)
    assert calls == [loss_mod.CE_CHUNK_ROWS or 1024]


def test_adapter_on_the_head_is_not_chunked_and_matches_the_unchunked_loss():
    model = tiny_llama()
    torch.manual_seed(1)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    assert not loss_mod._is_plain_linear(model.get_output_embeddings())
    batch = _batch()
    loss, grads = _loss_and_grads(model, batch, False, chunk_size=4)
    ref_loss, ref = _loss_and_grads(model, batch, False, split_head=False)
    assert rel(loss, ref_loss) < 1e-6
    for k in grads:
        assert rel(grads[k], ref[k]) < 1e-6, k
