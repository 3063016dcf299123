"""Pure key mapping between lorakit's in-memory names and PEFT's file names."""

from lorakit.io.peft_format import from_peft_state, to_peft_key


def test_factor_keys_drop_the_adapter_name():
    assert (
        to_peft_key("model.layers.0.q_proj.lora_A.tone.weight", "tone")
        == "base_model.model.model.layers.0.q_proj.lora_A.weight"
    )
    assert to_peft_key("emb.lora_embedding_B.tone", "tone") == "base_model.model.emb.lora_embedding_B"


def test_saved_module_keys_drop_the_wrapper():
    assert to_peft_key("score.modules_to_save.default.weight", "default") == "base_model.model.score.weight"


def test_module_named_like_the_adapter_is_not_mangled():
    # a module that happens to be called like the adapter is only dropped right after a factor container
    assert to_peft_key("default.lora_A.default.weight", "default") == "base_model.model.default.lora_A.weight"
    assert to_peft_key("flora_head.bias", "default") == "base_model.model.flora_head.bias"


def test_from_peft_state_maps_back_and_keeps_unknown_keys_for_the_strict_loader():
    expected = ["a.lora_A.x.weight", "a.lora_B.x.weight"]
    file_state = {
        "base_model.model.a.lora_A.weight": 1,
        "base_model.model.a.lora_B.weight": 2,
        "base_model.model.zzz": 3,
    }
    assert from_peft_state(file_state, expected, "x", []) == {
        "a.lora_A.x.weight": 1,
        "a.lora_B.x.weight": 2,
        "base_model.model.zzz": 3,
    }
