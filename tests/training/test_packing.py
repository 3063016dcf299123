"""Packing: a packed step has the unpacked step's loss and gradients (fp32, 1e-5) on a tiny Llama."""

import json
import random

import pytest
import torch
from train_helpers import make_char_tokenizer, make_tiny_llama, write_jsonl

import lorakit
from lorakit.training import run_training
from lorakit.training.collate import collate
from lorakit.training.data import IGNORE_INDEX, Example
from lorakit.training.loss import causal_lm_loss
from lorakit.training.packing import collate_packed, pack, padding_waste


def examples(lengths, seed=0, masked_prefix=3):
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(1, 128) for _ in range(n)]
        labels = [IGNORE_INDEX] * min(masked_prefix, n - 1) + ids[min(masked_prefix, n - 1) :]
        out.append(Example(ids, labels, f"ex{i}"))
    return out


def test_pack_places_every_example_once_within_max_length():
    exs = examples([5, 17, 30, 2, 11, 29, 8, 1, 3, 30])
    rows = pack(exs, 32)
    assert all(len(r) <= 32 for r in rows)
    assert sorted(n for r in rows for n in r.seq_lens) == sorted(len(e) for e in exs)
    assert sum(len(r) for r in rows) == sum(len(e) for e in exs)
    assert len(rows) == 5  # 136 tokens: the 5-row lower bound, reached by best-fit decreasing
    assert list(pack(exs, 32)) == list(rows)  # deterministic


def test_collate_packed_restarts_positions_and_ignores_each_first_token():
    exs = examples([4, 3], masked_prefix=0)
    batch = collate_packed(pack(exs, 10), pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    labels = batch["labels"][0].tolist()
    assert labels[0] == IGNORE_INDEX and labels[4] == IGNORE_INDEX  # no example predicts the next one's start
    assert labels[1:4] == exs[0].labels[1:] and labels[5:] == exs[1].labels[1:]


def test_padding_waste_counts_pad_tokens_of_padded_batches():
    assert padding_waste([2, 4, 4], [[2, 4], [4]]) == pytest.approx(1 - 10 / 12)


def _loss_and_grads(model, batch, n_learned, split_head):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch, reduction="sum", split_head=split_head) / n_learned
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("split_head", [True, False])
def test_packed_step_has_the_unpacked_loss_and_gradients(split_head):
    torch.manual_seed(0)
    model = make_tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights="gaussian"))  # fmt: skip
    model.train()
    exs = examples([9, 31, 5, 20, 14, 2, 27])
    padded = collate(exs, pad_id=0)
    n_learned = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss_p, grads_p = _loss_and_grads(model, padded, n_learned, split_head)
    packed = collate_packed(pack(exs, 40), pad_id=0)
    assert packed["input_ids"].shape[0] < len(exs) and int((packed["labels"] != IGNORE_INDEX).sum()) == n_learned
    loss_k, grads_k = _loss_and_grads(model, packed, n_learned, split_head)
    assert torch.allclose(loss_k, loss_p, rtol=1e-5, atol=1e-6), (loss_k, loss_p)
    for name, g in grads_p.items():
        assert torch.allclose(grads_k[name], g, rtol=1e-5, atol=1e-6), name


def test_packed_attention_does_not_leak_between_examples():
    """Control: the same packed row with a plain causal mask (positions not restarting) gives other logits."""
    model = make_tiny_llama()
    exs = examples([6, 6])
    packed = collate_packed(pack(exs, 12), pad_id=0)
    alone = model(input_ids=torch.tensor([exs[1].input_ids])).logits[0]
    together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
    leaky = model(input_ids=packed["input_ids"]).logits[0]
    second = slice(6, 12) if packed["input_ids"][0, 6:].tolist() == exs[1].input_ids else slice(0, 6)
    assert torch.allclose(together[second], alone, atol=1e-5)
    assert not torch.allclose(leaky[second], alone, atol=1e-3)


def test_training_with_packing_learns_and_writes_fewer_rows(tmp_path):
    rng = random.Random(0)
    rows = [{"prompt": "up " + w, "completion": w.upper()}
            for w in ("".join(rng.choice("abcdef") for _ in range(rng.randint(2, 12))) for _ in range(48))]  # fmt: skip
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    result = run_training({"data": str(data), "output_dir": str(tmp_path / "o"), "packing": True, "max_length": 96,
                           "batch_size": 2, "learning_rate": 1e-2, "progress": False, "precision": "fp32",
                           "eval_generate": False, "r": 8, "lora_dropout": 0.0, "max_steps": 24, "logging_steps": 1,
                           "target_modules": "all-linear"},
                          model=make_tiny_llama(), tokenizer=make_char_tokenizer())  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert result.status == "completed" and sum(losses[-4:]) / 4 < 0.95 * losses[0]
    assert result.after["eval_loss"] < result.before["eval_loss"]
