"""A small Hugging Face Hub: the HTTP API parts ``hf_hub_download`` and ``upload_file`` use.

- ``HEAD``/``GET /[datasets/]<org>/<repo>/resolve/<rev>/<path>``: ``X-Repo-Commit``, ``ETag``,
  ``Content-Length``, the bytes; 404 with ``X-Error-Code: EntryNotFound``. Repos whose name
  contains ``private`` need ``Authorization: Bearer <token>`` (401 otherwise). While ``hold``
  is an unset event, a GET sends the first half of the bytes and waits for it.
- ``POST /api/<type>s/<org>/<repo>/preupload/<rev>``: every file is ``lfs``.
- ``POST /[datasets/]<org>/<repo>.git/info/lfs/objects/batch``: a ``basic`` upload action to
  ``PUT /lfs-upload/<oid>`` (the body is streamed to memory here, keyed by sha256).
- ``POST /api/<type>s/<org>/<repo>/commit/<rev>``: ndjson ``header`` / ``lfsFile`` / ``file``.

Uploads use the LFS protocol, so tests set ``huggingface_hub.constants.HF_HUB_DISABLE_XET``
(the Xet protocol needs Hugging Face's CAS service, which this server does not speak).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.receiver import QuietServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer(QuietServer):
    daemon_threads = True

    def __init__(self, token: str = "hf_good") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        #: (repo_type, repo_id, path) -> bytes
        self.repos: dict[tuple[str, str, str], bytes] = {}
        self.lfs: dict[str, bytes] = {}
        #: When set to an Event: file GETs stop half-way until it is set (at most 30 s).
        self.hold: threading.Event | None = None
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _split_repo(segs: list[str]) -> tuple[str, list[str]]:
    if segs and segs[0] in ("datasets", "spaces"):
        return segs[0][:-1], segs[1:]
    return "model", segs


class _Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _authorized(self, repo_id: str) -> bool:
        if "private" not in repo_id:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.server.token}"

    def _path(self) -> list[str]:
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
        raw = urllib.parse.urlsplit(self.path).path
        return [urllib.parse.unquote(s) for s in raw.strip("/").split("/")]

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        repo_type, segs = _split_repo(self._path())
        if "resolve" not in segs:
            self._send(404, b"", {"X-Error-Code": "RepoNotFound"})
            return
        idx = segs.index("resolve")
        repo_id = "/".join(segs[:idx])
        path = "/".join(segs[idx + 2 :])
        if not self._authorized(repo_id):
            self._send(401, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "auth"})
            return
        data = self.server.repos.get((repo_type, repo_id, path))
        if data is None:
            self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            return
        etag = hashlib.sha256(data).hexdigest()
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{etag}"',
            "Content-Type": "application/octet-stream",
        }
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(206, data[start:], headers)
            return
        if self.command == "GET" and self.server.hold is not None:
            self._send_held(data, headers, self.server.hold)
            return
        self._send(200, data, headers)

    def _send_held(self, data: bytes, headers: dict[str, str], hold: threading.Event) -> None:
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        half = len(data) // 2
        self.wfile.write(data[:half])
        self.wfile.flush()
        hold.wait(30)
        self.wfile.write(data[half:])

    def do_POST(self) -> None:
        segs = self._path()
        body = self._body()
        if segs[:1] == ["api"] and len(segs) >= 5 and segs[-2] in ("preupload", "commit"):
            repo_type = segs[1][:-1]
            repo_id = "/".join(segs[2:-2])
            if segs[-2] == "preupload":
                files = json.loads(body)["files"]
                self._json(
                    200,
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "lfs", "shouldIgnore": False}
                            for f in files
                        ],
                        "commitOid": COMMIT,
                    },
                )
                return
            for line in body.splitlines():
                item = json.loads(line)
                value = item.get("value", {})
                if item["key"] == "lfsFile":
                    data = self.server.lfs[value["oid"]]
                    self.server.repos[(repo_type, repo_id, value["path"])] = data
                elif item["key"] == "file":
                    data = base64.b64decode(value["content"])
                    self.server.repos[(repo_type, repo_id, value["path"])] = data
            self._json(
                200,
                {
                    "commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{COMMIT}",
                    "commitOid": COMMIT,
                    "pullRequestUrl": None,
                },
            )
            return
        if segs[-4:] == [segs[-4], "info", "lfs", "objects"] or segs[-1] == "batch":
            req = json.loads(body)
            objects = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self.server.endpoint}/lfs-upload/{o['oid']}"}
                    },
                }
                for o in req["objects"]
            ]
            self._send(
                200,
                json.dumps({"transfer": "basic", "objects": objects}).encode(),
                {"Content-Type": "application/vnd.git-lfs+json"},
            )
            return
        self._send(404, b"")

    def do_PUT(self) -> None:
        segs = self._path()
        if segs[0] != "lfs-upload":
            self._send(404, b"")
            return
        data = self._body()
        if hashlib.sha256(data).hexdigest() != segs[1]:
            self._send(400, b"bad oid")
            return
        self.server.lfs[segs[1]] = data
        self._send(200, b"")
