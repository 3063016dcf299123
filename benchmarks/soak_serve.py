"""A soak of a live `lorakit serve`: many clients, a fixed mix of good and bad traffic, then the server's account.

``soak(url, plan)`` sends ``plan.requests`` requests from ``plan.clients`` threads. The mix (fixed by the seed):
valid greedy completions (streamed or whole, random adapters), invalid bodies (400), streams cancelled after
their first chunk, unknown adapters (404), and adapter loads/deletes in between (200, or 409 while in use).
It returns every valid answer, so the caller can compare each with its solo greedy answer (`solo_answers`),
and the process RSS after a warm-up round and at the end (the server runs in this process, in a thread).

The test ``tests/serve/test_soak.py`` runs a small plan on a tiny random model in CI; this script runs a bigger
one by hand and writes ``benchmarks/results/serve_soak.json`` (machine and date inside):

    python benchmarks/soak_serve.py [--clients 32] [--requests 2000] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):", "List three colors:",
           "A long time ago in a galaxy far, far away,", "Hello", "Translate to French: good morning"]  # fmt: skip
KINDS = ("valid", "valid", "valid", "valid", "stream", "stream", "invalid", "cancel", "unknown", "admin")


@dataclass
class Plan:
    """What to send: ``requests`` requests from ``clients`` threads, valid ones asking ``max_tokens`` tokens."""

    clients: int = 32
    requests: int = 256
    max_tokens: int = 8
    adapters: tuple[str, ...] = ("a0", "a1", "a2", "a3")
    base: str = "tiny"
    copy_from: str = "a2"  # the folder the load/delete traffic registers under new names
    seed: int = 0
    headers: dict = field(default_factory=dict)


def _job(rng: random.Random, plan: Plan, i: int) -> dict:
    kind = KINDS[rng.randrange(len(KINDS))]
    model = rng.choice((plan.base, *plan.adapters))
    return {"i": i, "kind": kind, "model": model, "prompt": rng.choice(PROMPTS), "max_tokens": plan.max_tokens}


def _send(client: httpx.Client, url: str, job: dict, plan: Plan) -> tuple[str, object]:
    body = {"model": job["model"], "prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0}
    kind = job["kind"]
    if kind == "valid":
        r = client.post(url + "/v1/completions", json=body)
        return (f"valid {r.status_code}", r.json()["choices"][0]["text"] if r.status_code == 200 else r.text)
    if kind in ("stream", "cancel"):
        text = ""
        with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if kind == "cancel":
                        return (f"cancel {r.status_code}", None)  # leaving the block closes the connection
            return (f"{kind} {r.status_code}", text)
    if kind == "invalid":
        bad = random.Random(job["i"]).choice([{**body, "temperature": 5}, {**body, "max_tokens": -1},
                                              {**body, "stop": ["x"] * 9}, {"prompt": "no model"}])  # fmt: skip
        return (f"invalid {client.post(url + '/v1/completions', json=bad).status_code}", None)
    if kind == "unknown":
        return (f"unknown {client.post(url + '/v1/completions', json={**body, 'model': 'no-such'}).status_code}", None)
    name = f"soak{job['i'] % 4}"
    r = client.post(url + "/v1/adapters", json={"name": name, "path": plan.copy_from})
    d = client.delete(url + f"/v1/adapters/{name}")
    return (f"admin {r.status_code}/{d.status_code}", None)


def soak(url: str, plan: Plan, rss=None) -> dict:
    """Run ``plan`` against the server at ``url``; ``rss()`` (optional) reads the process RSS in bytes."""
    rng = random.Random(plan.seed)
    jobs = [_job(rng, plan, i) for i in range(plan.requests)]
    warm = jobs[: max(plan.clients, plan.requests // 8)]
    outcomes: Counter[str] = Counter()
    answers: list[tuple[dict, str]] = []
    lock = threading.Lock()
    local = threading.local()

    def one(job: dict) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120, headers=plan.headers)
        outcome, text = _send(local.client, url, job, plan)
        with lock:
            outcomes[outcome] += 1
            if outcome in ("valid 200", "stream 200"):
                answers.append((job, text))

    start = time.monotonic()
    with ThreadPoolExecutor(plan.clients) as pool:
        list(pool.map(one, warm))
        rss_warm = rss() if rss else None
        list(pool.map(one, jobs[len(warm) :]))
    return {"outcomes": dict(sorted(outcomes.items())), "answers": answers, "wall_s": time.monotonic() - start,
            "rss_after_warmup": rss_warm, "rss_end": rss() if rss else None}  # fmt: skip


def solo_answers(model_dir: Path, adapters_dir: Path, jobs: list[dict]) -> list[str]:
    """Each job's greedy answer with the model alone (``generate``, its adapter routed), for comparison."""
    import torch

    import lorakit

    model, tokenizer = lorakit.load_model(model_dir)
    for name in sorted({j["model"] for j in jobs if (adapters_dir / j["model"]).is_dir()}):
        lorakit.load_adapter(model, adapters_dir / name, name=name)
    out, seen = [], {}
    for job in jobs:
        key = (job["model"], job["prompt"], job["max_tokens"])
        if key not in seen:
            ids = torch.tensor([tokenizer(job["prompt"]).input_ids])
            adapter = job["model"] if (adapters_dir / job["model"]).is_dir() else None
            with torch.no_grad(), lorakit.route(model, [adapter]):
                y = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["max_tokens"],
                                   do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.eos_token_id)  # fmt: skip
            seen[key] = tokenizer.decode(y[0, ids.shape[1] :], skip_special_tokens=True)
        out.append(seen[key])
    return out


