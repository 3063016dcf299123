"""The web page's server side: static files without CDN, adapter cards and spectra against the files, runs on disk."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ADAPTER_CONFIGS
from safetensors.torch import load_file
from serve_helpers import running_server

from lorakit.arith import inspect_adapter
from lorakit.serve.runs import find_runs, read_metrics
from lorakit.serve.ui import is_public_path, static_files


def test_page_and_its_assets_load_from_the_package_and_nothing_else(tiny_serve_dir, adapters_dir):
    files = static_files()
    assert {"index.html", "style.css", "core.js", "chart.js", "compare.js", "adapters.js", "runs.js"} <= set(files)
    with running_server(tiny_serve_dir, adapters_dir) as (url, _):
        page = httpx.get(url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        refs = re.findall(r'(?:src|href)="(?!data:)([^"#]+)"', page.text)
        assert refs and all(r.startswith("/ui/") for r in refs), refs  # no CDN, no other host
        for ref in refs:
            asset = httpx.get(url + ref)
            assert asset.status_code == 200 and asset.content == files[ref.removeprefix("/ui/")]
        assert httpx.get(url + "/ui/missing.js").status_code == 404
        assert all(is_public_path(r) for r in ["/", *refs]) and not is_public_path("/v1/ui/runs")
    for name, body in files.items():  # the JS fetches only this server's own paths
        assert not re.search(rb"fetch\(\s*[\"'`]https?:", body), name
        assert b"import(" not in body and b"cdn" not in body.lower(), name


def test_adapter_cards_report_the_files(tiny_serve_dir, fresh_adapters):
    adapters_dir = fresh_adapters
    (adapters_dir / "a2" / "README.md").write_text("# a2\nA random adapter for tests.\n")
    with running_server(tiny_serve_dir, adapters_dir) as (url, _):
        cards = {c["name"]: c for c in httpx.get(url + "/v1/ui/adapters").json()["data"]}
    assert sorted(cards) == sorted(ADAPTER_CONFIGS)
    for name, config in ADAPTER_CONFIGS.items():
        card, folder = cards[name], adapters_dir / name
        tensors = load_file(folder / "adapter_model.safetensors")
        assert (card["r"], card["lora_alpha"]) == (config.r, config.lora_alpha)
        saved = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
        assert card["target_modules"] == sorted(saved)
        assert config.target_modules == "all-linear" or sorted(saved) == sorted(config.target_modules)
        assert card["parameters"] == sum(t.numel() for t in tensors.values())
        assert card["size_bytes"] == sum(p.stat().st_size for p in folder.iterdir())
        assert card["status"] == "servable" and card["error"] is None
    assert cards["a2"]["readme"].startswith("# a2") and cards["a0"]["readme"] is None


def test_spectrum_endpoint_is_the_inspect_report(tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir) as (url, _):
        got = httpx.get(url + "/v1/ui/adapters/a1/spectrum").json()
        missing = httpx.get(url + "/v1/ui/adapters/nope/spectrum")
    want = json.loads(json.dumps(inspect_adapter(adapters_dir / "a1").to_dict()))
    assert got == want and len(got["layers"]) == 14  # all-linear: 7 projections x 2 layers
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def test_card_status_follows_load_and_unload(tiny_serve_dir, fresh_adapters):
    with running_server(tiny_serve_dir, fresh_adapters) as (url, _):

        def status() -> str:
            return {c["name"]: c["status"] for c in httpx.get(url + "/v1/ui/adapters").json()["data"]}["a0"]

        assert status() == "servable"
        assert httpx.post(url + "/v1/adapters", json={"name": "a0"}).status_code == 200
        assert status() == "loaded"
        assert httpx.delete(url + "/v1/adapters/a0").status_code == 200
        assert status() == "not served"


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")


def test_metrics_are_read_in_complete_lines_from_an_offset(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    write_lines(path, ['{"step": 1, "loss": 2.5}\n', '{"step": 2, "loss": NaN}\n', "not json\n", '{"step": 3, "lo'])
    first = read_metrics(path)
    assert [r["step"] for r in first.records] == [1, 2] and first.records[1]["loss"] is None
    assert first.offset == path.stat().st_size - len('{"step": 3, "lo')  # the half-written line waits
    with open(path, "a", encoding="utf-8") as f:
        f.write('ss": 1.5}\n')
    second = read_metrics(path, first.offset)
    assert second.records == [{"step": 3, "loss": 1.5}] and second.offset == path.stat().st_size
    assert read_metrics(path, second.offset + 100).records[0]["step"] == 1  # a replaced file starts over


def test_runs_are_found_two_levels_down(tmp_path):
    write_lines(tmp_path / "a" / "metrics.jsonl", ['{"step": 1}\n'])
    write_lines(tmp_path / "sweep" / "r4" / "run.json", ["{}"])
    write_lines(tmp_path / "sweep" / "r4" / "checkpoint-2" / "metrics.jsonl", ['{"step": 1}\n'])
    write_lines(tmp_path / "x" / "y" / "z" / "metrics.jsonl", ['{"step": 1}\n'])
    assert sorted(find_runs(tmp_path)) == ["a", "sweep/r4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_command_serves_the_runs_of_a_folder(tmp_path):
    write_lines(tmp_path / "r1" / "metrics.jsonl", ['{"step": 1, "loss": 3.0, "lr": 0.001}\n'])
    write_lines(
        tmp_path / "r1" / "eval_results.json", [json.dumps({"before": {"eval_loss": 3.2}, "after": {"eval_loss": 1.1}})]
    )
    port = _free_port()
    cmd = [sys.executable, "-m", "lorakit", "ui", str(tmp_path), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                info = httpx.get(url + "/v1/ui/info").json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        assert info == {"base": None, "merged": None, "adapters": False, "runs": str(tmp_path)}
        runs = httpx.get(url + "/v1/ui/runs").json()["data"]
        assert [(r["name"], r["status"], r["eval_after"]) for r in runs] == [("r1", "finished", {"eval_loss": 1.1})]
        page = httpx.get(url + "/v1/ui/runs/metrics", params={"run": "r1"}).json()
        assert page["records"] == [{"step": 1, "loss": 3.0, "lr": 0.001}]
        escape = httpx.get(url + "/v1/ui/runs/metrics", params={"run": "../r1"})
        assert escape.status_code == 404 and "r1" in escape.json()["error"]["message"]
        assert httpx.get(url + "/v1/completions").status_code in (404, 405)  # no model here
        assert httpx.get(url + "/").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("argv", [["ui", "/no/such/folder"], ["serve", "--runs", "/no/such/folder"]])
def test_a_missing_runs_folder_is_one_error_line(argv, capsys):
    from lorakit.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error:") and "/no/such/folder" in err and len(err.strip().splitlines()) == 1


def test_every_page_file_is_declared_as_package_data():
    """The wheel carries the page only if pyproject's package-data globs cover every file of static/."""
    import fnmatch

    import lorakit.serve

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    globs = re.findall(r'"(static/[^"]+)"', re.search(r'"lorakit\.serve" = \[(.*?)\]', text).group(1))
    static = Path(lorakit.serve.__file__).parent / "static"
    names = [p.relative_to(static.parent).as_posix() for p in static.iterdir()]
    assert names and all(any(fnmatch.fnmatch(n, g) for g in globs) for n in names), (names, globs)
