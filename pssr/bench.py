"""The bench pipeline behind `pssr bench-kernels`: fused ops vs eager and compiled reference.

Every op is timed next to a copy of the same number of bytes on the same device, dtype, threads
and process (DESIGN.md §9), because the ops are memory-bound: the fraction of copy bandwidth
says how close a kernel is to the hardware, whatever the machine. Results are plain records;
the CLI only prints them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import sys
from dataclasses import dataclass, field

import torch
from torch.utils import benchmark
from tqdm import tqdm

import pssr
import pssr.ops as ops
from pssr.checkpoint import atomic_write
from pssr.errors import first_line
from pssr.ops import reference
from pssr.ops._contract import score_dtype
from pssr.ops._extension import has_kernel

DEFAULT_SHAPES = ((256, 1, 28, 28), (1024, 3, 32, 32), (64, 3, 224, 224))
MODES = ("mean", "topk")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
OPS = {"surgery": "pixel_surgery", "score": "saliency_score"}
DEVICES = ("cpu", "cuda", "all")
# The fixed keyword arguments every implementation of pixel_surgery is called with.
SURGERY_KWARGS = dict(alpha=1.0, ratio=0.2, fill=0.0, reduce="max")


class BenchError(Exception):
    """A failure the user must see as one line (bad option, missing device, wrong kernel)."""


@dataclass
class Config:
    """What to measure; the defaults are the issue's benchmark."""

    shapes: tuple = DEFAULT_SHAPES
    modes: tuple = MODES
    dtype: str = "float32"
    device: str = "all"
    ops: tuple = tuple(OPS)
    min_run_time: float = 0.5
    seed: int = 0
    compiled: bool = True
    threads: int | None = None


@dataclass
class Record:
    """One timed (op, device, shape, dtype, mode, impl); ratios are filled in per group."""

    op: str
    device: str
    shape: list
    dtype: str
    mode: str | None
    impl: str
    median_ms: float
    gbps: float
    bytes_moved: int
    native: bool | None = None  # fused only: False when pssr.ops fell back to the reference
    speedup_vs_eager: float | None = None
    speedup_vs_compiled: float | None = None
    fraction_of_copy_bandwidth: float | None = None


@dataclass
class Result:
    machine: dict
    config: dict
    records: list = field(default_factory=list)

    def to_json(self) -> dict:
        records = [dataclasses.asdict(r) for r in self.records]
        return {"machine": self.machine, "config": self.config, "records": records}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """'256x1x28x28' -> (256, 1, 28, 28); ValueError with a one-line reason otherwise."""
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)x(\d+)\s*", text, flags=re.IGNORECASE | re.ASCII)
    if m is None:
        raise ValueError(f"{text!r} is not BxCxHxW (four integers joined by 'x', e.g. 256x1x28x28)")
    shape = tuple(int(v) for v in m.groups())
    if min(shape) < 1:
        raise ValueError(f"{text!r}: every dimension must be >= 1")
    return shape


def parse_ops(text: str) -> tuple[str, ...]:
    """'surgery,score' -> ('surgery', 'score'); the full op names are accepted too."""
    by_name = {**{k: k for k in OPS}, **{v: k for k, v in OPS.items()}}
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in by_name]
    if not names or unknown:
        raise ValueError(f"expected a comma-separated subset of {','.join(OPS)}, got {text!r}")
    return tuple(dict.fromkeys(by_name[n] for n in names))


def resolve_devices(choice: str) -> list[str]:
    """'all' means every device this process can use; asking for a missing GPU is an error."""
    if choice not in DEVICES:
        raise BenchError(f"unknown device {choice!r}; choose one of {', '.join(DEVICES)}")
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise BenchError(f"--device cuda: no CUDA device is available (torch {torch.__version__} is {build})")
    if choice == "all":
        return ["cpu"] + (["cuda"] if has_cuda else [])
    return [choice]


