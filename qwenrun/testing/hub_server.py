"""A loopback Hugging Face Hub for tests and benchmarks: repos of files over the hub's HTTP API.

Contract: `HubServer` serves, on 127.0.0.1 in a background thread, the endpoints and headers
huggingface_hub 2.x (and qwenrun's downloader) call: model info with file metadata
(`GET /api/models/{repo}[/revision/{rev}]`), the recursive tree (`GET /api/models/{repo}/tree/
{rev}[/{path}]`), and `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with `ETag`, `X-Repo-Commit`,
`X-Linked-Etag`, `X-Linked-Size`, `Content-Length` and `Range` → 206 with `Content-Range`. Like
the real hub, `resolve` answers LFS files with a 302 to a content URL (on this same server).
Knobs make it misbehave on purpose: cut a connection after N bytes, advertise a wrong sha256 or
a huge size, require a token, list a hostile path. Every request is recorded for assertions.

It only reads the files it was given and writes to its sockets; it never touches the network
beyond loopback and never imports qwenrun. Point clients at it with `HF_ENDPOINT=server.url`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

_CHUNK = 1 << 20
_LFS_POINTER_SIZE = 134  # what a git-lfs pointer file weighs; the hub reports it as pointerSize


@dataclass
class ServedFile:
    """One file of a repo: its bytes in memory or on disk, and what the server says about it."""

    data: bytes | None = None
    source: Path | None = None
    sha256: str = ""
    size: int = 0
    # Misbehaviour, set through HubServer's knobs.
    advertised_sha256: str | None = None
    advertised_size: int | None = None
    cut_at: int | None = None  # absolute offset at which a GET body is cut
    cuts_left: int | None = None  # None: cut every time; n: cut the next n GETs

    @property
    def listed_sha256(self) -> str:
        return self.advertised_sha256 or self.sha256

    @property
    def listed_size(self) -> int:
        return self.advertised_size if self.advertised_size is not None else self.size

    @property
    def git_oid(self) -> str:
        # A stand-in git blob id: stable and distinct per content, which is all clients use it for.
        return hashlib.sha1(self.sha256.encode()).hexdigest()

    def open(self) -> BinaryIO:
        if self.source is not None:
            return self.source.open("rb")
        import io

        return io.BytesIO(self.data or b"")


@dataclass
class ServedRepo:
    files: dict[str, ServedFile]
    commit: str
    # Raw tree entries served as they are (e.g. a path with `..`): they have no content.
    extra_entries: list[dict[str, object]] = field(default_factory=list)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # URL path, percent-decoded, without the query
    query: str
    range: str | None
    authorization: bool  # whether an Authorization header came with it (never its value)


def _sha256_of(source: Path) -> str:
    h = hashlib.sha256()
    with source.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _commit_for(files: Mapping[str, ServedFile]) -> str:
    h = hashlib.sha1()
    for path in sorted(files):
        h.update(f"{path}\0{files[path].sha256}\n".encode())
    return h.hexdigest()


_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b` / `bytes=a-` / `bytes=-n` → (start, end inclusive); None if unsatisfiable."""
    m = _RANGE_RE.match(header.strip())
    if not m:
        return None
    first, last = m.group(1), m.group(2)
    if first == "":
        if last == "":
            return None
        n = int(last)
        return (max(size - n, 0), size - 1) if n > 0 and size > 0 else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end


