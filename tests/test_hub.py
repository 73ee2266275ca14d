"""Hugging Face hub ids as models (`owner/name[@revision]`), never over the network.

Resolution runs in a child process, because huggingface_hub reads HF_HUB_OFFLINE / HF_ENDPOINT / HF_HOME
when it is imported: the child gets exactly the environment a user would set. Two hubs stand in for the
real one: (a) a hub cache laid out by the test (`models--owner--name/{refs,snapshots,blobs}`) under a temp
HF_HOME, read with HF_HUB_OFFLINE=1; (b) a loopback HTTP mirror (127.0.0.1 only) serving the endpoints
`snapshot_download` uses in huggingface_hub 2.x: `GET /api/models/<id>/revision/<rev>` (the commit),
`GET /api/models/<id>/tree/<commit>` (the file list) and `HEAD`/`GET /<id>/resolve/<commit>/<file>`
(X-Repo-Commit, ETag, Content-Length), with HF_HUB_OFFLINE=0 and a fresh HF_HOME.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from rac.models import assets, hub
from rac.models.streaming import model_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
CHILD_TIMEOUT_S = 180
MAX_REQUESTS = 60

# Resolves every argv key in a fresh interpreter; one JSON line per key on stdout.
CHILD = """
import json, sys
from rac.models.assets import resolve_model_ref
from rac.runs.session import fingerprint, resolve_model_dir
for key in sys.argv[1:]:
    try:
        ref = resolve_model_ref(key)
        fp = fingerprint(resolve_model_dir(key), {})
        row = {"path": str(ref.path), "repo": ref.repo_id, "commit": ref.commit, "label": ref.label,
               "fingerprint": fp}
    except (OSError, ValueError) as exc:
        row = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(row))
