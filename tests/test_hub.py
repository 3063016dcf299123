"""Hub ids, for real: huggingface_hub downloads from a loopback server in the Hub's file layout (`FakeHub`).

Download into the HF cache, cache reuse (no file requested twice), revisions, gated (401/403) and missing (404)
repositories, no network, and HF_HUB_OFFLINE=1 from a pre-filled cache; adapters by Hub id too. And the rest of
the ecosystem finds a lorakit adapter's base through the cache: PEFT's AutoPeftModelForCausalLM and transformers'
``model.load_adapter`` (in a fresh, offline process, so huggingface_hub reads the environment we give it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hub_repo import tiny_repo_files
from hub_server import FakeHub
from tiny_models import tiny_llama

import lorakit
from lorakit.errors import HubError, ModelNotFoundError
from lorakit.models import load_model, resolve_model_source

PROBE = torch.tensor([[1, 5, 9, 13, 2]])  # (1, 5) token ids


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits  # (1, 5, vocab)


@pytest.fixture(scope="module")
def repo_files() -> list[dict[str, bytes]]:
    """The files of tiny random Llama repositories with seeds 0, 1, 2 (built once per module)."""
    return [tiny_repo_files(tiny_llama(seed=s)) for s in range(3)]


@pytest.fixture
def hub(tmp_path, monkeypatch, repo_files):
    """A started FakeHub with ``org/tiny`` (main: seed 0, tag v2: seed 1) and a gated ``org/gated``."""
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        server.add_repo("org/tiny", repo_files[0])
        server.add_repo("org/tiny", repo_files[1], revision="v2")
        server.add_repo("org/gated", repo_files[2], gated=True, token="hf_good")
        yield server


def test_hub_id_resolves_without_touching_the_network():
    source = resolve_model_source("Qwen/Qwen2.5-0.5B-Instruct", revision="main")
    assert (source.kind, source.name, source.revision) == ("hub", "Qwen/Qwen2.5-0.5B-Instruct", "main")


def test_revision_of_a_local_model_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match="drop --revision"):
        resolve_model_source("smollm2", revision="main")


def test_load_by_hub_id_downloads_into_the_hf_cache(hub, tmp_path):
    model, tokenizer = load_model("org/tiny")
    assert torch.equal(logits(model), logits(tiny_llama(seed=0)))
    assert model.name_or_path == "org/tiny"  # what adapters record as their base
    assert tokenizer.pad_token is not None
    snapshots = list((tmp_path / "hf-cache" / "models--org--tiny" / "snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "model.safetensors").is_file()
    assert ("GET", "/org/tiny/resolve/" + snapshots[0].name + "/model.safetensors") in hub.requests


def test_second_load_requests_no_file(hub):
    load_model("org/tiny")
    hub.requests.clear()
    model, _ = load_model("org/tiny")
    assert hub.file_requests() == []  # only the revision lookup; every file comes from the cache
    assert torch.equal(logits(model), logits(tiny_llama(seed=0)))


def test_revision_by_tag_and_by_commit(hub):
    model, _ = load_model("org/tiny", revision="v2")
    assert torch.equal(logits(model), logits(tiny_llama(seed=1)))
    main_sha = hub.repos[("model", "org/tiny")].refs["main"]
    model, _ = load_model("org/tiny", revision=main_sha)
    assert torch.equal(logits(model), logits(tiny_llama(seed=0)))


def test_unknown_revision_names_it_and_the_fix(hub):
    with pytest.raises(HubError, match=r"org/tiny has no revision 'v9'.*--revision"):
        load_model("org/tiny", revision="v9")


def test_gated_repo_without_token_is_one_clear_line(hub):
    with pytest.raises(HubError) as err:
        load_model("org/gated")
    message = str(err.value)
    assert "org/gated" in message and "gated" in message and "401" in message and "HF_TOKEN" in message
    assert "\n" not in message


def test_gated_repo_with_wrong_token_is_403_and_with_right_token_loads(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubError, match=r"gated repository \(403, HF_TOKEN is set\)"):
        load_model("org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    model, _ = load_model("org/gated")
    assert torch.equal(logits(model), logits(tiny_llama(seed=2)))


def test_missing_repo_is_a_404_naming_the_repo(hub):
    with pytest.raises(HubError, match=r"org/nope was not found on http://127\.0\.0\.1:\d+ \(404\)"):
        load_model("org/nope")


def test_no_network_and_not_cached_says_so(hub, monkeypatch):
    hub.stop()  # the endpoint refuses connections now
    with pytest.raises(HubError, match=r"Cannot reach the Hub at .* org/tiny.*not in the Hugging Face cache"):
        load_model("org/tiny")


def test_offline_mode_reads_a_prefilled_cache_and_sends_nothing(hub, monkeypatch):
    load_model("org/tiny")
    load_model("org/tiny", revision="v2")
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = load_model("org/tiny")
    assert torch.equal(logits(model), logits(tiny_llama(seed=0)))
    model, _ = load_model("org/tiny", revision="v2")
    assert torch.equal(logits(model), logits(tiny_llama(seed=1)))
    assert hub.requests == []


def test_offline_mode_without_the_model_cached_names_the_fix(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match=r"org/tiny is not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
        load_model("org/tiny")
    assert hub.requests == []


def test_offline_hint_for_the_embedded_model(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="embedded copy of this model loads offline as 'smollm2-135m-instruct'"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_adapter_by_hub_id_loads_like_the_folder(hub, tmp_path):
    from hub_repo import folder_files

    model, _ = load_model("org/tiny")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "ad")
    hub.add_repo("org/tiny-lora", folder_files(tmp_path / "ad"))
    expected = logits(model)
    base, _ = load_model("org/tiny")
    lorakit.load_adapter(base, "org/tiny-lora")
    assert torch.equal(logits(base), expected)
    with pytest.raises(HubError, match="adapter org/missing-lora was not found"):
        lorakit.load_adapter(load_model("org/tiny")[0], "org/missing-lora")


def test_cli_error_for_a_gated_model_is_one_line(hub, capsys):
    from lorakit.cli import main

    assert main(["info", "org/gated"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit: error: Cannot download the model org/gated") and "\n" not in err


def test_cli_info_takes_a_hub_id_and_a_revision(hub, capsys):
    import json

    from lorakit.cli import main

    assert main(["info", "org/tiny", "--revision", "v2", "--json", "--dtype", "fp32", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "LlamaForCausalLM" and report["target_modules"] == ["q_proj", "v_proj"]


def test_server_loads_adapters_by_hub_id_only_when_allowed(hub, tmp_path):
    from hub_repo import folder_files

    from lorakit.errors import ConfigError
    from lorakit.serve.registry import AdapterRegistry

    model, _ = load_model("org/tiny")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "ad")
    expected = logits(model)
    hub.add_repo("org/tiny-lora", folder_files(tmp_path / "ad"))
    base, _ = load_model("org/tiny")
    with pytest.raises(ConfigError, match="--allow-hub-adapters"):
        AdapterRegistry(base).add("zoo", "org/tiny-lora")
    AdapterRegistry(base, allow_hub=True).add("zoo", "org/tiny-lora")
    lorakit.set_adapter(base, "zoo")
    assert torch.equal(logits(base), expected)


SCRIPT = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
adapter, out = sys.argv[1], sys.argv[2]
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    peft_logits = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()(ids).logits
    model = AutoModelForCausalLM.from_pretrained("org/tiny").eval()
    model.load_adapter(adapter)
    hf_logits = model(ids).logits
torch.save({"peft": peft_logits, "transformers": hf_logits}, out)
"""


def test_peft_and_transformers_load_a_lorakit_adapter_with_the_base_from_the_cache(hub, tmp_path):
    model, _ = load_model("org/tiny")  # fills the HF cache
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    expected = logits(model)
    hub.stop()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "ad"), str(tmp_path / "out.pt"), json.dumps(PROBE.tolist())]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    assert (got["peft"] - expected).abs().max().item() < 1e-5
    assert (got["transformers"] - expected).abs().max().item() < 1e-5


def test_train_a_hub_model_from_the_cli_writes_its_id_and_a_card(hub, tmp_path):
    from lorakit.cli import main

    rows = [{"prompt": f"w{i} w{i + 1}", "completion": f" w{i + 2} </s>"} for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model", "org/tiny", "--revision", "v2", "--data", str(tmp_path / "d.jsonl"),
            "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--no-eval-generate",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny", "v2")  # PEFT loads this base
    assert config["target_modules"] == ["q_proj", "v_proj"]  # PEFT's Llama default, as lorakit info says
    card = (tmp_path / "run" / "README.md").read_text()
    assert "base_model: org/tiny" in card and "## Training" in card and "## Evaluation" in card