class HubServer:
    """The loopback hub. Use as a context manager, or call `start()` and `stop()`."""

    def __init__(self, *, token: str | None = None, redirect: bool = True) -> None:
        self.repos: dict[str, ServedRepo] = {}
        self.token = token  # when set, every request needs `Authorization: Bearer <token>`
        self.redirect = redirect  # answer `resolve` with a 302 to a content URL, like the hub
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()  # live connections, closed by stop()

    # ---------------------------------------------------------------- set-up

    def add_repo(self, repo_id: str, files: Mapping[str, bytes | str | Path]) -> str:
        """Serve `files` (repo path → bytes or a local file) as `repo_id`; returns its commit."""
        served: dict[str, ServedFile] = {}
        for path, content in files.items():
            if isinstance(content, bytes):
                served[path] = ServedFile(
                    data=content, sha256=hashlib.sha256(content).hexdigest(), size=len(content)
                )
            else:
                src = Path(content)
                served[path] = ServedFile(
                    source=src, sha256=_sha256_of(src), size=src.stat().st_size
                )
        commit = _commit_for(served)
        self.repos[repo_id] = ServedRepo(files=served, commit=commit)
        return commit

    def file(self, repo_id: str, path: str) -> ServedFile:
        return self.repos[repo_id].files[path]

    def cut_after(self, repo_id: str, path: str, n_bytes: int, *, times: int | None = 1) -> None:
        """Drop the connection once a GET body reaches byte offset `n_bytes` of the file.

        `times=1` cuts only the next GET that crosses the offset; `times=None` cuts every one,
        so no download can get past it until `heal()`.
        """
        f = self.file(repo_id, path)
        f.cut_at, f.cuts_left = n_bytes, times

    def heal(self, repo_id: str, path: str) -> None:
        f = self.file(repo_id, path)
        f.cut_at, f.cuts_left = None, None

    def advertise_sha256(self, repo_id: str, path: str, sha256: str) -> None:
        """List (tree, model info, ETag) a sha256 that the served bytes do not have."""
        self.file(repo_id, path).advertised_sha256 = sha256

    def advertise_size(self, repo_id: str, path: str, size: int) -> None:
        """List a size (tree, model info, X-Linked-Size) other than the real one."""
        self.file(repo_id, path).advertised_size = size

    def add_tree_entry(self, repo_id: str, path: str, size: int = 1) -> None:
        """List a file that is not served, under any path at all (`../escape.gguf`)."""
        sha = hashlib.sha256(path.encode()).hexdigest()
        self.repos[repo_id].extra_entries.append(
            {
                "type": "file",
                "path": path,
                "size": size,
                "oid": hashlib.sha1(path.encode()).hexdigest(),
                "lfs": {"oid": sha, "size": size, "pointerSize": _LFS_POINTER_SIZE},
            }
        )

    def requests_for(self, path_suffix: str, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path.endswith(path_suffix) and (method is None or r.method == method)
            ]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # ---------------------------------------------------------------- life cycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def content_url(self) -> str:
        """Where `resolve` redirects: the same server under another name, so another origin,
        as the hub's storage is (clients drop the Authorization header there)."""
        assert self._httpd is not None, "start() the server first"
        return f"http://localhost:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        # A short poll interval: stop() waits for it, and tests stop a server each.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop kept-alive connections too: the hub is gone, as if offline."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._open.add(conn)
            else:
                self._open.discard(conn)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def take_cut(self, f: ServedFile) -> int | None:
        """The offset to cut this GET at, consuming one cut when they are counted."""
        with self._lock:
            if f.cut_at is None:
                return None
            if f.cuts_left is None:
                return f.cut_at
            if f.cuts_left <= 0:
                return None
            f.cuts_left -= 1
            return f.cut_at


# ------------------------------------------------------------------------------ handler

