"""The model card every adapter folder gets: the Hub's front matter, what the adapter is, how to load it."""

from __future__ import annotations

import pytest
import yaml
from tiny_models import tiny_llama

import lorakit
from lorakit.model_card import CardInfo, update_card


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def save(tmp_path, name_or_path: str | None):
    model = tiny_llama()
    if name_or_path is not None:
        model.name_or_path = name_or_path
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def test_card_names_the_hub_base_and_says_how_to_load_it(tmp_path):
    folder = save(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct")
    text = (folder / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "peft"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in meta["tags"] and "lora" in meta["tags"]
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert f"{size:,d} bytes" in text and "q_proj, v_proj" in text
    for how in ("lorakit.load_adapter", "AutoPeftModelForCausalLM", "model.load_adapter(", "vllm serve",
                "convert_lora_to_gguf.py"):  # fmt: skip
        assert how in text


def test_a_local_base_path_is_not_put_in_base_model(tmp_path):
    meta = front_matter((save(tmp_path, str(tmp_path)) / "README.md").read_text())
    assert "base_model" not in meta and meta["library_name"] == "peft"


def test_a_users_own_readme_is_kept(tmp_path):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "README.md").write_text("# mine\n")
    save(tmp_path, "org/base")
    assert (tmp_path / "ad" / "README.md").read_text() == "# mine\n"
    assert not update_card(tmp_path / "ad", CardInfo(title="x"))


def test_update_card_adds_training_and_eval_tables(tmp_path):
    folder = save(tmp_path, "org/base")
    table = "| | base | adapter |\n|---|---|---|\n| exact match | 0.0% | 100.0% |"
    assert update_card(folder, CardInfo(training={"data": "x.jsonl", "steps": 80}, eval_table=table, title="orders"))
    text = (folder / "README.md").read_text()
    assert "# orders" in text and "| steps | 80 |" in text and "| exact match | 0.0% | 100.0% |" in text
    assert front_matter(text)["base_model"] == "org/base"


@pytest.mark.parametrize("given", ["smollm2-135m-instruct", "SmolLM2", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_base_model_id_of_embedded_names_and_hub_ids(given):
    from lorakit.models import base_model_id

    assert base_model_id(given) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_base_model_id_of_a_local_folder(tmp_path):
    import json

    from lorakit.models import base_model_id

    assert base_model_id(tmp_path) == str(tmp_path.resolve())
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-0.5B"}))
    assert base_model_id(tmp_path) == "Qwen/Qwen2.5-0.5B"
    snapshot = tmp_path / "models--Org--Name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_model_id(snapshot) == "Org/Name"


def test_adapter_for_another_base_warns_naming_both(tmp_path):
    folder = save(tmp_path, "org/base-a")
    model = tiny_llama()
    model.name_or_path = "org/base-b"
    with pytest.warns(UserWarning, match=r"trained on base model 'org/base-a'.*loaded into 'org/base-b'"):
        lorakit.load_adapter(model, folder)


def test_shape_mismatch_stays_an_error_and_touches_nothing(tmp_path):
    import torch

    from lorakit.errors import IncompatibleAdapterError

    folder = save(tmp_path, "org/base-a")
    other = tiny_llama(hidden_size=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.warns(UserWarning), pytest.raises(IncompatibleAdapterError):
        other.name_or_path = "org/base-c"
        lorakit.load_adapter(other, folder)
    assert not lorakit.list_adapters(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_the_hub_id_and_lorakits_old_alias_name_the_same_base(tmp_path):
    import warnings

    folder = save(tmp_path, "smollm2-135m-instruct")  # an adapter written by an older lorakit
    model = tiny_llama()
    model.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(model, folder)
