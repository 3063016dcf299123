"""`lorakit serve` with DoRA adapters next to plain LoRA adapters: one continuous batch, answers equal solo runs."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import torch
from serve_helpers import running_server

import lorakit
from lorakit import LoraConfig
from lorakit.serve.protocol import encode_prompt


def _dora_adapters(tiny_serve_dir: Path, adapters_dir: Path, folder: Path) -> Path:
    """Two plain adapters of the shared set plus two DoRA adapters (magnitudes moved off their init)."""
    for name in ("a0", "a2"):
        shutil.copytree(adapters_dir / name, folder / name)
    model, _ = lorakit.load_model(tiny_serve_dir)
    gen = torch.Generator().manual_seed(4)
    for name, targets in (("d0", ["q_proj", "v_proj"]), ("d1", "all-linear")):
        lorakit.add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True), name=name)
        with torch.no_grad():
            for key, t in lorakit.adapter_state_dict(model, name).items():
                t.copy_(t * (1 + 0.3 * torch.randn(t.shape, generator=gen)) if "magnitude" in key else
                        torch.randn(t.shape, generator=gen) * 0.3)  # fmt: skip
        lorakit.save_adapter(model, folder / name, name=name)
    return folder


def _solo(model_dir: Path, adapters: Path, requests: list[tuple[str | None, list[int], int]]) -> list[str]:
    """Each request alone, its adapter set active (no routing), greedy."""
    model, tokenizer = lorakit.load_model(model_dir)
    for name in sorted({a for a, _, _ in requests if a}):
        lorakit.load_adapter(model, adapters / name, name=name)
    out = []
    for adapter, ids, max_tokens in requests:
        x = torch.tensor([ids])
        kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        with torch.no_grad():
            if adapter is None:
                with lorakit.disabled(model):
                    y = model.generate(x, **kwargs)
            else:
                lorakit.set_adapter(model, adapter)
                y = model.generate(x, **kwargs)
        out.append(tokenizer.decode(y[0, len(ids) :], skip_special_tokens=True))
    return out


async def _complete(url: str, jobs: list[tuple[str | None, str, int]]) -> list[str]:
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(adapter, prompt, max_tokens):
            body = {"model": adapter or "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            r = await client.post(url + "/v1/completions", json=body)
            return r.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(*job) for job in jobs))


def test_dora_and_lora_requests_share_batches_and_equal_solo_answers(tiny_serve_dir, adapters_dir, tmp_path):
    folder = _dora_adapters(tiny_serve_dir, adapters_dir, tmp_path / "adapters")
    prompts = ["Once upon a time", "def fibonacci(n):", "The weather in Paris is", "Q: two plus two?\nA:"]
    names = ["d0", "a0", None, "d1", "a2"]
    jobs = [(names[i % 5], prompts[i % 4], 5 + i % 4) for i in range(10)]
    with running_server(tiny_serve_dir, folder, max_batch_size=5) as (url, state):
        answers = asyncio.run(_complete(url, jobs))
        requests = [(a, encode_prompt(state.tokenizer, p), n) for a, p, n in jobs]
        assert state.batcher.step is state.batcher.reference  # the engine applies no DoRA: the scheduler fell back
        for name in ("d0", "d1"):
            assert httpx.delete(f"{url}/v1/adapters/{name}", timeout=30).status_code == 200
        assert asyncio.run(_complete(url, jobs[1:3])) == answers[1:3]
        assert state.batcher.step is state.batcher.engine  # no DoRA left: back on the fast path
    assert answers == _solo(tiny_serve_dir, folder, requests)
    assert len({a for (n, _, _), a in zip(jobs, answers) if n in ("d0", "d1")}) > 1  # DoRA answers differ
