"""API keys on a real server: Bearer keys (the openai client and raw HTTP), admin keys for adapter changes, open
/health and web-page paths, and the refusal to bind a network address without a key."""

from __future__ import annotations

import httpx
import pytest
from serve_helpers import running_server

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.serve.auth import Keys, check_bind, is_loopback, matches

KEY, OTHER, ADMIN = "sk-test-key-1", "sk-test-key-2", "sk-admin-key-1"


@pytest.fixture(scope="module")
def server(tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir, keys=Keys(api=(KEY, OTHER), admin=(ADMIN,))) as (url, state):
        yield url, state


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_endpoint_but_health_needs_a_key(server):
    url, _ = server
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/adapters"),
                         ("POST", "/v1/completions"), ("GET", "/nothing-here"), ("GET", "/openapi.json")]:  # fmt: skip
        r = httpx.request(method, url + path, json=body)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        r = httpx.request(method, url + path, json=body, headers=_auth("sk-wrong-key"))
        assert r.status_code == 401 and "Incorrect API key" in r.json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/ui/app.js").status_code == 404  # open path: not refused (the web page serves it)
    for key in (KEY, OTHER, ADMIN):
        r = httpx.post(url + "/v1/completions", json=body, headers=_auth(key), timeout=30)
        assert r.status_code == 200, r.text
    assert 'lorakit_http_errors_total{status="401"}' in httpx.get(url + "/metrics", headers=_auth(KEY)).text


def test_only_admin_keys_load_or_delete_adapters(server):
    url, _ = server
    r = httpx.post(url + "/v1/adapters", json={"name": "copy", "path": "a0"}, headers=_auth(KEY), timeout=30)
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    assert httpx.delete(url + "/v1/adapters/a0", headers=_auth(KEY)).status_code == 403
    r = httpx.post(url + "/v1/adapters", json={"name": "copy", "path": "a0"}, headers=_auth(ADMIN), timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.delete(url + "/v1/adapters/copy", headers=_auth(ADMIN), timeout=30).status_code == 200


def test_the_openai_client_sends_its_key(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    ok = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(model="a1", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-not-this-one", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_matches_compares_every_key():
    assert matches("sk-test-key-2", (KEY, OTHER)) and not matches("sk-test-key", (KEY, OTHER))
    assert not matches("", (KEY,)) and not matches(KEY, ())


def test_network_binding_needs_a_key_or_no_auth(monkeypatch, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    with pytest.raises(ConfigError, match="--no-auth"):
        check_bind("0.0.0.0", Keys(), no_auth=False)
    check_bind("0.0.0.0", Keys(api=(KEY,)), no_auth=False)
    check_bind("0.0.0.0", Keys(), no_auth=True)
    check_bind("127.0.0.1", Keys(), no_auth=False)
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--adapters", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: --host 0.0.0.0") and err.count("\n") == 1
    monkeypatch.setenv("LORAKIT_API_KEY", KEY)  # the key from the environment counts: the next check is reached
    assert main(["serve", "--host", "0.0.0.0", "--adapters", "/nonexistent"]) == 1
    assert "--adapters '/nonexistent' is not a folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="at least 8 characters"):
        Keys(api=("short",))