_API_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?/?$")
_TREE_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CONTENT_RE = re.compile(r"^/_content/(?P<repo>[^/]+/[^/]+)/(?P<rev>[0-9a-f]{40})/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        self.hub.track(self.connection, alive=True)

    def finish(self) -> None:
        self.hub.track(self.connection, alive=False)
        with contextlib.suppress(OSError):  # the client may already have gone
            super().finish()

    # ------------------------------------------------------------ dispatch

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def _dispatch(self, *, body: bool) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        self.hub.record(
            RecordedRequest(
                method=self.command,
                path=path,
                query=split.query,
                range=self.headers.get("Range"),
                authorization=self.headers.get("Authorization") is not None,
            )
        )
        if not self._authorized(path):
            return
        if m := _TREE_RE.match(path):
            self._tree(m["repo"], m["rev"], m["path"] or "", parse_qs(split.query), body)
        elif m := _API_RE.match(path):
            self._model_info(m["repo"], m["rev"] or "main", parse_qs(split.query), body)
        elif m := _RESOLVE_RE.match(path):
            self._resolve(m["repo"], m["rev"], m["path"], body)
        elif m := _CONTENT_RE.match(path):
            self._content(m["repo"], m["rev"], m["path"], body)
        else:
            self._error(404, "not found", body=body)

    def _authorized(self, path: str) -> bool:
        token = self.hub.token
        if token is None or path.startswith("/_content/"):
            # Content URLs stand for the hub's signed storage URLs: no token needed (or sent).
            return True
        given = self.headers.get("Authorization")
        if given is None:
            self._error(401, "Access to this model is restricted: authenticate.", code="GatedRepo")
            return False
        if given != f"Bearer {token}":
            self._error(403, "Invalid credentials in Authorization header")
            return False
        return True

    # ------------------------------------------------------------ helpers

    def _repo(self, repo_id: str, rev: str, body: bool) -> ServedRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", code="RepoNotFound", body=body)
            return None
        if rev not in ("main", repo.commit):
            self._error(404, "Invalid rev id", code="RevisionNotFound", body=body)
            return None
        return repo

    def _error(self, status: int, message: str, code: str | None = None, body: bool = True) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Error-Message", message)
        if code:
            self.send_header("X-Error-Code", code)
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _json(self, obj: object, body: bool, extra: Mapping[str, str] | None = None) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(payload)

    # ------------------------------------------------------------ API

    def _model_info(self, repo_id: str, rev: str, query: dict[str, list[str]], body: bool) -> None:
        repo = self._repo(repo_id, rev, body)
        if repo is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings: list[dict[str, object]] = []
        for path, f in sorted(repo.files.items()):
            sib: dict[str, object] = {"rfilename": path}
            if blobs:
                sib.update(
                    size=f.listed_size,
                    blobId=f.git_oid,
                    lfs={
                        "size": f.listed_size,
                        "sha256": f.listed_sha256,
                        "pointerSize": _LFS_POINTER_SIZE,
                    },
                )
            siblings.append(sib)
        for entry in repo.extra_entries:
            sib = {"rfilename": entry["path"]}
            if blobs:
                lfs = entry["lfs"]
                assert isinstance(lfs, dict)
                sib.update(
                    size=entry["size"],
                    blobId=entry["oid"],
                    lfs={"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": 134},
                )
            siblings.append(sib)
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": repo.commit,
            "private": self.hub.token is not None,
            "gated": False,
            "disabled": False,
            "tags": ["gguf"],
            "siblings": siblings,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
        }
        self._json(info, body)

    def _tree(
        self, repo_id: str, rev: str, under: str, query: dict[str, list[str]], body: bool
    ) -> None:
        repo = self._repo(repo_id, rev, body)
        if repo is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        entries: list[dict[str, object]] = []
        folders: set[str] = set()
        for path, f in sorted(repo.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    folders.add(prefix + "/".join(parts[:i]))
            if len(parts) > 1 and not recursive:
                continue
            entries.append(
                {
                    "type": "file",
                    "oid": f.git_oid,
                    "size": f.listed_size,
                    "path": path,
                    "lfs": {
                        "oid": f.listed_sha256,
                        "size": f.listed_size,
                        "pointerSize": _LFS_POINTER_SIZE,
                    },
                }
            )
        entries += [dict(e) for e in repo.extra_entries if str(e["path"]).startswith(prefix)]
        dirs = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        self._json(dirs + entries, body)

    # ------------------------------------------------------------ files

    def _resolve(self, repo_id: str, rev: str, path: str, body: bool) -> None:
        repo = self._repo(repo_id, rev, body)
        if repo is None:
            return
        f = repo.files.get(path)
        if f is None:
            self._error(404, "Entry not found", code="EntryNotFound", body=body)
            return
        if not self.hub.redirect:
            self._send_file(repo, f, body)
            return
        # The hub answers an LFS file with a redirect to its storage; the metadata rides on it.
        self.send_response(302)
        self.send_header(
            "Location", f"{self.hub.content_url}/_content/{repo_id}/{repo.commit}/{path}"
        )
        self.send_header("ETag", f'"{f.git_oid}"')
        self.send_header("X-Linked-Etag", f'"{f.listed_sha256}"')
        self.send_header("X-Linked-Size", str(f.listed_size))
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _content(self, repo_id: str, rev: str, path: str, body: bool) -> None:
        repo = self._repo(repo_id, rev, body)
        f = repo.files.get(path) if repo is not None else None
        if repo is None:
            return
        if f is None:
            self._error(404, "Entry not found", body=body)
            return
        self._send_file(repo, f, body)

    def _send_file(self, repo: ServedRepo, f: ServedFile, body: bool) -> None:
        size = f.size
        start, end = 0, size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            parsed = parse_range(range_header, size)
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = parsed
            status = 206
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{f.listed_sha256}"')
        self.send_header("X-Repo-Commit", repo.commit)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body or length == 0:
            return
        cut = self.hub.take_cut(f) if f.cut_at is not None else None
        stop = end + 1 if cut is None or cut > end or cut < start else cut
        self._copy(f, start, stop)
        if stop <= end:
            # Cut: end the connection mid-body; the client sees fewer bytes than promised.
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def _copy(self, f: ServedFile, start: int, stop: int) -> None:
        with f.open() as src:
            if f.source is not None and hasattr(os, "sendfile"):
                # Zero-copy from the page cache keeps the server out of benchmarks' way.
                self.wfile.flush()
                out = self.connection.fileno()
                offset = start
                while offset < stop:
                    sent = os.sendfile(out, src.fileno(), offset, min(stop - offset, 1 << 30))
                    if sent == 0:
                        break
                    offset += sent
                return
            src.seek(start)
            for chunk in _read_span(src, stop - start):
                self.wfile.write(chunk)


def _read_span(src: BinaryIO, n: int) -> Iterator[bytes]:
    while n > 0:
        chunk = src.read(min(_CHUNK, n))
        if not chunk:
            return
        n -= len(chunk)
        yield chunk


def copy_into(server_file: ServedFile, dest: Path) -> None:
    """Write a served file's real bytes to `dest` (handy for comparing downloads)."""
    with server_file.open() as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out)


def main(argv: list[str] | None = None) -> None:
    """Serve local files as one repo until stdin closes (benchmarks run the hub apart).

    python -m qwenrun.testing.hub_server owner/repo path/in/repo=local/file ...
    Prints the endpoint URL on its first line of stdout.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("repo")
    parser.add_argument("files", nargs="+", help="REPO_PATH=LOCAL_FILE")
    args = parser.parse_args(argv)
    files = dict(spec.split("=", 1) for spec in args.files)
    with HubServer() as server:
        server.add_repo(args.repo, {k: Path(v) for k, v in files.items()})
        print(server.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
