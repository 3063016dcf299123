"""A real loopback HTTP server that speaks the Hugging Face Hub's download protocol, for tests (no internet).

Reusable for any repository type (models, datasets, spaces)::

    from hub_server import FakeHub

    with FakeHub() as hub:                         # starts on 127.0.0.1:<free port>
        sha = hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": data})
        hub.add_repo("org/tiny", {...}, revision="v2")          # another branch/tag of the same repo
        hub.add_repo("org/private", files, gated=True, token="hf_secret")  # 401 without the token
        hub.add_repo("org/rows", {"data/train-0.jsonl": b"..."}, repo_type="dataset")  # datasets.load_dataset
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        ...
        hub.requests       # [(method, path), ...] of every request served, in order
        hub.file_requests()  # only the /resolve/ ones (cache-reuse checks)

What it implements (read from huggingface_hub's own client code, so the client needs no patching):

- ``GET /api/{models,datasets,spaces}/{repo}[/revision/{rev}]``: repo info with ``sha`` and ``siblings``.
- ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]``: the listing (one page; ``recursive`` honoured), folders as
  ``type: directory`` entries as the Hub lists them (``datasets`` walks them to find ``data/train-*`` files).
- ``HEAD|GET /[datasets/|spaces/]{repo}/resolve/{rev}/{file}``: the file, with ``X-Repo-Commit``, ``ETag``
  (git-sha1 of the bytes, or the sha256 for files over ``lfs_threshold``, with ``X-Linked-Etag`` /
  ``X-Linked-Size``), ``Content-Length`` and ``Range`` support.
- Errors as the Hub sends them (status + ``X-Error-Code``): ``RepoNotFound`` (404), ``RevisionNotFound``
  (404), ``EntryNotFound`` (404, with ``X-Repo-Commit``), ``GatedRepo`` (401 without a token, 403 with a
  wrong one).

A revision is a branch/tag name or a (full) commit sha; every ``add_repo`` call makes one commit whose sha
is returned.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

__all__ = ["FakeHub"]

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


@dataclass
class _Repo:
    repo_type: str
    gated: bool = False
    token: str | None = None
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A Hub on loopback; a context manager (or call `start` / `stop`)."""

    def __init__(self, lfs_threshold: int = 1024) -> None:
        """Args: lfs_threshold: files of at least this many bytes are served as LFS files (sha256 ETag)."""
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- setup ---------------------------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str],
        *,
        revision: str = "main",
        repo_type: str = "model",
        gated: bool = False,
        token: str | None = None,
    ) -> str:
        """Commits ``files`` (name -> bytes/text) as the whole tree of ``revision``; returns the commit sha.

        ``gated=True`` answers 401 (GatedRepo) unless the request carries ``Authorization: Bearer <token>``.
        """
        data = {name: body.encode() if isinstance(body, str) else bytes(body) for name, body in files.items()}
        repo = self.repos.setdefault((repo_type, repo_id), _Repo(repo_type))
        repo.gated, repo.token = gated or repo.gated, token or repo.token
        listing = "".join(f"{n}:{_git_sha1(b)}\n" for n, b in sorted(data.items()))
        sha = hashlib.sha1(f"{repo_type}/{repo_id}@{revision}#{len(repo.commits)}\n{listing}".encode()).hexdigest()
        repo.commits[sha] = data
        repo.refs[revision] = sha
        return sha

    @property
    def url(self) -> str:
        """The endpoint to put in ``HF_ENDPOINT``."""
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def file_requests(self) -> list[tuple[str, str]]:
        """The requests for files (``/resolve/``), HEAD and GET."""
        return [r for r in self.requests if "/resolve/" in r[1]]

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lookups -------------------------------------------------------------------------------------------
    def _repo(self, repo_type: str, repo_id: str) -> _Repo | None:
        return self.repos.get((repo_type, repo_id))

    def _commit(self, repo: _Repo, revision: str) -> str | None:
        if revision in repo.refs:
            return repo.refs[revision]
        return revision if revision in repo.commits else None


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch(head=False)

    # -- routing -------------------------------------------------------------------------------------------
    def _dispatch(self, head: bool) -> None:
        parsed = urlparse(self.path)
        path = unquote(parsed.path)
        with self.owner._lock:
            self.owner.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in _TYPES:
            self._api(_TYPES[parts[1]], parts[2:], parse_qs(parsed.query), head)
            return
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = _TYPES[parts[0]], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(repo_type, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
            return
        self._error(404, "RepoNotFound", f"no route for {path}")

    def _authorized(self, repo_type: str, repo_id: str) -> _Repo | None:
        """The repo if the request may see it; otherwise sends the Hub's error and returns None."""
        repo = self.owner._repo(repo_type, repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated:
            auth = self.headers.get("Authorization", "")
            if not auth:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must be authenticated.")
                return None
            if auth != f"Bearer {repo.token}":
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the list.")
                return None
        return repo

    def _api(self, repo_type: str, parts: list[str], query: dict, head: bool) -> None:
        repo_id = "/".join(parts[:2])
        rest = parts[2:]
        repo = self._authorized(repo_type, repo_id)
        if repo is None:
            return
        revision = rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree") else "main"
        sha = self.owner._commit(repo, revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        files = repo.commits[sha]
        if rest and rest[0] == "tree":
            prefix = "/".join(rest[2:])
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            entries = [{"type": "directory", "path": d, "oid": _git_sha1(d.encode())} for d in _folders(files, prefix)
                       if recursive or "/" not in d[len(prefix) + 1 if prefix else 0 :]]  # fmt: skip
            entries += [self._tree_entry(n, b) for n, b in sorted(files.items()) if _under(n, prefix, recursive)]
            self._json(entries, head)
            return
        info = {
            "id": repo_id, "_id": sha[:24], "sha": sha, "private": False, "gated": "auto" if repo.gated else False,
            "disabled": False, "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": n, "size": len(b)} for n, b in sorted(files.items())],
        }  # fmt: skip
        self._json(info, head)

    def _tree_entry(self, name: str, body: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(body), "oid": _git_sha1(body)}
        if len(body) >= self.owner.lfs_threshold:
            entry["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 134}
        return entry

    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self._authorized(repo_type, repo_id)
        if repo is None:
            return
        sha = self.owner._commit(repo, revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        body = repo.commits[sha].get(filename)
        if body is None:
            self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}", commit=sha)
            return
        lfs = len(body) >= self.owner.lfs_threshold
        etag = hashlib.sha256(body).hexdigest() if lfs else _git_sha1(body)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(body))})
        status, start = 200, 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and not head:
            start = int(ranged[6:].split("-")[0] or 0)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        self._send(status, body[start:], "application/octet-stream", headers, head)

    # -- responses -----------------------------------------------------------------------------------------
    def _json(self, obj: object, head: bool) -> None:
        self._send(200, json.dumps(obj).encode(), "application/json", {}, head)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit is not None:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), "application/json", headers, self.command == "HEAD")

    def _send(self, status: int, body: bytes, kind: str, headers: dict[str, str], head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _folders(files: dict[str, bytes], prefix: str) -> list[str]:
    """The folders below ``prefix`` that hold files (every level), as the Hub lists them: ``type: directory``."""
    found = {"/".join(n.split("/")[:k]) for n in files for k in range(1, n.count("/") + 1)}
    return sorted(d for d in found if _under(d, prefix, True))


def _under(name: str, prefix: str, recursive: bool) -> bool:
    if prefix and not name.startswith(prefix.rstrip("/") + "/"):
        return False
    rest = name[len(prefix.rstrip("/")) + 1 :] if prefix else name
    return recursive or "/" not in rest
