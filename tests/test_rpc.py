"""Our cache types over llama.cpp's RPC backend (docs/rpc.md), on loopback only.

Two ggml-rpc-server processes (CPU) on 127.0.0.1 hold SmolLM2's blocks 11-29
and its output layer (n_gpu_layers=20, split 1:1), with those layers' KV cache;
the client's CPU keeps blocks 0-10. Greedy text and next-token logits must equal the
same run without RPC, bit for bit: both ends run the same CPU kernels with the
same thread count, and the SQuat keys a server stores come from the same
encoder as on the client (patches/0010). The type-table handshake
(patches/0011) must refuse a mismatched server and client with a message.

Every server runs in a process session of its own and is stopped in a
`finally`, also when a test fails; each client runs in a subprocess (ggml keeps
registered servers for the life of a process, and llama.cpp aborts on a
refused handshake).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import pytest

from pyllm_kv import rpc
from pyllm_kv.errors import InvalidParameter

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "rpc_client.py"
TEST_EXTRA_TYPE_ENV = "PYLLM_KV_RPC_TEST_EXTRA_TYPE"  # native/include/pkv/rpc_type_table.h
HELLO_MARK = 0x70                                     # same header
RPC_CMD_HELLO, RPC_CMD_DEVICE_COUNT = 14, 15          # ggml-rpc.cpp (HELLO is fixed at 14 upstream)
CONN_CAPS_SIZE = 24                                   # transport.h: rpc_msg_hello_req
CLIENT_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, endpoint: str, log: Path):
        self.endpoint, self.log = endpoint, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


# CPU-only processes, also on a CUDA build: the comparisons below are CPU against CPU
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


@contextlib.contextmanager
def rpc_server(tmp_path: Path, name: str, env: Optional[Dict[str, str]] = None,
               device: str = "CPU") -> Iterator[Server]:
    """A ggml-rpc-server on 127.0.0.1 (its CPU with 1 thread, or the device named),
    stopped on exit whatever happens."""
    from pyllm_kv import _libs

    exe = _libs.tool("ggml-rpc-server")
    log = tmp_path / f"{name}.log"
    for _ in range(3):  # the free port may be taken between probe and bind
        port = _free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port), "-t", "1", "-d", device],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **(NO_GPU if device == "CPU" else {}), **(env or {})})
        try:
            if _wait_listening(proc, port, timeout=60):
                yield Server(f"127.0.0.1:{port}", log)
                return
        finally:
            _stop(proc)
    raise AssertionError(f"ggml-rpc-server did not start:\n{log.read_text(errors='replace')}")


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True  # (the server sees a client that says nothing and goes back to accept)
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _client(job: Dict[str, Any], env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    import pyllm_kv

    pkg_root = str(Path(pyllm_kv.__file__).resolve().parent.parent)  # the same pyllm_kv as this process
    child_env = {**os.environ, **(NO_GPU if env is None else env)}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, child_env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(CLIENT), json.dumps(job)], capture_output=True, text=True,
                          timeout=CLIENT_TIMEOUT_S, env=child_env)
    assert proc.returncode == 0, f"client failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _logits(blob: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(blob), dtype="<f4")


# ---- pure Python: arguments ----------------------------------------------------------

def test_parse_servers() -> None:
    assert rpc.parse_servers(None) == []
    assert rpc.parse_servers("10.0.0.2:50052, host-b:1") == ["10.0.0.2:50052", "host-b:1"]
    assert rpc.parse_servers(["[::1]:50052"]) == ["[::1]:50052"]
    for bad in ("", "host", "host:0", "host:70000", "a:1,a:1", "a:1,,b:2", ["a:1", 5]):
        with pytest.raises(InvalidParameter):
            rpc.parse_servers(bad)


def test_load_arguments_checked(lib_dir: Path) -> None:
    import pyllm_kv

    for bad in ([], [0, 0], [1, -1], [float("nan")], "1,1", [1] * 17):
        with pytest.raises(InvalidParameter):
            pyllm_kv.load(tensor_split=bad)
    with pytest.raises(InvalidParameter, match="n_gpu_layers=0"):
        pyllm_kv.load(rpc_servers="127.0.0.1:1")


# ---- the handshake: mismatched ends refuse each other ------------------------------------

def test_type_table_mismatch_refused_both_ways(lib_dir: Path, model_path: Path, tmp_path: Path) -> None:
    # a server whose build has one more ggml type than the client (test hook)
    with rpc_server(tmp_path, "odd", env={TEST_EXTRA_TYPE_ENV: "faketype"}) as srv:
        got = _client({"mode": "refused", "model": str(model_path), "servers": srv.endpoint})
        log = srv.log_text()
    assert got["error"] == "RpcServerRefused", got
    assert f"refusing the RPC server at {srv.endpoint}: its ggml type table differs" in got["message"]
    assert "faketype/1/1 there" in got["message"], got["message"]
    assert "faketype" in log and "refusing a client whose ggml type table differs" in log, log
    # the other way round: the client's table has the extra type
    with rpc_server(tmp_path, "plain") as srv:
        got = _client({"mode": "refused", "model": str(model_path), "servers": srv.endpoint,
                       "env": {TEST_EXTRA_TYPE_ENV: "faketype"}})
        log = srv.log_text()
    assert got["error"] == "RpcServerRefused" and "faketype/1/1 here" in got["message"], got
    assert "refusing a client whose ggml type table differs" in log, log


@contextlib.contextmanager
def upstream_hello_server() -> Iterator[str]:
    """A server that answers HELLO like an unpatched ggml-rpc-server (protocol 7.0.0,
    padding byte 0), then closes on any other command, as upstream does on an unknown one."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    lsock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError, struct.error):
                    cmd = conn.recv(1)
                    size = struct.unpack("<Q", _recv_exact(conn, 8))[0]
                    caps = _recv_exact(conn, size)
                    if cmd == bytes([RPC_CMD_HELLO]):
                        rsp = bytes([7, 0, 0, 0]) + bytes(len(caps))
                        conn.sendall(struct.pack("<Q", len(rsp)) + rsp)
                        conn.recv(1)  # the next command: upstream does not know ours and closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        lsock.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise OSError("closed")
        buf += chunk
    return buf