def cpu_model() -> str:
    """The CPU's marketing name, because thread counts alone do not identify a machine."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(devices: list[str]) -> dict:
    """The facts needed to compare two benchmark runs."""
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "pssr": pssr.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "extension_loaded": ops.EXTENSION_LOADED,
        "extension_cpu_kernels": has_kernel("pixel_surgery", torch.device("cpu")),
        "extension_cuda_kernels": has_kernel("pixel_surgery", torch.device("cuda")),
        "devices": devices,
    }


def bytes_moved(op: str, shape: tuple, dtype: torch.dtype) -> int:
    """The bytes an op must read + write at least, the numerator of its GB/s."""
    B, C, H, W = shape
    n, pixels = B * C * H * W, B * H * W
    if op == "pixel_surgery":  # read x and grad, write x_surgered and the bool mask
        return 3 * n * dtype.itemsize + pixels
    return n * dtype.itemsize + pixels * score_dtype(dtype).itemsize  # read grad, write the score


def make_inputs(shape: tuple, dtype: torch.dtype, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x in [0, 1) and a normal gradient, drawn on the CPU so every device sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen, dtype=dtype)
    grad = torch.randn(shape, generator=gen, dtype=dtype)
    return x.to(device), grad.to(device)


def implementations(op: str, mode: str | None) -> dict:
    """fused and eager callables of (x, grad), with the same fixed keyword arguments."""
    if op == "pixel_surgery":
        return {
            "fused": lambda x, g: ops.pixel_surgery(x, g, mode=mode, **SURGERY_KWARGS),
            "eager": lambda x, g: reference.pixel_surgery(x, g, mode=mode, **SURGERY_KWARGS),
        }
    return {
        "fused": lambda x, g: ops.saliency_score(g, "max"),
        "eager": lambda x, g: reference.saliency_score(g, "max"),
    }


def median_seconds(stmt: str, env: dict, min_run_time: float) -> float:
    """Median of blocked_autorange, with this process's threads (Timer defaults to one)."""
    timer = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def call(fn, x: torch.Tensor, grad: torch.Tensor, what: str):
    """One checked call, so that an unsupported dtype or device is one line, not a traceback."""
    try:
        return fn(x, grad)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BenchError(f"{what} failed ({first_line(exc)})") from exc


def check_same(op: str, got, want, what: str) -> None:
    """Refuse to time an implementation whose mask (or score) differs from the reference's."""
    if op == "pixel_surgery":
        pairs = [("mask", got[1], want[1]), ("x_surgered", got[0], want[0])]
    else:
        pairs = [("score", got, want)]
    for name, a, b in pairs:
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            bad = int((a != b).sum()) if a.shape == b.shape else "all"
            raise BenchError(
                f"{what}: {name} is not bit-identical to the reference ({bad} of {b.numel()} values differ)"
            )


def compile_reference(eager, x: torch.Tensor, grad: torch.Tensor, what: str):
    """torch.compile of the reference, compiled now so that the timing excludes compilation."""
    torch.compiler.reset()  # a fresh cache per case: no recompile limit, no dynamic-shape drift
    compiled = torch.compile(eager, dynamic=False)
    try:
        compiled(x, grad)
    except Exception as exc:  # Inductor failures come in many types
        raise BenchError(f"{what}: torch.compile failed ({first_line(exc)}); rerun with --no-compiled") from exc
    return compiled


def time_copy(shape: tuple, dtype: torch.dtype, device: str, min_run_time: float) -> Record:
    """The copy baseline: src as large as x and grad together, GB/s over bytes read + written."""
    src = torch.rand(2 * shape[0], *shape[1:], dtype=dtype, device=device)
    dst = torch.empty_like(src)
    t = median_seconds("dst.copy_(src)", {"dst": dst, "src": src}, min_run_time)
    nbytes = 2 * src.numel() * src.element_size()
    name = str(dtype).removeprefix("torch.")
    return Record("copy", device, list(shape), name, None, "copy", t * 1e3, nbytes / t / 1e9, nbytes)


def bench_case(op, mode, x, grad, impls, config, bar) -> list[Record]:
    """Checks then times every implementation of one op on one input; returns fused first."""
    device, shape = x.device.type, tuple(x.shape)
    what = f"{op}{'/' + mode if mode else ''} {device} {'x'.join(map(str, shape))} {config.dtype}"
    fns = implementations(op, mode)
    want = call(fns["eager"], x, grad, f"eager {what}")
    nbytes = bytes_moved(op, shape, x.dtype)
    records = {}
    for impl in impls:
        if impl == "compiled":
            bar.set_description_str(f"compiling {what}")
            fns["compiled"] = compile_reference(fns["eager"], x, grad, what)
        bar.set_description_str(f"timing {impl} {what}")
        check_same(op, call(fns[impl], x, grad, f"{impl} {what}"), want, f"{impl} {what}")
        t = median_seconds("fn(x, grad)", {"fn": fns[impl], "x": x, "grad": grad}, config.min_run_time)
        records[impl] = Record(op, device, list(shape), config.dtype, mode, impl, t * 1e3, nbytes / t / 1e9, nbytes)
        bar.update()
    fused = records["fused"]
    fused.native = has_kernel(op, x.device)
    fused.speedup_vs_eager = records["eager"].median_ms / fused.median_ms
    if "compiled" in records:
        fused.speedup_vs_compiled = records["compiled"].median_ms / fused.median_ms
    return list(records.values())


