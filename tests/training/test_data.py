import logging

import pytest
from train_helpers import make_char_tokenizer, pc_rows, write_jsonl

from lorakit.errors import DataError
from lorakit.training.data import IGNORE_INDEX, Row, prompt_text, split_train_eval, tokenize
from lorakit.training.jsonl import read_jsonl
from lorakit.training.token_store import tokenize_rows


def learned_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


def test_prompt_tokens_are_masked_and_completion_tokens_are_not():
    tok = make_char_tokenizer()
    row = Row({"prompt": "up abc", "completion": "ABC"}, "x:1", "prompt_completion")
    ex, truncated = tokenize(row, tok, max_length=256)
    assert not truncated
    assert learned_text(tok, ex) == "ABC<|im_end|>\n"  # completion + end of turn, nothing of the prompt
    n_learned = sum(lab != IGNORE_INDEX for lab in ex.labels)
    assert ex.labels[: len(ex) - n_learned] == [IGNORE_INDEX] * (len(ex) - n_learned)
    assert ex.labels[len(ex) - n_learned :] == ex.input_ids[len(ex) - n_learned :]


def test_plain_prompt_completion_without_template_learns_completion_and_eos():
    tok = make_char_tokenizer()
    row = Row({"prompt": "up abc ", "completion": "ABC"}, "x:1", "prompt_completion")
    ex, _ = tokenize(row, tok, max_length=256, chat_template=False)
    assert tok.decode(ex.input_ids) == "up abc ABC<|im_end|>"
    assert learned_text(tok, ex) == "ABC<|im_end|>"


def test_chat_rows_learn_only_assistant_turns():
    tok = make_char_tokenizer()
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "A2"},
    ]
    ex, _ = tokenize(Row({"messages": msgs}, "x:1", "messages"), tok, max_length=512)
    assert learned_text(tok, ex) == "A1<|im_end|>\nA2<|im_end|>\n"


def test_mask_prompt_false_learns_everything():
    tok = make_char_tokenizer()
    row = Row({"prompt": "p", "completion": "c"}, "x:1", "prompt_completion")
    ex, _ = tokenize(row, tok, max_length=256, mask_prompt=False)
    assert ex.labels == ex.input_ids


def test_text_rows_learn_every_token_and_end_with_eos():
    tok = make_char_tokenizer()
    ex, _ = tokenize(Row({"text": "hello"}, "x:1", "text"), tok, max_length=256)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id


def test_prompt_text_matches_training_render():
    tok = make_char_tokenizer()
    row = Row({"prompt": "up abc", "completion": "ABC"}, "x:1", "prompt_completion")
    prompt, ref = prompt_text(row, tok)
    ex, _ = tokenize(row, tok, 256)
    assert tok.decode(ex.input_ids).startswith(prompt) and ref == "ABC"


def test_directory_of_jsonl_files_is_read_in_order(tmp_path):
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"text": "second"}])
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "first"}])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    assert [r.data["text"] for r in read_jsonl(tmp_path / "d")] == ["first", "second"]


def test_missing_data_file_raises(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_empty_data_file_raises(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no usable rows"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_directory_without_jsonl_raises(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no \\*.jsonl"):
        read_jsonl(tmp_path / "d")


def test_line_that_is_not_json_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json", {"text": "ok"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: line not valid JSON.*--skip-bad-lines"):
        read_jsonl(f)


def test_skip_bad_lines_skips_and_counts(tmp_path, caplog):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json", {"foo": 1}, {"text": "ok2"}])
    with caplog.at_level(logging.WARNING):
        rows = read_jsonl(f, skip_bad_lines=True)
    assert [r.data["text"] for r in rows] == ["ok", "ok2"]
    assert "skipped 2 bad lines" in caplog.text and "bad.jsonl:2" in caplog.text


def test_rows_missing_needed_keys_raise(tmp_path):
    f = write_jsonl(tmp_path / "keys.jsonl", [{"prompt": "only a prompt"}])
    with pytest.raises(DataError, match=r"keys.jsonl:1: line has keys \['prompt'\]; expected 'text'"):
        read_jsonl(f)


@pytest.mark.parametrize(
    "row, msg",
    [
        ({"prompt": "p", "completion": ""}, "'completion' is empty"),
        ({"prompt": "p", "completion": 3}, "must be strings"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "user"}]}, "string 'role' and 'content'"),
        ({"text": ""}, "non-empty string"),
    ],
)
def test_rows_with_bad_values_raise(tmp_path, row, msg):
    with pytest.raises(DataError, match=msg):
        read_jsonl(write_jsonl(tmp_path / "v.jsonl", [row]))


def test_long_examples_are_truncated_with_a_warning_count(caplog):
    tok = make_char_tokenizer()
    rows = [
        Row({"prompt": "p", "completion": "x" * n}, f"f:{i}", "prompt_completion") for i, n in enumerate([5, 200, 300])
    ]
    with caplog.at_level(logging.WARNING):
        examples, stats = tokenize_rows(rows, tok, max_length=64)
    assert stats.truncated == 2 and len(examples) == 3
    assert all(len(e) <= 64 for e in examples)
    assert "2 of 3 examples were longer than max_length=64" in caplog.text


def test_examples_with_nothing_to_learn_after_truncation_are_skipped(caplog):
    tok = make_char_tokenizer()
    rows = [
        Row({"prompt": "p" * 100, "completion": "c"}, "f:1", "prompt_completion"),
        Row({"prompt": "p", "completion": "c"}, "f:2", "prompt_completion"),
    ]
    with caplog.at_level(logging.WARNING):
        examples, stats = tokenize_rows(rows, tok, max_length=40)
    assert len(examples) == 1 and stats.dropped_no_labels == ["f:1"]
    with pytest.raises(DataError, match="raise --max-length"):
        tokenize_rows(rows[:1], tok, max_length=40)


def test_eval_row_without_completion_raises():
    with pytest.raises(DataError, match="no completion to compare against"):
        prompt_text(Row({"text": "t"}, "e.jsonl:1", "text"), make_char_tokenizer())


def test_train_eval_split_is_seeded_and_disjoint(tmp_path):
    rows = read_jsonl(write_jsonl(tmp_path / "t.jsonl", pc_rows(50)))
    a_train, a_eval = split_train_eval(rows, 0.1, seed=3)
    b_train, b_eval = split_train_eval(rows, 0.1, seed=3)
    assert len(a_eval) == 5 and len(a_train) == 45
    assert [r.source for r in a_eval] == [r.source for r in b_eval]
    assert not {r.source for r in a_eval} & {r.source for r in a_train}