"""


@pytest.fixture(scope="module")
def tiny_files() -> dict[str, bytes]:
    folder = assets.tiny_model("llama")
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    return files


def _resolve(tmp_path: Path, keys: list[str], offline: bool, endpoint: str) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1" if offline else "0", HF_ENDPOINT=endpoint,
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10", RAC_CACHE=str(tmp_path / "rac-cache"))
    proc = subprocess.run([sys.executable, "-c", CHILD, *keys], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(keys), proc.stdout + proc.stderr[-3000:]
    return rows


def _one_line_error(row: dict[str, Any], *needles: str) -> str:
    assert "error" in row, row
    message = row["message"]
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _prepare_cache(hf_home: Path, repo: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...]) -> Path:
    """The standard hub cache layout: blobs by content hash, a snapshot folder of relative symlinks, refs."""
    storage = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def test_hub_id_syntax_and_snapshot_paths(tmp_path: Path) -> None:
    match = hub.HUB_ID.fullmatch
    assert match("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    assert match("owner/tiny@main")["rev"] == "main"  # type: ignore[index]
    assert match(f"owner/tiny@{COMMIT}")["rev"] == COMMIT  # type: ignore[index]
    for not_hub in ("./tiny", "../a/b", "/abs/path", "~/x/y", "a/b/c", "tiny", "owner/", "owner/x@"):
        assert not match(not_hub), not_hub
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        assets.resolve_model(str(tmp_path / "missing" / "model"))  # a path, not a hub id: no hub call
    assert "\n" not in str(err.value)
    snap = tmp_path / "models--owner--tiny" / "snapshots" / COMMIT
    assert hub.hub_snapshot_of(snap) == ("owner/tiny", COMMIT)
    assert hub.hub_snapshot_of(tmp_path / "models--owner--tiny" / "snapshots" / "main") is None
    assert hub.hub_snapshot_of(tmp_path / "owner" / "snapshots" / COMMIT) is None
    assert assets.resolve_model_ref("tiny-llama").repo_id is None


def test_allow_patterns_never_take_pickles_or_code() -> None:
    from huggingface_hub.utils import filter_repo_objects

    names = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "chat_template.jinja", "additional_chat_templates/tool.jinja",
             "pytorch_model.bin", "training_args.bin", "optimizer.pt", "modeling_x.py", "configuration_x.py",
             "original/consolidated.safetensors", "README.md", "flax_model.msgpack", "rng_state.pth"]
    kept = set(filter_repo_objects(names, allow_patterns=hub.HUB_ALLOW_PATTERNS,
                                   ignore_patterns=hub.HUB_IGNORE_PATTERNS))
    assert kept == {"config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                    "model.safetensors.index.json", "tokenizer.json", "chat_template.jinja",
                    "additional_chat_templates/tool.jinja"}


def test_offline_hub_cache(tmp_path: Path, tiny_files: dict[str, bytes]) -> None:
    """(a) HF_HUB_OFFLINE=1 and a hub cache laid out here: ids, @commit, @branch resolve to the snapshot;
    an unknown id, an unknown branch and a repo without safetensors fail in one line naming the fix."""
    hf_home = tmp_path / "hf"
    snap = _prepare_cache(hf_home, "owner/tiny", COMMIT, tiny_files, refs=("main",))
    # a pickle-only repo (its config and a *.bin): rac refuses it rather than unpickling
    _prepare_cache(hf_home, "owner/binonly", OTHER_COMMIT,
                   {"config.json": tiny_files["config.json"], "pytorch_model.bin": b"not loaded"}, refs=("main",))
    rows = _resolve(tmp_path, ["owner/tiny", f"owner/tiny@{COMMIT}", "owner/tiny@main", "owner/nope",
                               "owner/tiny@v2", "owner/binonly"],
                    offline=True, endpoint="http://127.0.0.1:9")  # discard port: nothing must be asked
    for row in rows[:3]:
        assert "error" not in row, row
        assert Path(row["path"]).resolve() == snap.resolve()
        assert (row["repo"], row["commit"], row["label"]) == ("owner/tiny", COMMIT, f"owner/tiny@{COMMIT}")
        fp = row["fingerprint"]
        assert fp["model"] == f"owner/tiny@{COMMIT}"
        assert (fp["model_repo"], fp["model_commit"]) == ("owner/tiny", COMMIT)
        assert fp["model_revision"] == model_revision(assets.tiny_model("llama"))  # the content, not the path
    _one_line_error(rows[3], "'owner/nope'", "HF_HUB_OFFLINE=0", "hf download owner/nope")
    _one_line_error(rows[4], "'owner/tiny@v2'", "HF_HUB_OFFLINE=0", "hf download owner/tiny --revision v2")
    _one_line_error(rows[5], "'owner/binonly'", "no *.safetensors weights")


def test_local_folder_fingerprint_has_no_hub_fields(tiny_files: dict[str, bytes]) -> None:
    from rac.runs.session import fingerprint

    fp = fingerprint(assets.tiny_model("llama"), {})
    assert not {"model", "model_repo", "model_commit"} & set(fp)


class _Mirror:
    """A loopback hub serving a few model repos at one commit each, recording every request."""

    def __init__(self, repos: dict[str, tuple[str, dict[str, bytes]]]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                mirror.serve(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                mirror.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> _Mirror:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _send(self, h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str],
              body: bool) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self.lock:
            self.requests.append((h.command, path))
            too_many = len(self.requests) > MAX_REQUESTS
        if too_many:
            return self._send(h, 500, b"too many requests", {}, body)
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo = "/".join(parts[2:4] if api else parts[0:2])
        if repo not in self.repos:
            return self._send(h, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
        commit, files = self.repos[repo]
        rest = parts[4:] if api else parts[2:]
        if len(rest) < 2 or rest[1] not in ("main", commit):
            return self._send(h, 404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
        if api and rest[0] == "revision" and len(rest) == 2:
            info = {"id": repo, "sha": commit, "siblings": [{"rfilename": n} for n in files]}
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if api and rest[0] == "tree" and len(rest) == 2:
            tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for n, d in files.items()]
            return self._send(h, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        name = "/".join(rest[2:])
        if not api and rest[0] == "resolve" and name in files:
            data = files[name]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            return self._send(h, 200, data, headers, body)
        return self._send(h, 404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, body)


def test_download_from_loopback_mirror(tmp_path: Path, tiny_files: dict[str, bytes]) -> None:
    """(b) HF_HUB_OFFLINE=0, HF_ENDPOINT at a loopback mirror, a fresh HF_HOME: the model downloads, the
    pickles / code / readme the mirror also offers are never asked for, the fingerprint records the commit;
    then HF_HUB_OFFLINE=1 resolves the same snapshot without a single request."""
    extra = {"pytorch_model.bin": b"pickle", "modeling_evil.py": b"raise SystemExit('ran remote code')",
             "README.md": b"# tiny", "original/consolidated.safetensors": b"not the weights"}
    repos = {"owner/tiny": (COMMIT, {**tiny_files, **extra}),
             "owner/binonly": (OTHER_COMMIT, {"config.json": tiny_files["config.json"],
                                              "pytorch_model.bin": b"pickle"})}
    with _Mirror(repos) as mirror:
        rows = _resolve(tmp_path, ["owner/tiny", "owner/nope", "owner/tiny@v2", "owner/binonly"],
                        offline=False, endpoint=mirror.endpoint)
        online_requests = list(mirror.requests)
        offline = _resolve(tmp_path, ["owner/tiny", f"owner/tiny@{COMMIT}"], offline=True,
                           endpoint=mirror.endpoint)
        assert mirror.requests == online_requests  # offline: the mirror was not asked anything
    row = rows[0]
    assert "error" not in row, row
    snap = tmp_path / "hf" / "hub" / "models--owner--tiny" / "snapshots" / COMMIT
    assert Path(row["path"]).resolve() == snap.resolve()
    assert sorted(p.name for p in snap.iterdir()) == sorted(tiny_files)  # no .bin, .py, README, sub-folder
    assert row["fingerprint"]["model"] == f"owner/tiny@{COMMIT}"
    assert row["fingerprint"]["model_revision"] == model_revision(assets.tiny_model("llama"))
    fetched = [p for m, p in online_requests if "/resolve/" in p]
    assert not [p for p in fetched if p.endswith((".bin", ".py", ".md")) or "original/" in p], fetched
    assert {p.rsplit("/", 1)[1] for p in fetched} == set(tiny_files)  # HEAD + GET of exactly these
    assert len(online_requests) <= MAX_REQUESTS, online_requests
    _one_line_error(rows[1], "'owner/nope'", "no such repository", mirror.endpoint)
    _one_line_error(rows[2], "'owner/tiny@v2'", "no revision 'v2'")
    _one_line_error(rows[3], "'owner/binonly'", "no *.safetensors weights")
    for r in offline:
        assert "error" not in r, r
        assert Path(r["path"]).resolve() == snap.resolve() and r["commit"] == COMMIT


def test_cli_leaves_hub_offline_to_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    from rac_prefect.flows import cli

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    monkeypatch.setattr(os, "environ", env)
    cli._prefect_env()
    assert "HF_HUB_OFFLINE" not in env
