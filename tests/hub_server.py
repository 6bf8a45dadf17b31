"""A small Hugging Face Hub stand-in for loopback tests (stdlib only, file-backed).

Serves model and dataset repos from a temporary directory over HTTP on 127.0.0.1, implementing the
part of the Hub API that ``huggingface_hub`` (2.x), ``transformers`` and ``datasets`` use:

* reading — repo info (``/api/{models,datasets}/{id}[/revision/{rev}]``), ``tree`` (recursive),
  ``paths-info``, ``refs``, ``commits``, and ``/{[datasets/]id}/resolve/{rev}/{path}`` with the
  ``ETag`` / ``X-Repo-Commit`` headers and byte ranges (what ``hf_hub_download``,
  ``snapshot_download``, ``HfFileSystem`` and ``datasets.load_dataset`` need);
* writing — ``create_repo``, ``preupload`` and NDJSON ``commit`` (so ``upload_folder``,
  ``upload_file``, ``push_to_hub`` of models work). Every file travels inline ("regular" upload
  mode): there is no LFS or Xet storage, which keeps clients with ``hf_xet`` installed working.

Each commit is a full snapshot directory ``ROOT/{models,datasets}/{ns}/{name}/commits/{sha}/`` and
``refs.json`` maps branch names to commit ids, so old revisions stay resolvable. No auth (any token
is accepted), no pull requests, no pagination.

Use::

    with HubServer(tmp_path / "hub") as hub:
        hub.commit_files("dataset", "uoft-cs/cifar100", {"README.md": b"...", "data/train.parquet": path})
        env = hub.client_env(tmp_path / "hf_home")   # HF_ENDPOINT etc. for a subprocess

or, to try the Hub flow (push_to_hub, from_pretrained, hf-ddlr show) offline from a shell::

    python tests/hub_server.py --root /tmp/hub        # serves until Ctrl-C; prints the variables to export
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

PLURAL = {"model": "models", "dataset": "datasets", "space": "spaces"}
SINGULAR = {v: k for k, v in PLURAL.items()}
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*")


class HubError(Exception):
    """An HTTP error answered to the client with the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_oid(data: bytes) -> str:
    """The git blob id the Hub reports as a regular file's ``oid`` / ``ETag``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_date(epoch: float) -> str:
    """The Hub's timestamp format, which huggingface_hub parses strictly."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class RepoStore:
    """File-backed repos: ``root/{plural}/{ns}/{name}/{refs.json, commits.json, commits/<sha>/...}``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock = threading.RLock()

    def repo_dir(self, rtype: str, repo_id: str) -> Path:
        if rtype not in PLURAL or not REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id:
            raise HubError(400, f"Invalid repo type/id {rtype!r} {repo_id!r}")
        return self.root / PLURAL[rtype] / repo_id

    def exists(self, rtype: str, repo_id: str) -> bool:
        return (self.repo_dir(rtype, repo_id) / "refs.json").exists()

    def require(self, rtype: str, repo_id: str) -> Path:
        if not self.exists(rtype, repo_id):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repo_dir(rtype, repo_id)

    def create(self, rtype: str, repo_id: str, private: bool = False) -> bool:
        """Create an empty repo with one initial commit holding ``.gitattributes``; False if it exists (its
        visibility then stays as created, as on the Hub)."""
        with self.lock:
            if self.exists(rtype, repo_id):
                return False
            d = self.repo_dir(rtype, repo_id)
            (d / "commits").mkdir(parents=True)
            (d / "settings.json").write_text(json.dumps({"private": bool(private)}))
            (d / "refs.json").write_text(json.dumps({}))
            (d / "commits.json").write_text(json.dumps([]))
            self.commit(
                rtype,
                repo_id,
                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                message="initial commit",
            )
            return True

    def refs(self, repo: Path) -> dict[str, str]:
        return json.loads((repo / "refs.json").read_text())

    def log(self, repo: Path) -> list[dict]:
        return json.loads((repo / "commits.json").read_text())

    def resolve(self, repo: Path, rev: str) -> str:
        refs = self.refs(repo)
        if rev in refs:
            return refs[rev]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            for c in self.log(repo):
                if c["id"].startswith(rev):
                    return c["id"]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def commit(
        self,
        rtype: str,
        repo_id: str,
        files: dict[str, bytes | str | os.PathLike],
        *,
        deletions: tuple[str, ...] = (),
        message: str = "update",
        branch: str = "main",
        parent_commit: str | None = None,
    ) -> str:
        """Write a new snapshot on ``branch``: parent files + ``files`` - ``deletions``. Returns the commit id.

        ``deletions`` entries ending in ``/`` delete a folder. ``files`` values are bytes, text or a path.
        """
        with self.lock:
            if not self.exists(rtype, repo_id):
                self.create(rtype, repo_id)
            repo = self.repo_dir(rtype, repo_id)
            refs = self.refs(repo)
            parent = refs.get(branch)
            if parent_commit and parent and not parent.startswith(parent_commit):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            staging = repo / "commits" / f".staging-{threading.get_ident()}"
            shutil.rmtree(staging, ignore_errors=True)
            if parent:
                shutil.copytree(repo / "commits" / parent, staging)
            else:
                staging.mkdir()
            for path in deletions:
                target = staging / path.rstrip("/")
                if path.endswith("/") and target.is_dir():
                    shutil.rmtree(target)
                elif target.is_file():
                    target.unlink()
                else:
                    shutil.rmtree(staging)
                    raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
            for path, content in files.items():
                if path.startswith("/") or ".." in Path(path).parts:
                    shutil.rmtree(staging)
                    raise HubError(400, f"Invalid path {path!r}")
                data = content.encode() if isinstance(content, str) else content
                data = Path(data).read_bytes() if isinstance(data, os.PathLike) else data
                (staging / path).parent.mkdir(parents=True, exist_ok=True)
                (staging / path).write_bytes(data)
            digest = hashlib.sha1(f"{parent}\n{message}\n{time.time_ns()}".encode())
            for f in sorted(p for p in staging.rglob("*") if p.is_file()):
                digest.update(
                    f.relative_to(staging).as_posix().encode() + b"\0" + git_blob_oid(f.read_bytes()).encode()
                )
            sha = digest.hexdigest()
            staging.rename(repo / "commits" / sha)
            log = self.log(repo)
            log.insert(0, {"id": sha, "title": message, "parent": parent, "date": time.time()})
            (repo / "commits.json").write_text(json.dumps(log))
            refs[branch] = sha
            (repo / "refs.json").write_text(json.dumps(refs))
            return sha

    def snapshot(self, repo: Path, commit: str) -> Path:
        return repo / "commits" / commit

    def entries(self, repo: Path, commit: str, path: str = "", recursive: bool = False) -> list[dict]:
        base = self.snapshot(repo, commit)
        start = base / path.strip("/") if path.strip("/") else base
        if not start.is_dir():
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        items = sorted(start.rglob("*") if recursive else start.iterdir())
        return [self.entry(base, p) for p in items]

    def entry(self, base: Path, p: Path) -> dict:
        rel = p.relative_to(base).as_posix()
        if p.is_dir():
            return {
                "type": "directory",
                "oid": hashlib.sha1(rel.encode()).hexdigest(),
                "size": 0,
                "path": rel,
            }
        data = p.read_bytes()
        return {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": rel}

    @staticmethod
    def private(repo: Path) -> bool:
        settings = repo / "settings.json"
        return bool(json.loads(settings.read_text())["private"]) if settings.is_file() else False

    def info(self, rtype: str, repo_id: str, repo: Path, commit: str) -> dict:
        date = hub_date(next(c["date"] for c in self.log(repo) if c["id"] == commit))
        base = self.snapshot(repo, commit)
        files = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "sha": commit,
            "author": repo_id.split("/")[0],
            "private": self.private(repo),
            "gated": False,
            "disabled": False,
            "lastModified": date,
            "createdAt": date,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": f} for f in files],
        }
        if rtype == "model":
            info["modelId"] = repo_id
        readme = base / "README.md"
        if readme.is_file():
            m = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.read_text("utf-8", "replace"), re.S)
            if m:
                try:
                    import yaml

                    info["cardData"] = yaml.safe_load(m.group(1)) or {}
                except Exception:  # card data is optional metadata
                    pass
        return info


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: RepoStore  # set per server class in HubServer
    requests_seen: list  # (method, path) of every request, for debugging tests

    def log_message(self, fmt, *args):
        if os.environ.get("HUB_SERVER_LOG"):
            super().log_message(fmt, *args)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(
        self, status: int, body: bytes = b"", ctype: str = "application/json", headers=None, head=False
    ):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers=None, head: bool = False):
        self._send(status, json.dumps(obj).encode(), headers=headers, head=head)

    @property
    def endpoint(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        segs = [unquote(s) for s in url.path.split("/")[1:] if s != ""]
        self.requests_seen.append((method, self.path))
        try:
            self._route(method, segs, parse_qs(url.query))
        except HubError as e:
            hdrs = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
            self._json({"error": e.message}, e.status, hdrs, head=method == "HEAD")
        except Exception as e:  # surfaced to the client as a 500 with the reason
            self._json({"error": f"{type(e).__name__}: {e}"}, 500, head=method == "HEAD")

    def do_GET(self):  # noqa: N802 - http.server naming
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    def _route(self, method: str, segs: list[str], query: dict):
        st = self.store
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["whoami-v2"]:
                return self._json(
                    {
                        "type": "user",
                        "name": "hubtest",
                        "fullname": "hubtest",
                        "orgs": [],
                        "auth": {
                            "type": "access_token",
                            "accessToken": {"displayName": "test", "role": "write"},
                        },
                    }
                )
            if rest == ["validate-yaml"] and method == "POST":
                self._body()
                return self._json({"errors": [], "warnings": []})
            if rest == ["repos", "create"] and method == "POST":
                body = json.loads(self._body() or b"{}")
                rtype = body.get("type") or "model"
                name = body["name"]
                repo_id = f"{body['organization']}/{name}" if body.get("organization") else name
                repo_id = repo_id if "/" in repo_id else f"hubtest/{repo_id}"
                url = f"{self.endpoint}/{'' if rtype == 'model' else PLURAL[rtype] + '/'}{repo_id}"
                private = bool(body.get("private")) or body.get("visibility") in ("private", "protected")
                if not st.create(rtype, repo_id, private=private):
                    return self._json({"error": "You already created this repo", "url": url}, 409)
                return self._json({"url": url, "name": repo_id})
            if rest == ["repos", "delete"] and method == "DELETE":
                body = json.loads(self._body() or b"{}")
                repo_id = (
                    f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
                )
                shutil.rmtree(st.require(body.get("type") or "model", repo_id))
                return self._json({})
            if len(rest) >= 3 and rest[0] in SINGULAR:
                rtype, repo_id = SINGULAR[rest[0]], f"{rest[1]}/{rest[2]}"
                return self._api_repo(method, rtype, repo_id, st.require(rtype, repo_id), rest[3:], query)
            raise HubError(404, f"Unknown API route /{'/'.join(segs)}")
        rtype = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            rtype, segs = SINGULAR[segs[0]], segs[1:]
        if len(segs) >= 5 and segs[2] == "resolve":
            repo = st.require(rtype, f"{segs[0]}/{segs[1]}")
            return self._resolve(method, repo, st.resolve(repo, segs[3]), "/".join(segs[4:]))
        raise HubError(404, f"Not found: /{'/'.join(segs)}")

    def _api_repo(self, method: str, rtype: str, repo_id: str, repo: Path, tail: list[str], query: dict):
        st = self.store
        head = method == "HEAD"
        if not tail:
            return self._json(st.info(rtype, repo_id, repo, st.resolve(repo, "main")), head=head)
        op, rev = tail[0], "/".join(tail[1:2])
        if op == "revision" and rev:
            return self._json(st.info(rtype, repo_id, repo, st.resolve(repo, "/".join(tail[1:]))), head=head)
        if op == "tree" and rev:
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(
                st.entries(repo, st.resolve(repo, rev), "/".join(tail[2:]), recursive), head=head
            )
        if op == "paths-info" and rev and method == "POST":
            commit = st.resolve(repo, rev)
            raw = self._body()
            if self.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(raw).get("paths", [])
            else:
                paths = parse_qs(raw.decode()).get("paths", [])
            base = st.snapshot(repo, commit)
            found = [base / p.strip("/") for p in paths]
            return self._json([st.entry(base, p) for p in found if p.exists() and p != base])
        if op == "refs":
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in st.refs(repo).items()
            ]
            return self._json({"branches": branches, "tags": [], "converts": []})
        if op == "commits" and rev:
            commit, out = st.resolve(repo, "/".join(tail[1:])), []
            by_id = {c["id"]: c for c in st.log(repo)}
            while commit:
                c = by_id[commit]
                out.append(
                    {
                        "id": c["id"],
                        "title": c["title"],
                        "message": c["title"],
                        "date": hub_date(c["date"]),
                        "authors": [{"user": "hubtest"}],
                    }
                )
                commit = c["parent"]
            return self._json(out)
        if op == "branch" and method == "POST":
            body = json.loads(self._body() or b"{}")
            start = st.resolve(repo, body.get("startingPoint") or "main")
            with st.lock:
                refs = st.refs(repo)
                refs["/".join(tail[1:])] = start
                (repo / "refs.json").write_text(json.dumps(refs))
            return self._json({})
        if op == "preupload" and method == "POST":
            files = json.loads(self._body() or b"{}").get("files", [])
            try:
                commit = st.resolve(repo, rev or "main")
            except HubError:
                commit = None
            out = []
            for f in files:
                p = st.snapshot(repo, commit) / f["path"] if commit else None
                oid = git_blob_oid(p.read_bytes()) if p is not None and p.is_file() else None
                out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
            return self._json({"files": out, "commitOid": commit})
        if op == "commit" and method == "POST":
            if query.get("create_pr", ["0"])[0] not in ("0", "false", "False"):
                raise HubError(400, "this test hub does not implement pull requests")
            header, files, deletions = {}, {}, []
            for line in self._body().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, val = item["key"], item["value"]
                if key == "header":
                    header = val
                elif key == "file":
                    enc = val.get("encoding")
                    files[val["path"]] = (
                        base64.b64decode(val["content"]) if enc == "base64" else val["content"].encode()
                    )
                elif key == "deletedFile":
                    deletions.append(val["path"])
                elif key == "deletedFolder":
                    deletions.append(val["path"].rstrip("/") + "/")
                else:
                    raise HubError(
                        400, f"this test hub serves every file as 'regular'; unsupported operation {key!r}"
                    )
            sha = st.commit(
                rtype,
                repo_id,
                files,
                deletions=tuple(deletions),
                message=header.get("summary", "update"),
                branch="/".join(tail[1:]) or "main",
                parent_commit=header.get("parentCommit"),
            )
            prefix = "" if rtype == "model" else f"{PLURAL[rtype]}/"
            return self._json(
                {
                    "success": True,
                    "commitOid": sha,
                    "pullRequestUrl": None,
                    "commitUrl": f"{self.endpoint}/{prefix}{repo_id}/commit/{sha}",
                }
            )
        if op in ("xet-write-token", "xet-read-token"):
            raise HubError(501, "this test hub has no Xet storage; uploads use the 'regular' mode")
        raise HubError(404, f"Unknown repo API route {op!r}")

    def _resolve(self, method: str, repo: Path, commit: str, path: str):
        f = self.store.snapshot(repo, commit) / path
        if not f.is_file() or ".." in Path(path).parts:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = f.read_bytes()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes"}
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start, end = (
                    int(m.group(1)),
                    min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1),
                )
            else:
                start, end = max(0, len(data) - int(m.group(2))), len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(
                206, data[start : end + 1], "application/octet-stream", headers, head=method == "HEAD"
            )
        return self._send(200, data, "application/octet-stream", headers, head=method == "HEAD")


class HubServer:
    """A threaded Hub stand-in on ``127.0.0.1:<free port>`` serving repos stored under ``root``."""

    def __init__(self, root: str | os.PathLike, port: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = RepoStore(self.root)
        self.requests: list[tuple[str, str]] = []
        handler = type("Handler", (_Handler,), {"store": self.store, "requests_seen": self.requests})
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def commit_files(
        self,
        repo_type: str,
        repo_id: str,
        files: dict[str, bytes | str | os.PathLike],
        message: str = "add files",
    ) -> str:
        """Create the repo if needed and commit ``files`` (path in repo -> bytes / text / local path)."""
        return self.store.commit(repo_type, repo_id, files, message=message)

    def client_env(self, hf_home: str | os.PathLike, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a client process: this endpoint, online mode, caches under ``hf_home``."""
        env = dict(os.environ if base is None else base)
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
            env.pop(key, None)
        hf_home = Path(hf_home)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(hf_home),
            HF_HUB_CACHE=str(hf_home / "hub"),
            HF_DATASETS_CACHE=str(hf_home / "datasets"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_TOKEN="hf_test_token",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        return env


def main(argv: list[str] | None = None) -> int:
    """Serve ``--root`` on 127.0.0.1 until Ctrl-C (or SIGTERM), after printing the client settings."""
    import signal

    parser = argparse.ArgumentParser(
        description="A Hugging Face Hub stand-in on 127.0.0.1 for trying the Hub flow offline (tests/hub_server.py)."
    )
    parser.add_argument("--root", default="hub_root", help="folder holding the repos (created; kept afterwards)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, also when started in the background (which
        signal.signal(sig, signal.default_int_handler)  # ignores SIGINT), and kill stop it cleanly
    with HubServer(args.root, port=args.port) as hub:
        print(f"Hub stand-in serving {hub.root.resolve()} at {hub.endpoint} (Ctrl-C stops it). In another shell:")
        print(f"  export HF_ENDPOINT={hub.endpoint} HF_TOKEN=hf_test_token  # any token is accepted")
        print("  export HF_HOME=$(mktemp -d)  # caches apart from the real Hub's")
        print("  unset HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
