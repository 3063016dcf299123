import pytest
from train_helpers import make_char_tokenizer, write_jsonl

from lorakit.errors import DataError
from lorakit.training.data import tokenize
from lorakit.training.formats import RowProblem, RowSpec, normalize
from lorakit.training.jsonl import read_jsonl


def test_alpaca_row_becomes_prompt_completion_with_the_input_after_a_blank_line():
    data, fmt = normalize({"instruction": "Add the numbers.", "input": "2 3", "output": "5"})
    assert fmt == "prompt_completion"
    assert (data["prompt"], data["completion"]) == ("Add the numbers.\n\n2 3", "5")


def test_alpaca_row_without_input_is_the_instruction_alone():
    data, _ = normalize({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert data["prompt"] == "Say hi."


def test_sharegpt_turns_map_to_chat_roles_with_system_turns_kept():
    record = {"system": "Be terse.", "conversations": [
        {"from": "system", "value": "Answer in upper case."},
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "HI"},
        {"from": "user", "value": "bye"}, {"from": "assistant", "value": "BYE"}]}  # fmt: skip
    data, fmt = normalize(record)
    assert fmt == "messages"
    assert [(m["role"], m["content"]) for m in data["messages"]] == [
        ("system", "Be terse."), ("system", "Answer in upper case."), ("user", "hi"), ("assistant", "HI"),
        ("user", "bye"), ("assistant", "BYE")]  # fmt: skip


def test_sharegpt_unknown_speaker_is_named():
    with pytest.raises(RowProblem, match="from='robot'"):
        normalize({"conversations": [{"from": "robot", "value": "x"}]})


def test_column_mapping_reads_renamed_columns():
    spec = RowSpec(prompt_column="question", completion_column="answer")
    data, fmt = normalize({"question": "2+2?", "answer": "4", "id": 7}, spec)
    assert fmt == "prompt_completion" and (data["prompt"], data["completion"], data["id"]) == ("2+2?", "4", 7)
    data, fmt = normalize({"body": "hello"}, RowSpec(text_column="body"))
    assert fmt == "text" and data["text"] == "hello"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    data, fmt = normalize({"chat": msgs}, RowSpec(messages_column="chat"))
    assert fmt == "messages" and data["messages"] == msgs


def test_named_format_rejects_a_row_of_another_format_naming_the_keys():
    with pytest.raises(RowProblem, match=r"has keys \['prompt', 'completion'\]|has keys \['completion', 'prompt'\]"):
        normalize({"prompt": "p", "completion": "c"}, RowSpec(format="alpaca"))


def test_named_column_missing_is_named():
    with pytest.raises(RowProblem, match="no column 'question'"):
        normalize({"prompt": "p", "completion": "c"}, RowSpec(format="prompt_completion", prompt_column="question"))


def test_unknown_format_name_is_rejected():
    with pytest.raises(ValueError, match="expected one of auto"):
        RowSpec(format="oasst")


def test_jsonl_of_alpaca_and_sharegpt_rows_is_read_and_tokenized(tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "up", "input": "abc", "output": "ABC"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "HI"}]}])  # fmt: skip
    rows = read_jsonl(f)
    assert [r.format for r in rows] == ["prompt_completion", "messages"]
    tok = make_char_tokenizer()
    ex, _ = tokenize(rows[1], tok, 256)
    learned = tok.decode([t for t in ex.labels if t != -100])
    assert learned.startswith("HI")  # loss on the assistant turn only


def test_jsonl_row_fitting_no_format_names_file_line_and_keys(tmp_path):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"text": "ok"}, {"question": "q", "reply": "r"}])
    with pytest.raises(DataError, match=r"odd.jsonl:2: line has keys \['question', 'reply'\]; expected .*Alpaca"):
        read_jsonl(f)


def test_data_flags_reach_the_config():
    import argparse

    from lorakit.cli.options import add_train_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    argv = ["--data", "org/name", "--data-split", "validation", "--data-config", "small", "--eval-split", "0.2",
            "--format", "alpaca", "--prompt-column", "q", "--completion-column", "a", "--packing",
            "--no-group-by-length", "--report-to", "tensorboard,wandb"]  # fmt: skip
    c = config_from_args(p.parse_args(argv))
    assert (c.data_split, c.data_config, c.eval_ratio, c.format) == ("validation", "small", 0.2, "alpaca")
    assert (c.prompt_column, c.completion_column, c.packing, c.group_by_length) == ("q", "a", True, False)
    assert c.report_to == "tensorboard,wandb"


def test_cli_names_the_bad_row_in_one_line_before_loading_a_model(tmp_path, capsys):
    from lorakit.cli import main

    f = write_jsonl(tmp_path / "odd.jsonl", [{"text": "ok"}, {"question": "q"}])
    code = main(["train", "--data", str(f), "--output-dir", str(tmp_path / "o"), "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("lorakit: error: ") and "odd.jsonl:2: line has keys ['question']" in err[-1]
