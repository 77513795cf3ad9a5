"""`pyllm-kv serve`: the bundled llama-server with our cache formats.

A real server on a free port of 127.0.0.1 and a real HTTP client (the standard
library's http.client: no test dependencies). Every server is stopped with
SIGTERM (then SIGKILL) when its test ends, pass or fail, and every wait has a
deadline. Bad requests fail in pyllm-kv before llama-server is started, with
exactly the message pyllm_kv.load gives.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from pyllm_kv import serve

HOST = "127.0.0.1"
START_TIMEOUT = 120  # s: model load on a busy 2-core machine
REQUEST_TIMEOUT = 120
MAX_TOKENS = 16
MESSAGES = [{"role": "user", "content": "Name three rivers in Europe."}]


# ---------------------------------------------------------------- no server needed


def test_default_host_is_loopback():
    args = serve.add_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.host == "127.0.0.1"
    assert (args.port, args.parallel) == (serve.DEFAULT_PORT, serve.DEFAULT_PARALLEL)


def _cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyllm_kv.cli", "serve", *argv], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("argv, load_kw", [
    (["--cache-k", "kv5"], dict(cache_k="kv5")),
    (["--cache-v", "kv4", "--no-flash-attn"], dict(cache_v="kv4", flash_attn=False)),
    (["--cache-k", "squat4", "--squat-rank", "900"], None),  # SquatOptions refuses it, as in load(squat=...)
    (["/no/such/model.gguf"], dict(model="/no/such/model.gguf")),
], ids=["unknown-format", "quantized-v-without-fa", "squat-rank", "missing-model"])
def test_bad_request_is_refused_like_load(lib_dir, model_path, argv, load_kw):
    """Same error message as pyllm_kv.load, exit code 2, and nothing else printed:
    llama-server was never started (it logs from its first line)."""
    import pyllm_kv

    if load_kw is None:
        with pytest.raises(pyllm_kv.PyllmKvError) as exc:
            pyllm_kv.SquatOptions(rank=900)
    else:
        with pytest.raises(pyllm_kv.PyllmKvError) as exc:
            pyllm_kv.load(**load_kw)
    r = _cli(*argv)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"pyllm-kv: error: {exc.value}\n"
    assert r.stdout == ""


def test_head_dim_refused_like_load(lib_dir, tmp_path):
    """A model whose head size is not a multiple of 64 with kv4 (UnsupportedHeadDim)."""
    import pyllm_kv
    from pyllm_kv import shape_model

    path = tmp_path / "hd32.gguf"
    shape_model.write_shape_model(path, shape_model.resolve_spec("tiny", n_head=8, head_dim=32))
    with pytest.raises(pyllm_kv.UnsupportedHeadDim) as exc:
        pyllm_kv.load(path, cache_k="kv4")
    r = _cli(str(path), "--cache-k", "kv4")
    assert r.returncode == 2 and r.stderr == f"pyllm-kv: error: {exc.value}\n"


# ---------------------------------------------------------------- a running server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the test process dies, even by SIGKILL
    (a killed pytest must not leave a server behind). Linux; kept across exec."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """`pyllm-kv serve ...` as a child process, its log in a temp file."""

    def __init__(self, *argv: str):
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pyllm-kv-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "pyllm_kv.cli", "serve", *argv, "--port", str(self.port), "--threads", "1"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                status, _ = self.request("GET", "/health", timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready after {START_TIMEOUT} s:\n{self.tail()}")

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()
        os.unlink(self.log.name)
        return self.proc.returncode

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = REQUEST_TIMEOUT) -> Tuple[int, Any]:
        conn = self._conn(timeout)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
        finally:
            conn.close()

    def stream(self, path: str, body: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        """Server-sent events of a streaming request, as parsed JSON chunks (until [DONE])."""
        conn = self._conn(REQUEST_TIMEOUT)
        try:
            conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            assert resp.getheader("Content-Type", "").startswith("text/event-stream")
            done = False
            for line in resp:
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    done = True
                    break
                yield json.loads(payload)
            assert done, "stream ended without [DONE]"
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server(lib_dir, model_path, require_format):
    from pyllm_kv import LibraryNotFound, _libs

    require_format("kv4")
    try:
        _libs.tool(serve.SERVER_TOOL)
    except LibraryNotFound as exc:
        pytest.skip(str(exc))
    srv = Server("--cache-k", "kv4", "--cache-v", "kv4", "--parallel", "2", "--ctx", "512")
    try:
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop()
    assert rc == 0, f"llama-server did not shut down cleanly on SIGTERM (exit code {rc})"


def _chat(srv: Server, messages: List[Dict[str, str]] = MESSAGES) -> Dict[str, Any]:
    status, out = srv.request("POST", "/v1/chat/completions",
                              # clients must send some model name; one model is served, any name reaches it
                              {"model": "any-name", "messages": messages, "max_tokens": MAX_TOKENS,
                               "temperature": 0})
    assert status == 200, out
    return out


def test_health_and_models(server, model_path):
    status, out = server.request("GET", "/health")
    assert status == 200 and out["status"] == "ok"
    status, out = server.request("GET", "/v1/models")
    assert status == 200 and out["object"] == "list"
    from pyllm_kv.model_info import read_model_info

    assert [m["id"] for m in out["data"]] == [read_model_info(model_path).name]


def test_chat_completion(server):
    out = _chat(server)
    choice = out["choices"][0]
    assert out["object"] == "chat.completion"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert 0 < out["usage"]["completion_tokens"] <= MAX_TOKENS
    assert choice["finish_reason"] in ("length", "stop")


def test_chat_equals_pyllm_kv_load(server):
    """Greedy: the server answers what pyllm_kv.load(...).chat(...) answers for the same
    messages, formats (kv4/kv4) and chat template (the GGUF's)."""
    import pyllm_kv

    with pyllm_kv.load(cache_k="kv4", cache_v="kv4", n_ctx=512, n_threads=1) as m:
        expected = m.chat(MESSAGES, max_tokens=MAX_TOKENS)
    assert _chat(server)["choices"][0]["message"]["content"] == expected


def test_streaming_chat_equals_non_streaming(server):
    """Greedy: the streamed pieces add up to the non-streamed answer."""
    whole = _chat(server)["choices"][0]["message"]["content"]
    pieces, finish = [], None
    for chunk in server.stream("/v1/chat/completions",
                               {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}):
        assert chunk["object"] == "chat.completion.chunk"
        for choice in chunk["choices"]:
            pieces.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    assert len([p for p in pieces if p]) > 1, "the answer came in one piece: not streamed"
    assert "".join(pieces) == whole
    assert finish in ("length", "stop")


def test_completion(server):
    status, out = server.request("POST", "/v1/completions",
                                 {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert status == 200, out
    assert out["object"] == "text_completion"
    assert "Paris" in out["choices"][0]["text"]


def test_two_slots_at_once(server):
    """--parallel 2: two conversations decoded together both get their answer."""
    questions = ["Name three rivers in Europe.", "What is the boiling point of water?"]
    alone = [_chat(server, [{"role": "user", "content": q}])["choices"][0]["message"]["content"] for q in questions]
    results: Dict[int, Any] = {}

    def ask(i: int) -> None:
        try:
            results[i] = _chat(server, [{"role": "user", "content": questions[i]}])
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT)
    for i in range(2):
        assert isinstance(results.get(i), dict), results.get(i)
        assert results[i]["choices"][0]["message"]["content"].strip()
    # Each slot has its own KV stream; with a plain format the answers match the
    # ones given one at a time.
    assert [results[i]["choices"][0]["message"]["content"] for i in range(2)] == alone


def test_malformed_json_is_an_error_and_serving_goes_on(server):
    """Upstream llama-server answers a body that is not JSON with an OpenAI-style error
    object, status 500 (its handler counts a JSON parse exception as a server error;
    docs/server.md), and keeps serving."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("POST", "/v1/chat/completions", body="{not json", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        status, body = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status in (400, 500)
    assert "parse" in body["error"]["message"]
    assert _chat(server)["choices"][0]["message"]["content"].strip()


def test_squat_keys_serve(lib_dir, model_path, require_format):
    """The side-state formats run under the server too (squat4 K, kv4 V, 2 slots)."""
    from pyllm_kv import LibraryNotFound, _libs

    require_format("squat4")
    try:
        _libs.tool(serve.SERVER_TOOL)
    except LibraryNotFound as exc:
        pytest.skip(str(exc))
    srv = Server("--cache-k", "squat4", "--cache-v", "kv4", "--parallel", "2", "--ctx", "512")
    try:
        srv.wait_ready()
        status, out = srv.request("POST", "/v1/completions",
                                  {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert status == 200, out
        assert "Paris" in out["choices"][0]["text"]
        assert "squat4" in srv.tail(200000)  # llama-server's log names the cache type it created
    finally:
        assert srv.stop() == 0