def test_unpatched_server_refused(lib_dir: Path, model_path: Path) -> None:
    from pyllm_kv import _libs

    with upstream_hello_server() as endpoint:
        got = _client({"mode": "refused", "model": str(model_path), "servers": endpoint})
        assert got["error"] == "RpcServerRefused", got
        assert "it is not a pyllm-kv rpc-server" in got["message"] and "ggml RPC 7.0.0" in got["message"], got
        # llama.cpp's own tools abort with the same message (no model is loaded before --rpc connects)
        proc = subprocess.run([str(_libs.tool("llama-completion")), "-m", str(model_path), "--rpc", endpoint,
                               "-ngl", "99", "-n", "1", "-p", "x", "-no-cnv"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    assert proc.returncode != 0
    assert f"refusing the RPC server at {endpoint}" in proc.stderr, proc.stderr[-3000:]


def test_unpatched_client_refused(lib_dir: Path, tmp_path: Path) -> None:
    """A client that skips the type table (what an unpatched llama.cpp sends: HELLO, then
    its first command) is refused by our server, which closes the connection."""
    with rpc_server(tmp_path, "srv") as srv:
        host, port = srv.endpoint.split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", CONN_CAPS_SIZE) + bytes(CONN_CAPS_SIZE))
            size = struct.unpack("<Q", _recv_exact(conn, 8))[0]
            rsp = _recv_exact(conn, size)
            assert rsp[:3] == bytes([7, 0, 0]) and rsp[3] == HELLO_MARK
            conn.sendall(bytes([RPC_CMD_DEVICE_COUNT]) + struct.pack("<Q", 0))
            try:  # closed (reset, when our command was still unread): no device count for this client
                assert conn.recv(1) == b""
            except ConnectionResetError:
                pass
        deadline = time.monotonic() + 10
        while "refusing a client that did not send its ggml type table" not in srv.log_text():
            assert time.monotonic() < deadline, srv.log_text()
            time.sleep(0.1)


# ---- layers on two servers: same tokens and logits as without RPC ------------------------

RUNS: List[Dict[str, Any]] = [
    {"k": "f16", "v": "f16"},
    {"k": "kv4", "v": "kv4"},
    {"k": "squat4", "v": "squat4"},
    {"k": "deco4", "v": "deco4"},
    {"k": "kv4", "v": "kv4", "env": {"PYLLM_KV_CENTER": "k"}},
]


def _name(run: Dict[str, Any]) -> str:
    return run["k"] + "".join(f"+{k}={v}" for k, v in run.get("env", {}).items())


def _kld(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(P || Q) of the next-token distributions of two logit vectors (float64)."""
    lp = p_logits.astype(np.float64) - np.logaddexp.reduce(p_logits.astype(np.float64))
    lq = q_logits.astype(np.float64) - np.logaddexp.reduce(q_logits.astype(np.float64))
    return float(np.sum(np.exp(lp) * (lp - lq)))


def _assert_same(local: Dict[str, Any], remote: Dict[str, Any], machine_noise: bool = False) -> None:
    """Bit for bit: the same kernels ran on both ends. With machine_noise (a CUDA
    build on the GPU machine) the ends may run different upstream kernels for the
    same op: its CPU backend repacks local weights for AMX/AVX-512 but not those on
    a server, and a CUDA server does not see the client's fusions. There f16 itself
    differs (H100 machine: max |logit diff| 0.50), so f16 sets the noise floor:
    every format's next-token KLD local vs remote stays within a few times f16's,
    with the same top-1 token."""
    pairs = [(_name(lo["run"]), lo, re) for lo, re in zip(local["results"], remote["results"])]
    diffs = {name: (_logits(lo["logits"]), _logits(re["logits"])) for name, lo, re in pairs}
    for name, (ll, lr) in diffs.items():
        assert np.isfinite(ll).all() and np.isfinite(lr).all(), name
    f16_equal = "f16" in diffs and np.array_equal(*diffs["f16"])
    if not machine_noise or f16_equal:
        for name, lo, re in pairs:
            assert re["text"] == lo["text"], (name, lo["text"], re["text"])
            ll, lr = diffs[name]
            assert np.array_equal(lr, ll), (name, float(np.max(np.abs(lr - ll))))
        return
    floor = _kld(*diffs["f16"])
    for name, (ll, lr) in diffs.items():
        kld = _kld(ll, lr)
        assert kld <= max(4 * floor, 1e-3), (name, kld, floor)
        assert int(np.argmax(ll)) == int(np.argmax(lr)), (name, int(np.argmax(ll)), int(np.argmax(lr)))


def _assert_side_state_acts(results: Dict[str, Any]) -> None:
    """squat4, deco4 and centering change the logits against kv4: so equal to local
    means the servers ran them (a server storing plain kv4 rows would not be equal)."""
    by_name = {_name(r["run"]): _logits(r["logits"]) for r in results["results"]}
    for name in by_name:
        if name != "kv4" and name != "f16":
            assert not np.array_equal(by_name[name], by_name["kv4"]), name


def test_layers_on_two_servers_equal_local(lib_dir: Path, model_path: Path, tmp_path: Path) -> None:
    job = {"mode": "run", "model": str(model_path), "runs": RUNS}
    local = _client({**job, "load": {}})
    with rpc_server(tmp_path, "a") as a, rpc_server(tmp_path, "b") as b:
        remote = _client({**job, "load": {"rpc_servers": f"{a.endpoint},{b.endpoint}", "n_gpu_layers": 20,
                                          "tensor_split": [1, 1]}})
    cuda_build = (lib_dir / "libggml-cuda.so").is_file()
    for lo, re in zip(local["results"], remote["results"]):
        # the KV cache of the offloaded layers is on the servers, the rest on the client
        buffers = [buf for buf, _ in re["kv_buffers"]]
        assert any(a.endpoint in buf for buf in buffers) and any(b.endpoint in buf for buf in buffers), buffers
        assert "CPU" in buffers and [buf for buf, _ in lo["kv_buffers"]] == ["CPU"], (buffers, lo["kv_buffers"])
    _assert_same(local, remote, machine_noise=cuda_build)
    _assert_side_state_acts(local)


def _gpu_visible() -> bool:
    import shutil

    smi = shutil.which("nvidia-smi")
    try:
        return bool(smi) and subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_layers_on_a_cuda_server_equal_local_gpu(lib_dir: Path, model_path: Path, tmp_path: Path) -> None:
    """A CUDA build: the same 20 layers on the local GPU, or on a ggml-rpc-server that
    exposes that GPU to a CPU-only client. Not the same bits (f16's greedy text
    parts after 4 tokens on the H100: the ends run different upstream kernels), so
    f16 sets the noise floor for ours. SQuat keys are then encoded by the server's
    CUDA encoder (set_rows with src[3])."""
    if not (lib_dir / "libggml-cuda.so").is_file() or not _gpu_visible():
        pytest.skip("needs a CUDA build and a visible NVIDIA GPU (bench/device/gpu_run.sh on the device machine)")
    # prompts under 32 tokens: a CUDA build offloads bigger batches of the client's
    # CPU layers to a local GPU (op_offload), which the RPC client does not have
    job = {"mode": "run", "model": str(model_path), "runs": RUNS[:4], "prompt_logits": "The Seine flows"}
    local = _client({**job, "load": {"n_gpu_layers": 20}}, env={})
    assert all(r["n_prompt"] < 32 for r in local["results"])
    with rpc_server(tmp_path, "gpu", device="CUDA0") as srv:
        remote = _client({**job, "load": {"rpc_servers": srv.endpoint, "n_gpu_layers": 20}})
    for re in remote["results"]:
        assert any(srv.endpoint in buf for buf, _ in re["kv_buffers"]), re["kv_buffers"]
    _assert_same(local, remote, machine_noise=True)
    _assert_side_state_acts(local)


def test_noise_floor_comparison_fails_on_a_broken_format() -> None:
    """The machine-noise mode of _assert_same (CUDA builds) still catches a format
    whose remote logits are off by more than f16's own local/remote noise."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=512).astype("<f4") * 3

    def res(name, logits):
        return {"run": {"k": name, "v": name}, "text": "x", "logits": base64.b64encode(logits.tobytes()).decode()}

    noise = rng.normal(size=512).astype("<f4") * 1e-3
    local = {"results": [res("f16", base), res("kv4", base + 0.5)]}
    close = {"results": [res("f16", base + noise), res("kv4", base + 0.5 + noise)]}
    _assert_same(local, close, machine_noise=True)
    broken = {"results": [res("f16", base + noise), res("kv4", rng.normal(size=512).astype("<f4") * 3)]}
    with pytest.raises(AssertionError):
        _assert_same(local, broken, machine_noise=True)
    with pytest.raises(AssertionError):   # CPU builds: bit for bit
        _assert_same(local, close)
