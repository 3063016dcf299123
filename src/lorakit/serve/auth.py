"""API keys: ``Authorization: Bearer KEY`` on every endpoint except /health and the web page's static files.

Keys are compared in constant time (`hmac.compare_digest` against every configured key, no early exit), so the
time of a refusal says nothing about how much of a key was right. Admin keys, when configured, are the only keys
that may load or delete adapters (``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``); they also work
everywhere else. The check is a plain ASGI middleware: it runs before routing, so an unknown path without a key
gets 401, never a hint of what exists.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass

from lorakit.errors import ConfigError

# open without a key: the health probe, and the web page (it sends the user's key as a Bearer header itself)
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/ui/",)
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass(frozen=True)
class Keys:
    """The keys one server accepts (empty: no authentication)."""

    api: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        short = [k for k in (*self.api, *self.admin) if len(k) < 8]
        if short:
            raise ConfigError(f"API keys must be at least 8 characters; {len(short)} key(s) are shorter")

    @property
    def required(self) -> bool:
        return bool(self.api or self.admin)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def is_admin_request(method: str, path: str) -> bool:
    return (method == "POST" and path.rstrip("/") == "/v1/adapters") or (
        method == "DELETE" and path.startswith("/v1/adapters/")
    )


def matches(token: str, keys: tuple[str, ...]) -> bool:
    """Whether ``token`` equals one of ``keys``; every key is compared, in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: Keys, no_auth: bool) -> None:
    """Refuse to listen on a network address without keys, unless ``no_auth`` says that is intended.

    Raises:
        ConfigError: non-loopback ``host``, no key and no ``no_auth``.
    """
    if not keys.required and not no_auth and not is_loopback(host):
        raise ConfigError(
            f"--host {host} is reachable from other machines, and no API key is set; give --api-key KEY (or "
            "LORAKIT_API_KEY), or --no-auth to serve without keys on purpose"
        )


class KeyCheck:
    """ASGI middleware: 401 (no or wrong key) or 403 (not an admin key) before the app sees the request."""

    def __init__(self, app, keys: Keys, on_reject=None) -> None:
        self.app, self.keys, self.on_reject = app, keys, on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.keys.required or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        admin = bool(self.keys.admin) and is_admin_request(scope["method"], scope["path"])
        if token is not None and matches(token, self.keys.admin if admin else (*self.keys.api, *self.keys.admin)):
            await self.app(scope, receive, send)
            return
        if token is not None and admin and matches(token, self.keys.api):
            await self._reject(send, 403, "this key may not load or delete adapters; use an admin key", "forbidden")
            return
        message = (
            "Incorrect API key provided; send 'Authorization: Bearer KEY' with a key this server was started with"
            if token
            else "Missing API key; send 'Authorization: Bearer KEY' (the server was started with --api-key)"
        )
        await self._reject(send, 401, message, "invalid_api_key")

    async def _reject(self, send, status: int, message: str, code: str) -> None:
        if self.on_reject is not None:
            self.on_reject(status)
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None