def _save_adapters(model_dir: Path, folder: Path) -> Path:
    """Four random adapters (r=8 on q,k,v,o, non-zero B) of the model, one sub-folder each."""
    import torch

    import lorakit
    from lorakit import LoraConfig

    model, _ = lorakit.load_model(model_dir)
    gen = torch.Generator().manual_seed(0)
    for name in Plan().adapters:
        lorakit.add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]), name=name)  # fmt: skip
        with torch.no_grad():
            for t in lorakit.adapter_state_dict(model, name).values():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
        lorakit.save_adapter(model, folder / name, name=name)
    return folder


def main() -> None:
    import os

    import psutil
    import torch

    from lorakit.models import default_model_name, ensure_cached, load_model
    from lorakit.serve.server import build_state, serve_in_thread

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_soak.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = ensure_cached(default_model_name())
        adapters = _save_adapters(model_dir, Path(tmp))
        model, tokenizer = load_model(model_dir)
        state = build_state(model, tokenizer, base_name="base", adapters_dir=adapters, max_batch_size=16)
        plan = Plan(clients=args.clients, requests=args.requests, max_tokens=args.max_tokens, base="base")
        process = psutil.Process(os.getpid())
        with serve_in_thread(state) as url:
            result = soak(url, plan, rss=lambda: process.memory_info().rss)
            pins = dict(state.registry._pins)
            health = httpx.get(url + "/health").status_code
        expected = solo_answers(model_dir, adapters, [job for job, _ in result["answers"]])
    mismatches = sum(text != want for (_, text), want in zip(result["answers"], expected, strict=True))
    report = {
        "command": "python benchmarks/soak_serve.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                 vars(args).items() if k != "out"),  # fmt: skip
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": "SmolLM2-135M-Instruct (fp32, CPU), 4 adapters r=8 on q,k,v,o", "clients": plan.clients,
        "requests": plan.requests, "max_tokens": plan.max_tokens, "outcomes": result["outcomes"],
        "valid_answers": len(result["answers"]), "valid_answers_differing_from_solo_greedy": mismatches,
        "pins_left": pins, "health_after": health, "wall_s": round(result["wall_s"], 1),
        "rss_after_warmup_mib": round(result["rss_after_warmup"] / 2**20, 1),
        "rss_end_mib": round(result["rss_end"] / 2**20, 1),
        "rss_growth_mib": round((result["rss_end"] - result["rss_after_warmup"]) / 2**20, 1),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
