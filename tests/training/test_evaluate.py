import json

import pytest
import torch
from train_helpers import make_char_tokenizer, make_tiny_llama, write_jsonl

from lorakit.errors import DataError
from lorakit.training.data import Row
from lorakit.training.evaluate import (
    eval_loss,
    exact_match,
    format_table,
    generate,
    generation_eval,
    normalize,
    run_eval,
    stop_token_ids,
)
from lorakit.training.jsonl import read_jsonl
from lorakit.training.loss import causal_lm_loss
from lorakit.training.token_store import tokenize_rows


def test_exact_and_normalized_match():
    ref = '{"name": "Ann Lee", "qty": 2}'
    assert exact_match(ref + "\n", ref)
    assert not exact_match('{"qty": 2, "name": "Ann Lee"}', ref)
    assert normalize('{"qty": 2,  "name": "Ann Lee"}') == normalize(ref)  # key order and spacing
    assert normalize('```json\n{"qty": 2, "name": "Ann Lee"}\n```') == normalize(ref)
    assert normalize("Hello,  World!") == normalize("hello world")
    assert normalize('{"qty": 3, "name": "Ann Lee"}') != normalize(ref)


def test_batched_left_padded_generation_equals_one_by_one():
    model, tok = make_tiny_llama(), make_char_tokenizer()
    prompts = ["ab", "hello there", "x", "a longer prompt here"]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(len(tok(s)["input_ids"]) <= 6 for s in batched)


def test_generation_stops_at_end_of_turn():
    tok = make_char_tokenizer()
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)


def test_generation_eval_scores_a_model_that_answers_correctly(monkeypatch):
    tok = make_char_tokenizer()
    rows = [Row({"prompt": f"p{i}", "completion": f"A{i}"}, f"f:{i}", "prompt_completion") for i in range(3)]
    monkeypatch.setattr("lorakit.training.evaluate.generate",
                        lambda m, t, prompts, *a, **k: ["A0", " A1 ", "a2"])  # fmt: skip
    r = generation_eval(None, tok, rows)
    assert (r.exact_match, r.normalized_match, r.n) == (pytest.approx(2 / 3), 1.0, 3)


def test_eval_set_with_no_completions_is_refused(tmp_path):
    f = write_jsonl(tmp_path / "eval.jsonl", [{"text": "just text"}])
    with pytest.raises(DataError, match="no completion to compare against"):
        run_eval(str(f))  # refused before any model is loaded


def test_eval_loss_matches_the_plain_full_vocabulary_loss():
    model, tok = make_tiny_llama(), make_char_tokenizer()
    rows = [
        Row({"prompt": "up ab", "completion": "AB"}, "f:1", "prompt_completion"),
        Row({"prompt": "u", "completion": "XYZ"}, "f:2", "prompt_completion"),
    ]
    examples, _ = tokenize_rows(rows, tok, 128)
    ours = eval_loss(model, examples, tok.pad_token_id, batch_size=2)
    total, n = 0.0, 0
    for e in examples:  # reference: full logits, HF's own shift, one example at a time
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            out = model(input_ids=ids, labels=torch.tensor([e.labels]))
        k = sum(lab != -100 for lab in e.labels[1:])
        total, n = total + float(out.loss) * k, n + k
    assert ours == pytest.approx(total / n, rel=1e-5)


def test_gathered_loss_equals_full_logits_loss_with_padding():
    model = make_tiny_llama()
    ids = torch.randint(0, 99, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert float(causal_lm_loss(model, batch).detach()) == pytest.approx(float(ref.detach()), rel=1e-5)


def test_format_table_shows_both_columns():
    t = format_table(
        {"before": {"exact_match": 0.0, "eval_loss": 0.7}, "after": {"exact_match": 0.97, "eval_loss": 0.01}}
    )
    assert "before" in t and "after" in t and "97.0%" in t and "0.7000" in t


def test_messages_rows_are_scored_on_the_last_assistant_turn(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HELLO"}]
    rows = read_jsonl(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))
    r = generation_eval(make_tiny_llama(), make_char_tokenizer(), rows, max_new_tokens=3)
    assert r.references == ["HELLO"] and r.prompts[0].endswith("<|im_start|>assistant\n")
    json.dumps(r.summary())
