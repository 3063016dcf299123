"""The main job's data and a few real steps of the default model (SmolLM2-135M-Instruct)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


def _generator():
    spec = importlib.util.spec_from_file_location("make_json_extraction", ROOT / "examples" / "make_json_extraction.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_example_data_is_what_the_seeded_generator_makes():
    train, evaluation = _generator().generate(400, 100, 1234)
    assert [json.loads(x) for x in (DATA / "orders_train.jsonl").read_text().splitlines()] == train
    assert [json.loads(x) for x in (DATA / "orders_eval.jsonl").read_text().splitlines()] == evaluation
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}


def test_every_completion_follows_from_its_prompt():
    gen = _generator()
    for row in map(json.loads, (DATA / "orders_eval.jsonl").read_text().splitlines()):
        target = json.loads(row["completion"])
        assert list(target) == ["name", "item", "qty", "city", "express"]
        assert row["completion"] == json.dumps(target)  # canonical spacing
        text = row["prompt"].split("\n", 1)[1]
        assert target["name"] in text and target["city"] in text and target["item"] in text
        assert str(target["qty"]) in text or gen.WORDS[target["qty"] - 1] in text
        assert any(p in text for p in (gen.FAST if target["express"] else gen.SLOW))


def test_default_model_trains_a_few_steps_on_the_main_job_data(default_model, tmp_path):
    from lorakit.training import run_training

    model, tok = default_model
    rows = (DATA / "orders_train.jsonl").read_text().splitlines()[:8]
    (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "e.jsonl").write_text("\n".join(rows[:2]) + "\n")
    r = run_training({"data": str(tmp_path / "t.jsonl"), "eval_data": str(tmp_path / "e.jsonl"),
                      "output_dir": str(tmp_path / "o"), "max_steps": 2, "batch_size": 4, "progress": False,
                      "eval_generate": False}, model=model, tokenizer=tok)  # fmt: skip
    assert r.status == "completed" and r.after["eval_loss"] < r.before["eval_loss"]
    # the TrainConfig default targets are PEFT's for Llama, q_proj and v_proj: r=16 on 2 x 30 layers, fp32
    assert r.trainable_params == 30 * 16 * ((576 + 576) + (576 + 192))
    assert 3_600_000 < r.adapter_bytes < 3_800_000
