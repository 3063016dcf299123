"""The web page in a real browser (Debian's chromium driven by Playwright) against a real server on loopback.

Set ``LORAKIT_SCREENSHOTS=DIR`` to also save a screenshot of each view there (``python scripts/screenshots.py``
writes the README's, ``docs/*.png``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file
from serve_helpers import running_server, slow_down
from train_helpers import make_char_tokenizer, make_tiny_llama, pc_rows, write_jsonl

from lorakit.arith import inspect_adapter

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip
SHOTS = os.environ.get("LORAKIT_SCREENSHOTS")
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: `bash scripts/setup.sh` installs Debian's chromium (apt-get install chromium)"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        path = Path(SHOTS) / f"{name}.png"
        page.screenshot(path=str(path))
        from PIL import Image  # matplotlib's dependency; a 64-colour palette keeps the README's images small

        Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)


def api_answer(url: str, model: str, prompt: str, max_tokens: int) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


def test_compare_streams_the_api_answers_side_by_side(page, tiny_serve_dir, adapters_dir, tmp_path):
    with running_server(tiny_serve_dir, adapters_dir) as (url, _):
        page.goto(url + "/")
        page.wait_for_selector("#model-list input")
        picked = page.eval_on_selector_all("#model-list input:checked", "els => els.map(e => e.value)")
        assert picked == ["tiny", "a0", "a1"]  # the base and the first two adapters
        page.fill("#max-tokens", "12")
        page.fill("#prompt", "Once upon a time")
        page.press("#prompt", "Enter")
        for model in picked:
            page.wait_for_selector(f".column[data-model={model}] .answer[data-state=done]")
        shown = {m: page.text_content(f".column[data-model={m}] .answer") for m in picked}
        want = {m: api_answer(url, m, "Once upon a time", 12) for m in picked}
        assert shown == want and len(set(shown.values())) == 3, shown
        stats = page.text_content(".column[data-model=a1] .stats")
        assert "tokens/s" in stats and stats.startswith("12 tokens"), stats

        page.check("#diff-toggle")
        assert page.locator(".column[data-model=a0] mark").count() > 0
        assert page.text_content(".column[data-model=a0] .answer") == want["a0"]  # marks change no text
        shot(page, "compare")

        page.click(".column[data-model=a1] button:has-text('Copy Python')")
        code = page.evaluate("navigator.clipboard.readText()")
        script = tmp_path / "snippet.py"
        script.write_text(code)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout == want["a1"] + "\n", out.stderr
        assert page.errors == []


def test_a_broken_adapter_is_said_in_words(page, tiny_serve_dir, fresh_adapters):
    (fresh_adapters / "a3" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with running_server(tiny_serve_dir, fresh_adapters) as (url, _):
        page.goto(url + "/#adapters")
        page.wait_for_selector("[data-adapter=a3] p.error")
        assert "cannot be read" in page.text_content("[data-adapter=a3] p.error")
        page.click("[data-adapter=a3] button:has-text('Load')")
        page.wait_for_selector("[data-adapter=a3] p.error:has-text('Could not load')")
        said = page.text_content("[data-adapter=a3] p[role=status]")
        assert said.startswith("Could not load: ") and "a3" in said, said
        page.errors = [e for e in page.errors if "400" not in e]  # the refused load, logged by the browser
        assert page.errors == []


def test_adapter_view_draws_the_spectrum(page, tiny_serve_dir, adapters_dir):
    report = inspect_adapter(adapters_dir / "a1")
    with running_server(tiny_serve_dir, adapters_dir) as (url, _):
        page.goto(url + "/#adapters")
        lines = page.locator("[data-adapter=a1] .spectrum svg path[data-series]")
        lines.first.wait_for()
        assert lines.count() == len(report.layers)
        eff = sorted(s.effective_rank_90 for s in report.layers)[len(report.layers) // 2]
        assert f"median effective rank (90% energy) {eff}" in page.text_content("[data-adapter=a1] .spectrum-summary")
        card = page.text_content("[data-adapter=a1] dl")
        params = sum(t.numel() for t in load_file(adapters_dir / "a1" / "adapter_model.safetensors").values())
        assert "Rank r8" in card and "down_proj, gate_proj, k_proj" in card and f"parameters{params:,}" in card
        page.click("[data-adapter=a0] button:has-text('Load')")
        page.wait_for_selector("[data-adapter=a0] .badge.loaded")
        shot(page, "adapters")
        assert page.errors == []


R8_POINTS = "Number(document.querySelector('#chart-loss path[data-series=r8]')?.dataset.points)"


def metric_points(page, series: str) -> int:
    return int(page.get_attribute(f"#chart-loss path[data-series='{series}']", "data-points") or 0)


def test_runs_view_grows_while_a_run_trains(page, tiny_serve_dir, tmp_path):
    from lorakit.training import run_training

    runs = tmp_path / "runs"
    runs.mkdir()
    data = write_jsonl(tmp_path / "data.jsonl", pc_rows(48))
    model = make_tiny_llama()
    spec = {"data": str(data), "output_dir": str(runs / "r8"), "max_steps": 30, "logging_steps": 1, "eval_steps": 10,
            "batch_size": 8, "learning_rate": 1e-2, "progress": False, "precision": "fp32", "eval_generate": False,
            "r": 8, "lora_alpha": 16}  # fmt: skip
    with running_server(tiny_serve_dir) as (url, state):
        state.runs_dir = runs
        page.goto(url + "/?poll=150#runs")
        page.wait_for_selector("#runs-empty")
        assert "No training runs in" in page.text_content("#runs-empty")
        run_training(
            {**spec, "output_dir": str(runs / "r4"), "max_steps": 10, "r": 4, "lora_alpha": 8},
            model=make_tiny_llama(),
            tokenizer=make_char_tokenizer(),
        )  # a finished run of the sweep
        page.wait_for_selector("#chart-loss path[data-series=r4]")
        slow_down(model, 0.03)  # a real run, slowed so that the page sees it part-way
        done: list = []
        trainer = threading.Thread(
            target=lambda: done.append(run_training(spec, model=model, tokenizer=make_char_tokenizer()))
        )
        trainer.start()
        try:
            page.wait_for_function(
                "Number(document.querySelector('#chart-loss path[data-series=r8]')?.dataset.points) >= 2"
            )
            early = metric_points(page, "r8")
            page.wait_for_function(
                f"Number(document.querySelector('#chart-loss path[data-series=r8]').dataset.points) > {early}"
            )
        finally:
            trainer.join(300)
        assert done and done[0].status == "completed" and early < 30
        records = [json.loads(x) for x in (runs / "r8" / "metrics.jsonl").read_text().splitlines()]
        want = sum("loss" in r for r in records)
        evals = sum("eval_loss" in r for r in records)
        assert want == 30 and evals == 3  # eval_steps=10
        # the last loss and the last eval loss are separate records: the page may draw them one poll apart
        points = "Number(document.querySelector(\"#chart-loss path[data-series='{}']\")?.dataset.points)"
        page.wait_for_function(f"{points.format('r8')} === {want} && {points.format('r8 (eval)')} === {evals}")
        assert metric_points(page, "r8") == 30 and metric_points(page, "r8 (eval)") == 3
        page.wait_for_selector("#eval-table tr:has(th:text-is('r8')) td:has-text('finished')")
        cell = page.text_content("#eval-table tr:has(th:text-is('r8')) td.num")
        before, after = (float(x) for x in cell.split(" → "))
        assert before == pytest.approx(done[0].before["eval_loss"], rel=1e-3)
        assert after == pytest.approx(done[0].after["eval_loss"], rel=1e-3)
        differing = page.eval_on_selector_all("#config-table tr.differs th", "els => els.map(e => e.textContent)")
        assert {"r", "lora_alpha", "max_steps", "output_dir"} <= set(differing), differing
        shot(page, "runs")
        page.set_viewport_size({"width": 390, "height": 800})
        shot(page, "runs-phone")
        assert page.errors == []


def test_chat_with_a_key_entered_once_and_keyboard_tabs(page, tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir) as (url, _):
        sent: list = []
        page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))) if "/v1/" in r.url else None)
        page.goto(url + "/")
        page.click("#keys summary")
        page.fill("#api-key", "k-123")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#model-list input")
        page.uncheck("#model-list input[value=a1]")
        page.check("input[name=mode][value=chat]")
        page.fill("#max-tokens", "8")
        page.fill("#prompt", "Hi there")
        page.press("#prompt", "Enter")
        for model in ("tiny", "a0"):
            page.wait_for_selector(f".column[data-model={model}] .answer[data-state=done]")
            body = {
                "model": model,
                "messages": [{"role": "user", "content": "Hi there"}],
                "max_tokens": 8,
                "temperature": 0,
            }
            want = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
            assert page.text_content(f".column[data-model={model}] .answer") == want["content"]
            assert "You" in page.text_content(f".column[data-model={model}] .turns")
        assert page.input_value("#prompt") == ""  # ready for the next turn
        assert sent and all(auth == "Bearer k-123" for _, auth in sent[-3:]), sent
        page.reload()  # the key is remembered by this browser
        page.wait_for_selector("#model-list input")
        assert sent[-1][1] == "Bearer k-123"
        page.focus("#tab-compare")
        page.keyboard.press("ArrowRight")
        assert page.get_attribute("#tab-adapters", "aria-selected") == "true" and page.is_visible("#view-adapters")
        assert page.evaluate("document.activeElement.id") == "tab-adapters"
        assert page.errors == []


def test_the_page_asks_for_a_key_and_says_what_a_key_may_not_do(page, tiny_serve_dir, fresh_adapters):
    """With API keys (issue #11's `lorakit.serve.auth`): the page loads without one, asks for one, works with one."""
    auth = pytest.importorskip("lorakit.serve.auth", reason="API keys arrive with issue #11")
    with running_server(
        tiny_serve_dir, fresh_adapters, keys=auth.Keys(api=("user-key-1",), admin=("admin-key-1",))
    ) as (
        url,
        _,
    ):
        assert httpx.get(url + "/v1/ui/info").status_code == 401
        page.goto(url + "/")
        page.wait_for_selector("#page-error:not([hidden])")
        assert "needs an API key" in page.text_content("#page-error") and page.is_visible("#api-key")
        page.fill("#api-key", "user-key-1")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#model-list input")
        page.click("#tab-adapters")
        page.click("[data-adapter=a0] button:has-text('Unload')")  # no admin key typed: the API key is sent
        page.wait_for_selector("[data-adapter=a0] p.error")
        assert "admin key" in page.text_content("[data-adapter=a0] p.error")
        if not page.is_visible("#admin-key"):
            page.click("#keys summary")
        page.fill("#admin-key", "admin-key-1")
        page.click("#key-form button[type=submit]")
        page.click("[data-adapter=a0] button:has-text('Unload')")
        page.wait_for_selector("[data-adapter=a0] .badge:has-text('not served')")
        page.errors = [e for e in page.errors if "401" not in e and "403" not in e]  # the refused requests, logged
        assert page.errors == []
