"""A lorakit adapter on a Hub model is found by the rest of the ecosystem: PEFT's AutoPeftModelForCausalLM and
transformers' ``model.load_adapter`` resolve the base from ``base_model_name_or_path`` through the HF cache
(offline, in a fresh process, so huggingface_hub reads the environment we give it) and match lorakit's logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from test_hub import PROBE, hub, logits, repo_files  # noqa: F401 - pytest fixtures

import lorakit
from lorakit.models import load_model

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
