"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests: serves model repositories from
local folders through the endpoints huggingface_hub's `snapshot_download` and `list_repo_files`
use, so the real download code runs against it (``HF_ENDPOINT=http://127.0.0.1:P``).

    python tests/hub_server.py --repo bigscience/bloom-560m=/path/to/folder --port 0 \
        --ready-file ready.json --log requests.jsonl [--token-sha256 HEX]

Endpoints: ``GET /api/models/{repo}/revision/{rev}`` (the repository's commit and files),
``GET /api/models/{repo}/tree/{rev}`` (the file listing), ``HEAD`` and ``GET
/{repo}/resolve/{rev}/{path}`` (a file, with the commit, ETag and size headers the client reads).
A repository's commit is a hash of its files, so it changes when they do. With
``--token-sha256`` every request must carry ``Authorization: Bearer TOKEN`` whose sha256 matches
(a gated repository): others get 401. Each request is logged as one JSON line: method, path,
status, and whether it was authorised (the token itself is never logged).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    """A folder served as one repository at one commit."""

    def __init__(self, folder: Path):
        self.files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
        self.oids = {name: _git_blob_sha1(path.read_bytes()) for name, path in self.files.items()}
        self.commit = hashlib.sha1(json.dumps(self.oids, sort_keys=True).encode()).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    server: "HubServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # the JSON log below replaces the stderr lines
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = urllib.parse.urlparse(self.path).path
        authorised = self.server.authorised(self.headers.get("Authorization", ""))
        status = 401
        if authorised:
            status = self._route(path, body)
        else:
            self._send(401, b'{"error": "Access to this repository is restricted (gated)."}', body,
                       {"X-Error-Code": "GatedRepo", "Content-Type": "application/json"})
        self.server.log({"method": self.command, "path": path, "status": status, "auth": authorised})

    def _route(self, path: str, body: bool) -> int:
        for repo_id, repo in self.server.repos.items():
            api = f"/api/models/{repo_id}/"
            if path.startswith(api + "revision/"):
                info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "gated": "manual",
                        "siblings": [{"rfilename": name} for name in repo.files], "tags": []}
                return self._json(info, body)
            if path.startswith(api + "tree/"):
                tree = [{"type": "file", "path": name, "size": repo.files[name].stat().st_size, "oid": repo.oids[name]}
                        for name in repo.files]
                return self._json(tree, body)
            prefix = f"/{repo_id}/resolve/"
            if path.startswith(prefix):
                _revision, _, name = path[len(prefix):].partition("/")
                if name not in repo.files:
                    break
                data = repo.files[name].read_bytes()
                self._send(200, data, body, {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.oids[name]}"',
                                             "Content-Type": "application/octet-stream"})
                return 200
        self._send(404, b'{"error": "Repository or file not found"}', body,
                   {"X-Error-Code": "EntryNotFound", "Content-Type": "application/json"})
        return 404

    def _json(self, value, body: bool) -> int:
        self._send(200, json.dumps(value).encode(), body, {"Content-Type": "application/json"})
        return 200

    def _send(self, status: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, repos: dict[str, Repo], token_sha256: str | None, log_path: Path):
        super().__init__(("127.0.0.1", port), HubHandler)
        self.repos, self.token_sha256, self.log_path = repos, token_sha256, log_path
        self._lock = threading.Lock()

    def authorised(self, header: str) -> bool:
        if self.token_sha256 is None:
            return True
        token = header.removeprefix("Bearer ").strip()
        return bool(token) and hashlib.sha256(token.encode()).hexdigest() == self.token_sha256

    def log(self, entry: dict) -> None:
        with self._lock, open(self.log_path, "a") as handle:
            handle.write(json.dumps({**entry, "t": time.time()}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", action="append", required=True, help="REPO_ID=FOLDER, repeatable")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--token-sha256", default=None)
    args = parser.parse_args()
    repos = {}
    for item in args.repo:
        repo_id, _, folder = item.partition("=")
        repos[repo_id] = Repo(Path(folder))
    server = HubServer(args.port, repos, args.token_sha256, Path(args.log))
    Path(args.ready_file).write_text(json.dumps({"port": server.server_address[1], "pid": os.getpid()}))
    server.serve_forever()


class HubProcess:
    """``with HubProcess(workdir, {"org/name": folder}, token_sha256=...) as hub: hub.endpoint``."""

    def __init__(self, workdir: Path, repos: dict[str, Path], token_sha256: str | None = None):
        self.workdir, self.repos, self.token_sha256 = Path(workdir), repos, token_sha256
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "hub-requests.jsonl"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def __enter__(self) -> "HubProcess":
        ready = self.workdir / "hub-ready.json"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--ready-file", str(ready), "--log", str(self.log_path)]
        cmd += [a for repo_id, folder in self.repos.items() for a in ("--repo", f"{repo_id}={folder}")]
        if self.token_sha256:
            cmd += ["--token-sha256", self.token_sha256]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.workdir / "hub.err", "ab"))
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the stand-in hub did not start: {(self.workdir / 'hub.err').read_text()[-2000:]}")
            time.sleep(0.05)
        self.port = json.loads(ready.read_text())["port"]
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


if __name__ == "__main__":
    main()
