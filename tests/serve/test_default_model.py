"""The real default model (SmolLM2-135M-Instruct) behind `lorakit serve`: a mixed batch of a trained-looking
adapter and the bare base answers exactly what each request gives alone, chat template included."""

from __future__ import annotations

import asyncio

import httpx
import torch
from serve_helpers import running_server, solo_greedy

import lorakit
from lorakit import LoraConfig
from lorakit.serve.protocol import encode_chat


def test_default_model_mixed_batch_equals_solo_answers(default_model_dir, tmp_path):
    model, _ = lorakit.load_model(default_model_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    lorakit.add_adapter(model, config, name="style")
    with torch.no_grad():
        for t in lorakit.adapter_state_dict(model, "style").values():
            t.mul_(4)  # a visible change of behaviour
    lorakit.save_adapter(model, tmp_path / "adapters" / "style", name="style")
    del model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    longer = [{"role": "user", "content": "Name one planet of the solar system, then say why it is interesting."}]
    jobs = [("style", messages), ("tiny", messages), ("style", longer), ("tiny", longer)]  # padded rows too
    with running_server(default_model_dir, tmp_path / "adapters", max_tokens=32) as (url, state):

        async def ask(model_name, chat):
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": model_name, "messages": chat, "max_tokens": 8, "temperature": 0}
                return (await client.post(url + "/v1/chat/completions", json=body)).json()

        async def together():
            return await asyncio.gather(*(ask(m, chat) for m, chat in jobs))

        answers = asyncio.run(together())
        requests = [(None if m == "tiny" else m, encode_chat(state.tokenizer, chat), 8) for m, chat in jobs]
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    assert texts == solo_greedy(default_model_dir, tmp_path / "adapters", requests)
    assert texts[0] != texts[1]
    assert "Paris" in texts[1]  # the real instruct model answers sensibly through the chat template
