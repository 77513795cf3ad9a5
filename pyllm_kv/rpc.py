"""RPC servers: layers and their KV cache on other hosts (docs/rpc.md).

llama.cpp spreads a model over machines with ggml's RPC backend: a
``ggml-rpc-server`` on each host exposes its devices, the client registers them
(``--rpc host:port,...`` in llama.cpp's tools) and places offloaded layers on
them like on GPUs, each layer's KV cache with it. llama-cpp-python 0.3.36
accepts ``rpc_servers`` but drops it (llama_model_params lost that field), so
this module registers the servers itself through libggml and hands llama.cpp
the device list through ``llama_model_params.devices``.

Every server is checked first with ``ggml_backend_rpc_check_server``
(patches/0011): a server whose ggml type table differs from ours (an
unpatched llama.cpp, another pyllm-kv) is refused with RpcServerRefused
before llama.cpp connects, which would abort the process instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from . import _libs
from .errors import InvalidParameter, LibraryNotFound, RpcServerRefused

Servers = Union[str, Sequence[str], None]

_ENDPOINT_RE = re.compile(r"^(?P<host>[^\s,:]+|\[[0-9a-fA-F:]+\]):(?P<port>[0-9]+)$")

# Registered RPC endpoints and their ggml devices. ggml cannot unregister a
# backend: they stay in its device list for the life of the process, so every
# later load passes an explicit device list (see model_devices).
_registered: Dict[str, List[int]] = {}
_lock = threading.Lock()

# ggml_backend_dev_type
_DEV_GPU, _DEV_IGPU = 1, 2


def parse_servers(servers: Servers) -> List[str]:
    """``"h1:p1,h2:p2"`` or a list of ``"host:port"`` -> list of endpoints (validated)."""
    if servers is None:
        return []
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out: List[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidParameter(f"rpc_servers entries must be 'host:port' strings, got {item!r}")
        item = item.strip()
        m = _ENDPOINT_RE.match(item)
        if not m or not 0 < int(m.group("port")) < 65536:
            raise InvalidParameter(f"rpc_servers: {item!r} is not 'host:port' (e.g. 192.168.1.7:50052)")
        if item in out:
            raise InvalidParameter(f"rpc_servers lists {item} twice")
        out.append(item)
    if isinstance(servers, str) and not out:
        raise InvalidParameter("rpc_servers is empty; pass 'host:port,...' or None")
    return out


@functools.lru_cache(maxsize=None)
def _ggml(directory: str) -> ctypes.CDLL:
    """libggml of our build (the same copy libllama uses: same file, one handle)."""
    lib = ctypes.CDLL(f"{directory}/libggml.so")
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    for name, res, args in (
        ("ggml_backend_reg_by_name", vp, [cp]),
        ("ggml_backend_reg_get_proc_address", vp, [vp, cp]),
        ("ggml_backend_register", None, [vp]),
        ("ggml_backend_reg_dev_count", sz, [vp]),
        ("ggml_backend_reg_dev_get", vp, [vp, sz]),
        ("ggml_backend_dev_count", sz, []),
        ("ggml_backend_dev_get", vp, [sz]),
        ("ggml_backend_dev_type", ctypes.c_int, [vp]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _rpc_functions() -> "tuple[ctypes.CDLL, Any, Any]":
    _libs.llama_cpp()  # loads libllama and with it ggml's backend registry
    lib = _ggml(str(_libs.lib_dir()))
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    check_addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_check_server") if reg else None
    add_addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server") if reg else None
    if not reg or not check_addr or not add_addr:
        raise LibraryNotFound(
            f"the native libraries in {_libs.lib_dir()} have no pyllm-kv RPC backend (built without GGML_RPC, "
            "or without patches/0011). Reinstall pyllm-kv, or point PYLLM_KV_LIB_DIR at a build that has it."
        )
    check = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)(check_addr)
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add_addr)
    return lib, check, add


def check_server(endpoint: str) -> None:
    """Handshake with the server at ``endpoint`` (protocol version and ggml type
    table) and disconnect; RpcServerRefused saying why if llama.cpp could not use it."""
    _, check, _ = _rpc_functions()
    buf = ctypes.create_string_buffer(2048)
    if not check(endpoint.encode(), buf, len(buf)):
        raise RpcServerRefused(buf.value.decode("utf-8", "replace"))


def _register(endpoint: str) -> List[int]:
    with _lock:
        if endpoint in _registered:
            return _registered[endpoint]
        check_server(endpoint)
        lib, _, add = _rpc_functions()
        reg = add(endpoint.encode())
        if not reg:
            raise RpcServerRefused(f"pyllm-kv: the RPC server at {endpoint} reports no devices")
        lib.ggml_backend_register(reg)
        devs = [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
        _registered[endpoint] = devs
        return devs


def _local_accelerators(lib: ctypes.CDLL) -> List[int]:
    """What llama.cpp picks by default besides RPC servers: discrete GPUs, else integrated ones."""
    rpc = {dev for devs in _registered.values() for dev in devs}
    gpus, igpus = [], []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        if kind == _DEV_GPU and dev not in rpc:  # RPC devices present themselves as GPUs
            gpus.append(dev)
        elif kind == _DEV_IGPU:
            igpus.append(dev)
    return gpus or igpus


@contextlib.contextmanager
def model_devices(servers: Sequence[str]) -> Iterator[Optional[ctypes.Array]]:
    """While llama-cpp-python loads a model: the RPC devices of ``servers`` (in
    that order, first as llama.cpp's default puts them) followed by the local
    accelerators. A no-op while no RPC server was ever registered in this
    process; afterwards every load names its devices, so that a server
    registered for one model is not used by the next one."""
    rpc_devs = [dev for endpoint in servers for dev in _register(endpoint)]
    if not _registered:
        yield None
        return
    lib = _ggml(str(_libs.lib_dir()))
    devs = rpc_devs + _local_accelerators(lib)
    array = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
    module = _libs.llama_cpp().llama_cpp
    default_params = module.llama_model_default_params

    def with_devices() -> object:
        params = default_params()
        params.devices = ctypes.cast(array, ctypes.c_void_p)
        return params

    module.llama_model_default_params = with_devices
    try:
        yield array
    finally:
        module.llama_model_default_params = default_params
