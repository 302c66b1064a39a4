"""`pssr purify` never loses or tears data (issue 14): kill -9 between an output and its manifest line,
a full disk, file names that are not UTF-8, decompression bombs."""

import errno
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pssr import checkpoint, classifiers, purify_folder
from test_purify import _REAL_SHIPPED, _files, _grey, _invoke, _save_purifier


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    torch.set_num_threads(1)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory):
    """A random-weights purifier bound to the shipped MNIST classifier (copied beside it)."""
    root = tmp_path_factory.mktemp("models")
    clf, _ = classifiers.load(_REAL_SHIPPED("classifier-mnist"))
    return _save_purifier(root / "p-mnist.safetensors", clf, 1, "classifier-mnist.safetensors", "mnist", 0)


def _folder(tmp_path, n, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        _grey(rng).save(src / f"g{i:02d}.png")
    return src


def _lines(path: Path) -> list[dict]:
    """Every manifest line, each required to be whole JSON; the file ends with a newline."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a torn last line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def _every_output_recorded(out: Path) -> None:
    """The promise of issue 14: every output on disk ends with a record holding its predictions."""
    last = {}
    for rec in _lines(out / "manifest.jsonl"):
        if rec.get("output") and (rec["status"] == "ok" or rec["path"] not in last):
            last[rec["output"]] = rec
    # (a hard kill may leave temporaries: the rerun removes them)
    outputs = {f for f in _files(out) if f != "manifest.jsonl" and not f.endswith((".mask.png", ".strip.png"))
               and not f.rsplit("/", 1)[-1].startswith(".")}
    assert outputs, "nothing was written"
    for name in outputs:
        rec = last.get(name)
        assert rec is not None, f"{name} has no manifest record"
        assert rec["status"] == "ok" and rec["pred_before"] is not None and rec["pred_after"] is not None, rec


def _no_temporaries(out: Path) -> None:
    assert not [f for f in _files(out) if f.rsplit("/", 1)[-1].startswith(".")], _files(out)


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------------------------
# kill -9


_KILLER = """
import os, sys, threading
from pssr import purify_folder
real, lock, n = purify_folder.write_output, threading.Lock(), [0]

def write_then_die(path, data):
    seconds = real(path, data)  # the output is renamed into place ...
    if path.name.endswith((".mask.png", ".strip.png")):
        return seconds
    with lock:
        n[0] += 1
        if n[0] == int(sys.argv[1]):
            os._exit(137)  # ... and the process dies before anything else happens, as under kill -9
    return seconds

purify_folder.write_output = write_then_die
from pssr_cli.main import cli
cli(sys.argv[2:], prog_name="pssr")
"""


@pytest.mark.parametrize("save_masks", [False, True])
def test_kill_after_an_output_is_written_loses_no_prediction(tmp_path, mnist_model, save_masks):
    src, out = _folder(tmp_path, 12), tmp_path / "out"
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    flags = ["--save-masks"] if save_masks else []
    proc = subprocess.run([sys.executable, str(script), "5", "purify", str(src), str(out), "--model", str(mnist_model),
                           "--batch-size", "4", *flags], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 137, proc.stderr
    written = {f for f in _files(out) if f.endswith(".png") and not f.endswith((".mask.png", ".strip.png"))}
    assert written  # the kill came after outputs were in place
    _every_output_recorded(out)
    # the rerun finishes the rest, and the compacted manifest has every prediction
    result = _invoke(src, out, "--model", mnist_model, *flags)
    assert result.exit_code == 0, result.output
    records = _lines(out / "manifest.jsonl")
    assert sorted(r["path"] for r in records) == [f"g{i:02d}.png" for i in range(12)]
    assert all(r["status"] == "ok" and r["pred_after"] is not None for r in records), records
    _every_output_recorded(out)
    _no_temporaries(out)


# --------------------------------------------------------------------------------------------
# A full disk


def _full_after(monkeypatch, n_ok: int):
    """Output writes succeed ``n_ok`` times, then fail with ENOSPC (as atomic_write does: nothing left)."""
    real, count = purify_folder.write_output, [0]

    def write(path, data):
        count[0] += 1
        if count[0] > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(purify_folder, "write_output", write)


def test_full_disk_on_an_output_stops_with_one_line_and_reruns_finish(tmp_path, mnist_model, monkeypatch):
    src, out = _folder(tmp_path, 10), tmp_path / "out"
    with monkeypatch.context() as m:
        _full_after(m, 3)
        result = _invoke(src, out, "--model", mnist_model, "--batch-size", 2)
    _one_line_error(result, "No space left on device", "rerun")
    _lines(out / "manifest.jsonl")
    _every_output_recorded(out)
    _no_temporaries(out)
    result = _invoke(src, out, "--model", mnist_model, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    records = _lines(out / "manifest.jsonl")
    assert len(records) == 10 and all(r["status"] == "ok" and r["pred_after"] is not None for r in records)


def test_full_disk_on_the_manifest_leaves_no_torn_line(tmp_path, mnist_model, monkeypatch):
    """The third record is cut short by the disk (a short write, then ENOSPC), as it was in the failure path."""
    src, out = _folder(tmp_path, 8), tmp_path / "out"
    real, count = os.write, [0]

    def write(fd, data):
        if bytes(data[:9]) == b'{"path": ':
            count[0] += 1
            if count[0] == 3:
                return real(fd, data[: len(data) // 2])
            if count[0] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    with monkeypatch.context() as m:
        m.setattr(os, "write", write)
        result = _invoke(src, out, "--model", mnist_model, "--batch-size", 2)
    _one_line_error(result, "No space left on device", "manifest")
    _lines(out / "manifest.jsonl")  # whole lines only
    _every_output_recorded(out)
    _no_temporaries(out)
    result = _invoke(src, out, "--model", mnist_model)
    assert result.exit_code == 0, result.output
    records = _lines(out / "manifest.jsonl")
    assert len(records) == 8 and all(r["status"] == "ok" and r["pred_after"] is not None for r in records)


def test_full_disk_when_the_manifest_is_compacted(tmp_path, mnist_model, monkeypatch):
    src, out = _folder(tmp_path, 3), tmp_path / "out"
    real = checkpoint.atomic_write

    def atomic_write(path, write):
        if Path(path).name == "manifest.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "atomic_write", atomic_write)
        result = _invoke(src, out, "--model", mnist_model)
    _one_line_error(result, "No space left on device")
    _every_output_recorded(out)
    result = _invoke(src, out, "--model", mnist_model)
    assert result.exit_code == 0 and "0 ok, 3 skipped, 0 failed" in result.stdout, result.output
    records = _lines(out / "manifest.jsonl")
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)


# --------------------------------------------------------------------------------------------
# File names that are not UTF-8


def test_non_utf8_file_name_is_recorded_losslessly(tmp_path, mnist_model):
    rng = np.random.default_rng(3)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    raw = b"caf\xe9.png"  # Latin-1 é: not UTF-8
    _grey(rng).save(os.path.join(os.fsencode(src), raw), format="PNG")
    _grey(rng).save(src / "ok.png")
    _grey(rng).save(src / "zz.png")
    for attempt in range(2):  # and the rerun
        result = _invoke(src, out, "--model", mnist_model, "--save-masks")
        assert result.exit_code == 0, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert ("3 ok, 0 skipped" if attempt == 0 else "0 ok, 3 skipped") in result.stdout
    data = (out / "manifest.jsonl").read_bytes()
    data.decode("utf-8")  # the manifest stays valid UTF-8
    records = {r["path"]: r for r in _lines(out / "manifest.jsonl")}
    name = os.fsdecode(raw)
    assert set(records) == {name, "ok.png", "zz.png"}
    assert os.fsencode(records[name]["path"]) == raw  # lossless: back to the very bytes
    assert os.fsencode(records[name]["output"]) == raw
    assert records[name]["status"] == "ok" and records[name]["pred_after"] is not None
    assert raw in os.listdir(os.fsencode(out))


# --------------------------------------------------------------------------------------------
# Decompression bombs


def _png_one_colour(path: Path, width: int, height: int) -> None:
    """A 1-bit greyscale PNG of one colour, written row by row: a few kB on disk whatever its size."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_with_one_line_and_no_warning(tmp_path, mnist_model):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _png_one_colour(src / "bomb.png", 13000, 13000)  # 169 Mpx: above Pillow's warning size
    assert (src / "bomb.png").stat().st_size < 200_000
    _grey(np.random.default_rng(4)).save(src / "fine.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _invoke(src, out, "--model", mnist_model)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "DecompressionBomb" not in result.output
    assert result.exit_code == 1 and "1 ok, 0 skipped, 1 failed" in result.stdout, result.output
    records = {r["path"]: r for r in _lines(out / "manifest.jsonl")}
    error = records["bomb.png"]["error"]
    assert records["bomb.png"]["status"] == "failed" and "\n" not in error
    assert "13000x13000" in error and "--max-pixels" in error, error
    assert records["fine.png"]["status"] == "ok"


def test_max_pixels_is_the_cap(tmp_path, mnist_model):
    rng = np.random.default_rng(5)
    src = tmp_path / "in"
    src.mkdir()
    _grey(rng, 28, 28).save(src / "big.png")  # 784 pixels
    _grey(rng, 20, 20).save(src / "small.png")  # 400 pixels
    result = _invoke(src, tmp_path / "out", "--model", mnist_model, "--max-pixels", 500)
    assert result.exit_code == 1 and "1 ok, 0 skipped, 1 failed" in result.stdout, result.output
    records = {r["path"]: r for r in _lines(tmp_path / "out" / "manifest.jsonl")}
    assert records["small.png"]["status"] == "ok"
    assert records["big.png"]["status"] == "failed" and "28x28" in records["big.png"]["error"]
    assert "--max-pixels 500" in records["big.png"]["error"]
    # raised above the bomb, the cap lets it through (not decoded here: the cap is checked first)
    assert purify_folder.Options().max_pixels == purify_folder.MAX_PIXELS
    big = _invoke(src, tmp_path / "out2", "--model", mnist_model, "--max-pixels", 1000)
    assert big.exit_code == 0 and "2 ok" in big.stdout, big.output
