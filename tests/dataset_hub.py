"""A minimal loopback Hugging Face Hub for dataset repositories: just the calls ``datasets.load_dataset`` makes.

(Issue #12 brings a fuller fake Hub, ``tests/hub_server.py``; once it is on main this file can give way to it.)

- ``GET /api/datasets/{repo}[/revision/{rev}]``: repo info (``sha``, ``siblings``);
- ``GET /api/datasets/{repo}/tree/{rev}[/{dir}]``: the file listing;
- ``HEAD|GET /datasets/{repo}/resolve/{rev}/{file}``: the file with ``X-Repo-Commit`` and ``ETag``;
- unknown repos and files: 404 with the Hub's ``X-Error-Code`` (``RepoNotFound`` / ``EntryNotFound``).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class DatasetHub:
    """``with DatasetHub() as hub: hub.add("org/name", {"train.csv": "..."})``; ``hub.url`` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}  # repo -> (sha, files)
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None

    def add(self, repo: str, files: dict[str, str | bytes]) -> str:
        data = {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
        sha = hashlib.sha1(repr(sorted(data.items())).encode()).hexdigest()
        self.repos[repo] = (sha, data)
        return sha

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> DatasetHub:
        hub = self

        class Handler(_Handler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


_INFO = re.compile(r"/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?")
_TREE = re.compile(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?")
_FILE = re.compile(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


class _Handler(BaseHTTPRequestHandler):
    owner: DatasetHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj: object, head: bool) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

    def _missing(self, code: str, head: bool, sha: str | None = None) -> None:
        extra = {"X-Repo-Commit": sha} if sha else {}
        self._send(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code, **extra}, head)

    def _serve(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.owner.requests.append((self.command, path))
        for pattern, handler in ((_TREE, self._tree), (_INFO, self._info), (_FILE, self._file)):
            m = pattern.fullmatch(path)
            if m:
                repo = self.owner.repos.get(m.group(1))
                if repo is None:
                    return self._missing("RepoNotFound", head)
                return handler(repo, m, head)
        self._missing("EntryNotFound", head)

    def _info(self, repo, m, head: bool) -> None:
        sha, files = repo
        self._json({"id": m.group(1), "sha": sha, "siblings": [{"rfilename": f} for f in sorted(files)]}, head)

    def _tree(self, repo, m, head: bool) -> None:
        sha, files = repo
        prefix = (m.group(3) or "").strip("/")
        entries = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                   for f, b in sorted(files.items()) if not prefix or f.startswith(prefix + "/")]  # fmt: skip
        self._json(entries, head)

    def _file(self, repo, m, head: bool) -> None:
        sha, files = repo
        body = files.get(m.group(3))
        if body is None:
            return self._missing("EntryNotFound", head, sha)
        etag = f'"{hashlib.sha1(body).hexdigest()}"'
        self._send(200, body, {"X-Repo-Commit": sha, "ETag": etag, "Content-Type": "application/octet-stream"}, head)