def check_json_path(path: str) -> None:
    """Fail before a long run, not after it, when the JSON cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BenchError(f"--json {path}: is a directory")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise BenchError(f"--json {path}: directory {directory} does not exist or is not writable")


def write_json(path: str, result: Result) -> None:
    """Atomic write (temp file in the same directory, then rename): no half-written JSON."""

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(result.to_json(), fh, indent=2, allow_nan=False)
            fh.write("\n")

    atomic_write(path, write)


def validate(config: Config) -> Config:
    """The same checks as the CLI's, for callers of the pipeline; returns it normalised."""
    try:
        shapes = tuple(parse_shape(s if isinstance(s, str) else "x".join(map(str, s))) for s in config.shapes)
        op_keys = parse_ops(",".join(config.ops))
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    if config.dtype not in DTYPES:
        raise BenchError(f"unknown dtype {config.dtype!r}; choose one of {', '.join(DTYPES)}")
    if not config.modes or set(config.modes) - set(MODES):
        raise BenchError(f"modes must be a non-empty subset of {MODES}, got {config.modes!r}")
    if not config.min_run_time > 0:
        raise BenchError(f"min_run_time must be > 0, got {config.min_run_time!r}")
    return dataclasses.replace(config, shapes=shapes, ops=op_keys, modes=tuple(dict.fromkeys(config.modes)))


def bench_shape(device: str, shape: tuple, cases: list, impls: list, config: Config, bar) -> list[Record]:
    """The copy baseline of one (device, shape, dtype), then every op case measured against it."""
    dtype = DTYPES[config.dtype]
    bar.set_description_str(f"timing copy {device} {'x'.join(map(str, shape))}")
    copy = time_copy(shape, dtype, device, config.min_run_time)
    bar.update()
    x, grad = make_inputs(shape, dtype, device, config.seed)
    records = [copy]
    for op, mode in cases:
        for rec in bench_case(op, mode, x, grad, impls, config, bar):
            rec.fraction_of_copy_bandwidth = rec.gbps / copy.gbps
            records.append(rec)
    return records


def run(config: Config, *, json_path: str | None = None, quiet: bool = False) -> Result:
    """The whole benchmark, per device and shape; writes the JSON last, when asked to."""
    config = validate(config)
    if json_path:
        check_json_path(json_path)
    devices = resolve_devices(config.device)
    cases = [(OPS[o], m) for o in config.ops for m in (config.modes if o == "surgery" else (None,))]
    impls = ["fused", "eager"] + (["compiled"] if config.compiled else [])
    total = len(devices) * len(config.shapes) * (1 + len(cases) * len(impls))
    show = not quiet and sys.stderr.isatty()
    previous_threads = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        result = Result(machine_info(devices), dataclasses.asdict(config))
        with tqdm(total=total, disable=not show, file=sys.stderr, unit="task", dynamic_ncols=True) as bar:
            for device in devices:
                for shape in config.shapes:
                    try:
                        result.records += bench_shape(device, shape, cases, impls, config, bar)
                    except torch.OutOfMemoryError as exc:
                        raise BenchError(f"out of memory on {device} at {shape}; choose a smaller --shape") from exc
    finally:
        torch.set_num_threads(previous_threads)  # callers in the same process keep their setting
    if json_path:
        try:
            write_json(json_path, result)
        except OSError as exc:
            raise BenchError(f"--json {json_path}: cannot write it ({exc.strerror or exc})") from exc
    return result


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_report(result: Result) -> str:
    """The header of machine facts, the table, and what the columns mean."""
    m, c = result.machine, result.config
    ext = "not loaded" if not m["extension_loaded"] else (
        f"loaded (CPU kernels: {'yes' if m['extension_cpu_kernels'] else 'no'}, "
        f"CUDA kernels: {'yes' if m['extension_cuda_kernels'] else 'no'})"
    )
    lines = [
        f"pssr {m['pssr']} bench-kernels · torch {m['torch']} · Python {m['python']}",
        f"CPU: {m['cpu']} · {m['threads']} threads · GPU: {m['cuda_device'] or 'none'}",
        f"pssr extension: {ext}",
        f"median of blocked_autorange(min_run_time={c['min_run_time']} s), seed {c['seed']}",
        "",
    ]
    head = ("op", "device", "shape", "dtype", "mode", "impl", "median ms", "GB/s", "vs eager", "vs compiled", "of copy")
    rows = [head]
    for r in result.records:
        impl = r.impl + ("*" if r.native is False else "")
        rows.append((
            r.op, r.device, "x".join(map(str, r.shape)), r.dtype, r.mode or "-", impl,
            f"{r.median_ms:.4g}", f"{r.gbps:.3g}", _fmt(r.speedup_vs_eager, ".2f", "x"),
            _fmt(r.speedup_vs_compiled, ".2f", "x"), _fmt(r.fraction_of_copy_bandwidth, ".1%"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        cells = [v.ljust(w) if i < 6 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines += [
        "",
        "GB/s: bytes the op must read + write / median time (copy: dst.copy_(src), src as large as x + grad).",
        "vs eager / vs compiled: that impl's median / the fused median (> 1: fused is faster).",
        "of copy: the row's GB/s / the copy GB/s of the same device, shape and dtype.",
    ]
    if any(r.native is False for r in result.records):
        lines.append("fused*: no native kernel for this device; pssr.ops ran the reference instead.")
    return "\n".join(lines)
