"""Safetensors checkpoints: written atomically, read with a clear error for anything else.

Checkpoints are never pickles (a pickle runs code when loaded). A checkpoint is one
safetensors file: the tensors plus a JSON document in the metadata under the key ``pssr``
that says what the file is and how to rebuild it, so that loading needs nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, not safetensors, or not the kind expected (one line)."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and writers that recreate the file) make it private
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write ``tensors`` and the JSON-able ``info`` (must hold a ``kind``) to ``path`` atomically."""
    if "kind" not in info:
        raise ValueError("checkpoint info needs a 'kind'")
    doc = {"format_version": FORMAT_VERSION, **info}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"pssr": json.dumps(doc)}))


def _sniff(path: Path) -> None:
    """Name the usual impostors (HTML pages, pickles, zip archives) instead of a parser error."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    size = os.path.getsize(path)
    if len(head) >= 9 and struct.unpack("<Q", head[:8])[0] <= size - 8 and head[8:9] == b"{":
        return  # safetensors: u64 header length, then the JSON header
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(f"{path}: this is a pickle/zip (torch.save) file, not safetensors; refusing to load it")
    if head.lstrip()[:1] == b"<":
        raise CheckpointError(f"{path}: this is an HTML/XML page, not a checkpoint (a failed download?)")
    raise CheckpointError(f"{path}: not a safetensors file")


def load(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a pssr checkpoint; ``kind`` checks what the file is for."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
    if "pssr" not in meta:
        raise CheckpointError(f"{path}: a safetensors file without pssr metadata (not made by pssr)")
    try:
        info = json.loads(meta["pssr"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable pssr metadata ({exc})") from None
    except RecursionError:  # a crafted document nested thousands deep
        raise CheckpointError(f"{path}: unreadable pssr metadata (nested too deep)") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: pssr metadata is a JSON {type(info).__name__}, not an object")
    if kind is not None and info.get("kind") != kind:
        raise CheckpointError(f"{path}: a {shown(info.get('kind'))} checkpoint, expected {kind!r}")
    return tensors, info


# --------------------------------------------------------------------------------------------
# Metadata is data from whoever wrote the file: check each value before it sizes anything.


def shown(value, limit: int = 60) -> str:
    """A metadata value as one short line (JSON escapes newlines), for error messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def integer(value, what: str, low: int, high: int) -> int:
    """``value`` if it is a JSON integer in [low, high] (not a float, not a bool), else ValueError."""
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{what} must be an integer from {low} to {high}, not {shown(value)}")
    return value


def number(value, what: str) -> float:
    """``value`` as a float if it is a finite JSON number (not a bool), else ValueError."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, not {shown(value)}")
    return float(value)


def text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {shown(value)}")
    return value


def mapping(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, not {shown(value)}")
    return value


def check_finite(tensors: dict[str, torch.Tensor], path) -> None:
    """Refuse NaN/Inf weights: a NaN classifier answers class 0 for every image, and says ok."""
    for name in sorted(tensors):
        t = tensors[name]
        if not (t.is_floating_point() or t.is_complex()):
            continue
        try:
            finite = bool(torch.isfinite(t).all())
        except RuntimeError:  # dtypes without isfinite (float8)
            finite = bool(torch.isfinite(t.float()).all())
        if not finite:
            raise CheckpointError(f"{path}: non-finite weights (NaN or Inf) in {name}; refusing to load them")


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of the weights (names, dtypes, shapes, values) to tie a purifier to its classifier."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
