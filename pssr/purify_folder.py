"""`pssr purify IN OUT`: purify every image of a folder tree into another one, with a manifest.

Every image file under IN (recursively; .png .jpg .jpeg .bmp .webp in any case; hidden files and
folders skipped; symbolic links followed, each real folder once and never into OUT) is decoded
with Pillow, purified (Pixel Surgery, then Semantic Regeneration) and written under OUT at the
same relative path, as a lossless PNG by default. One JSON line per input file goes to
``OUT/manifest.jsonl`` (``manifest-rank{R}.jsonl`` under torchrun).

Choices, stated once (the CLI's help repeats them):

* **Which model.** ``auto`` sends greyscale images to the MNIST purifier and colour ones to the
  CIFAR-10 purifier. An image is greyscale when every pixel has R = G = B once decoded (and alpha
  composited), whatever the file's mode: an RGB or RGBA file of a grey picture (matplotlib writes
  those) counts as grey. ``mnist``/``cifar10`` force one shipped purifier, anything else is a
  purifier checkpoint path (so a file called ``mnist`` must be given as ``./mnist``; a name close
  to one of these gets a "did you mean"). A model is loaded on first use. If a forced model cannot
  be loaded the run stops with a one-line error; in ``auto`` the files that need the missing model
  fail (one message) and the others go on.
* **Its classifier.** ``classifier`` (``--classifier``) names it; otherwise
  :func:`pssr.purifier.find_classifier` (shared with ``pssr eval`` and the Python API) looks
  beside the purifier, where its training run's ``config.yaml`` points, then among the shipped
  ones, and takes the file whose stored weights have the sha256 the purifier records (read as data,
  before anything is built). A classifier naming its own architecture (``package.module:factory``)
  is imported only with ``trust_arch`` (``--trust-arch``): otherwise a checkpoint could run code.
* **Channels.** A colour image given to a greyscale model is converted to luma (ITU-R 601-2,
  Pillow's ``L``); a grey image given to a colour model has its channel repeated.
* **Alpha** (RGBA, LA, palette transparency) is composited on white and dropped, as in
  :func:`pssr.data.load_image_folder`: transparent pixels get a defined value, the one viewers show.
* **16-bit greyscale** is scaled from [0, 65535] to [0, 1] in full precision for the model; the
  output is 8-bit. Other modes (1, P, CMYK, YCbCr, ...) are converted to L or RGB by Pillow. An
  EXIF orientation is applied; of an animated file only the first frame is used.
* **Size.** The purifier works at its classifier's size (28x28 for MNIST, 32x32 for CIFAR-10): an
  image of another size is resized to it (bilinear, antialiased when shrinking, aspect ratio not
  kept) and **the output is written at the model's size**: the output is exactly what was purified
  and classified, and nothing is invented by upsampling it back. Each such resize is recorded.
* **Non-image files** (by extension) are ignored: not in the manifest, only counted in the summary.
  A file with an image extension that cannot be decoded (corrupt, empty, not an image, unsupported
  mode) is reported on stderr and recorded as ``failed``; the others are still processed. So is an
  image of more than ``max_pixels`` (``--max-pixels``, default MAX_PIXELS = 50 million) pixels,
  refused from its header before decoding: a small file can hold a huge image (a 519 kB PNG of
  13000x13000 took 2 GB). Pillow's own bomb warning is not raised; the cap replaces it.
* **File names** that are not valid UTF-8 (``caf\\xe9.png``) are handled as ``os.fsdecode`` gives
  them (surrogate-escaped) and written to the manifest with ``\\udcNN`` escapes, which ``json.loads``
  turns back into the same string, so ``os.fsencode(record["path"])`` is the file's very name.
* **Outputs** are written atomically (temporary name in the same folder, fsync, then rename; in
  background threads, since the fsync is mostly waiting) and never overwritten without
  ``overwrite`` (status ``skipped``, error ``exists``), so a run killed halfway leaves no partial
  file and a rerun finishes the rest (it also deletes the temporary files that a hard kill may
  leave for its own outputs). With ``fmt="png"`` two inputs that differ only in extension
  (``a.jpg``, ``a.png``) would share ``a.png``: the first (sorted) one wins, the others fail with
  a message naming it (use ``fmt="same"``).
* **Manifest.** Records are appended one whole line per write (and flushed) while the run goes; a
  torn last line from a killed run is dropped on the next start. A purified file's record, with its
  predictions, is appended *before* its files are written, and again after (with the write time):
  so even after ``kill -9`` every output on disk has its predictions in the manifest, and a record
  whose output never came is redone by the rerun, which finds the output missing. At the end of a
  run the manifest is rewritten atomically with one record per input path (the latest; a
  ``skipped``/``exists`` record does not replace an earlier ``ok`` one for the same output), sorted
  by path.
* **A full disk** (ENOSPC, EDQUOT) on an output or the manifest stops the run with one line (the
  next files would fail too): the output being written is removed, a manifest line being written
  is cut back, so every file is whole, and rerunning the same command once there is space
  finishes the rest. Other write errors fail that file only.
* **What happened.** Over the ``ok`` records of the manifest, the summary counts the predictions
  purification changed and, where the truth is known, the accuracy before and after. The truth
  (manifest field ``label``, a class name of the file's model) comes from ``labels``
  (``--labels FILE.csv``, ``file,label`` rows, file relative to IN; default ``IN/labels.csv`` when
  present, which is then not counted as an ignored file), else from the file's folder when that is
  named like one of the model's classes (MNIST: ``0``..``9``; CIFAR-10: ``airplane``, ...).
* **Batches.** Images are batched per model (all of a model's images have its size once converted).
  ``seconds`` of an ``ok`` file is its decode, encode and write time plus its share of its batch's
  model time (null for the others).
* **Masks** (``save_masks``). Beside each output ``NAME.EXT``: ``NAME.mask.png``, the surgery mask
  (white = removed), and ``NAME.strip.png``, four panels side by side: the input as the model saw it
  (converted and resized) | the mask | the regenerated output | ``|output - input|`` x4, clipped to
  1 (white = a change of a quarter of the range or more; kept pixels are 0), with a CAPTION_PX-high
  band of captions below (:func:`strip_captions`: the prediction before and its probability, the
  share removed, the prediction after, the label if known). Both are enlarged by
  ``view_scale(size)`` = max(1, 128 // size) (nearest), 4x for the 28 and 32 px models: the mask
  is then 112x112 or 128x128 and the strip 4 x 112 = 448 by 112 + 28, or 512 by 128 + 28. They follow the
  outputs' rules (atomic writes, no replacing without ``overwrite``, the output written last): a
  file is skipped only when all its files exist; otherwise it is purified again and only the
  missing ones are written. A write error removes the files of that input already written. The
  manifest records their paths (``mask``, ``strip``; null without ``save_masks``). A mask or strip
  name that an earlier (sorted) input owns (an input called ``a.mask.png`` beside ``a.png``, or
  ``a.jpg`` beside ``a.png`` with ``fmt="same"``) fails the later input with a message naming the first.
* **torchrun.** With ``WORLD_SIZE`` > 1, rank R takes files[R::WORLD] of the sorted list; no
  process group is needed. ``--device cuda`` then means ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, classifiers
from . import purifier as purifier_mod
from .data import IMAGE_EXTENSIONS
from .errors import first_line
from .regeneration import compose

MODELS = ("auto", "mnist", "cifar10")
FORMATS = ("png", "same")
STAGES = ("decode", "saliency", "surgery", "regeneration", "classify", "encode")  # in the main thread
MASK_SUFFIX, STRIP_SUFFIX = ".mask.png", ".strip.png"  # --save-masks: NAME.EXT -> NAME.mask.png, NAME.strip.png
VIEW_PX = 128  # masks and strips are enlarged to about this many pixels per panel side
DIFF_GAIN = 4  # the strip's difference panel: |output - input| x this, clipped to 1
WRITERS = 4  # threads writing outputs (file write, fsync, rename): "write" in the profile, overlapped
# The largest image decoded (width x height), unless --max-pixels says otherwise: 50 Mpx is about 150 MB
# as RGB, above every common camera and far above the models' 28 and 32 px. Pillow only warns up to twice
# its own limit (89.5 Mpx), and a 519 kB PNG of 13000 x 13000 took 2 GB and 10 s to decode.
MAX_PIXELS = 50_000_000
LABELS_FILE = "labels.csv"  # IN/labels.csv is read as --labels when present
CAPTION_PX, CAPTION_FONT_PX = 28, 11  # the band under a --save-masks strip (two lines), and its font size
# Pillow format and options per output extension; JPEG ("same" only) is the one lossy choice.
_SAVE = {
    ".png": ("PNG", {"compress_level": 1}),  # lossless either way; 1 encodes ~35% faster for ~1.5% more bytes
    ".bmp": ("BMP", {}),
    ".webp": ("WEBP", {"lossless": True}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_TO_RGB = ("P", "PA", "RGBX", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")


class PurifyError(Exception):
    """A problem with the whole run (folders, model, device): one line, the run does not start/go on."""


class ImageError(Exception):
    """One input file that cannot be used (one line); recorded as failed."""


@dataclass
class Options:
    model: str = "auto"  # auto | mnist | cifar10 | path to a purifier checkpoint
    classifier: str | None = None  # classifier checkpoint override (not with auto)
    batch_size: int = 64
    device: str = "cpu"
    fmt: str = "png"  # png | same
    overwrite: bool = False
    quiet: bool = False
    profile: bool = False
    save_masks: bool = False  # also write NAME.mask.png and NAME.strip.png beside each output
    labels: str | None = None  # CSV of file,label rows (default: IN/labels.csv when present)
    max_pixels: int = MAX_PIXELS  # larger images are not decoded (failed)
    trust_arch: bool = False  # let a checkpoint's own architecture (package.module:factory) be imported


@dataclass
class Summary:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    ignored: int = 0  # non-image files under IN (all ranks)
    output: Path | None = None
    manifest: Path | None = None
    rank: int = 0
    world: int = 1
    seconds: float = 0.0
    times: dict = field(default_factory=lambda: {s: 0.0 for s in STAGES + ("write",)})
    # over the ok records of the (compacted) manifest, this run's and earlier ones
    purified: int = 0
    changed: int = 0  # pred_after != pred_before
    labelled: int = 0  # with a label that is one of their model's classes
    correct_before: int = 0
    correct_after: int = 0
    labels: Path | None = None  # the labels file read, if any

    @property
    def images_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Folders and files


def check_folders(in_dir, out_dir) -> tuple[Path, Path]:
    """(IN, OUT) resolved; IN must be a folder, OUT must not be a file nor overlap IN."""
    src, dst = Path(in_dir).expanduser(), Path(out_dir).expanduser()
    if not src.exists():
        raise PurifyError(f"input folder {src} does not exist")
    if not src.is_dir():
        raise PurifyError(f"input {src} is not a folder")
    if dst.exists() and not dst.is_dir():
        raise PurifyError(f"output {dst} exists and is not a folder")
    rs, rd = src.resolve(), dst.resolve()
    if rd == rs or rs in rd.parents:
        raise PurifyError(f"output folder {dst} is inside the input folder {src}; choose an output outside it")
    if rd in rs.parents:
        raise PurifyError(f"input folder {src} is inside the output folder {dst}; outputs could overwrite inputs")
    return src, dst


def list_files(root: Path, exclude: Path | None = None, not_counted: Path | None = None) -> tuple[list[str], int]:
    """(image paths relative to root, as sorted POSIX strings; how many other files were ignored).

    Symbolic links are followed, each real folder once (no loops); ``exclude`` (OUT) and what is
    under it are never entered, even through a link. ``not_counted`` (the labels file) is not
    counted as ignored: it is used. A name that is not valid in the file system's encoding (bytes
    that are not UTF-8) comes back surrogate-escaped (``os.fsdecode``), so ``os.fsencode`` gives
    back the very bytes.
    """
    images, ignored = [], 0
    seen: set[str] = set()
    excluded = os.path.realpath(exclude) if exclude is not None else None
    used = os.path.realpath(not_counted) if not_counted is not None else None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or excluded and (real == excluded or real.startswith(excluded + os.sep)):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append((rel_dir / name).as_posix())
            elif used is None or os.path.realpath(os.path.join(dirpath, name)) != used:
                ignored += 1
    return sorted(images), ignored


def view_names(out: str) -> tuple[str, str]:
    """(mask, strip) paths relative to OUT for the output ``out``: its extension replaced."""
    stem = Path(out).with_suffix("").as_posix()
    return stem + MASK_SUFFIX, stem + STRIP_SUFFIX


def view_scale(size: int) -> int:
    """The integer enlargement of masks and strips: about VIEW_PX pixels a side, never shrunk."""
    return max(1, VIEW_PX // size)


def output_names(files: list[str], fmt: str, save_masks: bool = False) -> list[tuple[str | None, str | None]]:
    """(output path relative to OUT, None) per file, or (None, error) when an earlier file owns one of
    its names (the output, and with ``save_masks`` its mask and strip)."""
    if fmt not in FORMATS:
        raise PurifyError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    owner: dict[str, str] = {}
    result = []
    for rel in files:
        out = Path(rel).with_suffix(".png").as_posix() if fmt == "png" else rel
        names = [out, *view_names(out)] if save_masks else [out]
        taken = next((n for n in names if n in owner), None)
        if taken == out:
            result.append((None, f"output {out} is already the output of {owner[out]} (use --format same)"))
        elif taken:
            result.append((None, f"{taken} is already written for {owner[taken]} (rename one of them)"))
        else:
            owner.update(dict.fromkeys(names, rel))
            result.append((out, None))
    return result


def shard_from_env(env=None) -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK and WORLD_SIZE; (0, 1) without them."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1") or "1")
        rank = int(env.get("RANK", "0") or "0")
    except ValueError:
        raise PurifyError(f"bad RANK/WORLD_SIZE in the environment: "
                          f"{env.get('RANK')!r}/{env.get('WORLD_SIZE')!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise PurifyError(f"bad RANK/WORLD_SIZE in the environment: rank {rank} of {world}")
    return rank, world


def resolve_device(name: str, env=None) -> torch.device:
    env = os.environ if env is None else env
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise PurifyError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PurifyError(f"device {name}: CUDA is not available here")
        if device.index is None and "LOCAL_RANK" in env:
            device = torch.device("cuda", int(env["LOCAL_RANK"]) % torch.cuda.device_count())
    elif device.type != "cpu":
        raise PurifyError(f"unsupported device {name!r} (use cpu, cuda or cuda:N)")
    return device


def _remove_stale_temps(out_dir: Path, names: list[str]) -> None:
    """Delete temporary files (``.NAME.XXXX.tmp``, from atomic_write) that a killed run left for our outputs."""
    by_dir: dict[Path, set[str]] = defaultdict(set)
    for rel in names:
        p = out_dir / rel
        by_dir[p.parent].add(p.name)
    for folder, own in by_dir.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            if entry.startswith(".") and entry.endswith(".tmp") and entry[1:-4].rpartition(".")[0] in own:
                with contextlib.suppress(OSError):
                    os.unlink(folder / entry)


def printable(text: str) -> str:
    """``text`` safe to print on any terminal: a file name's undecodable bytes (surrogate-escaped by
    ``os.fsdecode``) shown as ``\\xNN`` instead of raising UnicodeEncodeError."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def read_labels(path: Path) -> dict[str, str]:
    """{path relative to IN: label} from a CSV of ``file,label`` rows (an optional ``file,label``
    header; UTF-8, a BOM allowed; cells stripped). A malformed file stops the run with one line naming
    the line: a wrong label would make the accuracy printed at the end wrong without saying so."""
    import csv

    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise PurifyError(f"cannot read the labels file {path}: {_one_line(first_line(exc))}") from None
    except UnicodeDecodeError as exc:
        raise PurifyError(f"labels file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    labels: dict[str, str] = {}
    first: dict[str, int] = {}
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as exc:
        raise PurifyError(f"labels file {path}: {_one_line(exc)}") from None
    for number, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) != 2:
            raise PurifyError(f"labels file {path} line {number}: expected 2 fields (file,label), got {len(cells)}")
        file, label = cells
        if number == 1 and (file.lower(), label.lower()) == ("file", "label"):
            continue
        file = Path(file).as_posix().removeprefix("./")
        if not label:
            raise PurifyError(f"labels file {path} line {number}: no label for {file}")
        if file in first:
            raise PurifyError(f"labels file {path} line {number}: {file} is labelled twice (line {first[file]})")
        first[file], labels[file] = number, label
    return labels


# --------------------------------------------------------------------------------------------
# Decoding and conversion


@dataclass
class Decoded:
    image: object  # PIL image in mode L, RGB or F (16-bit grey, values in [0, 255])
    grey: bool  # every pixel has R = G = B
    conversions: list[str]


def _one_line(text) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _own_size_limit():
    """Pillow's decompression-bomb check off (its warning, and its error at twice its limit), since
    ``decode`` applies ``max_pixels`` itself before decoding. Process-wide while it lasts: decoding
    happens in the main thread only."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode(path: Path, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Decode one file into L, RGB or F (16-bit grey); raises ImageError with a one-line reason.

    An image of more than ``max_pixels`` is refused from its header, before anything is decoded: a
    small file can hold a huge image (a decompression bomb) that would take gigabytes.
    """
    from PIL import Image, ImageOps

    try:
        if os.path.getsize(path) == 0:
            raise ImageError("empty file")
        with _own_size_limit(), Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"too large: {w}x{h} = {w * h:,} pixels, above --max-pixels {max_pixels} "
                                 "(a decompression bomb?); pass a larger --max-pixels to purify it")
            frames = getattr(img, "n_frames", 1)
            img.load()
            img = img.copy()
        conversions = [f"first of {frames} frames"] if frames > 1 else []
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # an unreadable EXIF block does not make the picture unusable
            orientation = 1
        if orientation in range(2, 9):
            img = ImageOps.exif_transpose(img)
            conversions.append("EXIF orientation applied")
        mode = img.mode
        if mode in _SIXTEEN_BIT:
            a = np.asarray(img).astype(np.float32)
            img = Image.fromarray(np.clip(a, 0, 65535) * np.float32(255 / 65535))  # mode F, [0, 255]
            conversions.append(f"{mode}->L (16-bit, scaled to [0, 1] in full precision; output 8-bit)")
        elif mode == "F":
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32), 0, 255))
        elif mode in ("1", "L") and not img.has_transparency_data:
            if mode == "1":
                img = img.convert("L")
                conversions.append("1->L")
        elif img.has_transparency_data or mode in ("LA", "La", "PA", "RGBA", "RGBa"):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
            conversions.append(f"{mode}->RGB (alpha composited on white)")
        elif mode != "RGB":
            if mode not in _TO_RGB:
                raise ImageError(f"unsupported image mode {mode}")
            img = img.convert("RGB")
            conversions.append(f"{mode}->RGB")
    except ImageError:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise ImageError(f"cannot decode: {_one_line(first_line(exc))}") from None
    if img.mode == "RGB":
        a = np.asarray(img)
        grey = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
    else:
        grey = True
    return Decoded(img, grey, conversions)


def prepare(decoded: Decoded, channels: int, size: int) -> tuple[np.ndarray, list[str]]:
    """(C, size, size) float32 in [0, 1] for a model, and the conversions made."""
    from PIL import Image

    img, conversions = decoded.image, []
    if channels == 1 and img.mode == "RGB":
        if decoded.grey:
            img = Image.fromarray(np.ascontiguousarray(np.asarray(img)[..., 0]))
            conversions.append("RGB->L (all pixels grey)")
        else:
            img = img.convert("L")
            conversions.append("RGB->L (luma)")
    if img.size != (size, size):
        (w, h) = img.size
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        conversions.append(f"resized {w}x{h}->{size}x{size} (WxH, bilinear)")
    a = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    if img.mode == "F":
        a = np.clip(a, 0, 1)
    if a.ndim == 2:
        if channels == 3:
            conversions.append("L->RGB")
            a = np.repeat(a[None], 3, axis=0)
        else:
            a = a[None]
    else:
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(a), conversions


def _to_image(x: torch.Tensor):
    """One (C, H, W) image in [0, 1] as an 8-bit PIL image, L or RGB."""
    from PIL import Image

    a = (x.detach().float().cpu() * 255).round_().clamp_(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(a[0]) if a.shape[0] == 1 else Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)))


def _save(img, suffix: str) -> bytes:
    fmt, kwargs = _SAVE[suffix.lower()]
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def encode(x: torch.Tensor, suffix: str) -> bytes:
    """One (C, H, W) image in [0, 1] as an 8-bit L or RGB file's bytes, in the format of ``suffix``."""
    return _save(_to_image(x), suffix)


def write_output(path: Path, data: bytes) -> float:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename); returns the seconds taken.

    Runs in a writer thread: the fsync is mostly waiting, which the threads overlap with the model.
    """
    t0 = time.perf_counter()

    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)

    checkpoint.atomic_write(path, write)
    return time.perf_counter() - t0


def write_outputs(blobs: list[tuple[Path, bytes]]) -> float:
    """write_output for each (path, data) in order; seconds taken. On an error the ones already
    written are removed, so a failed input leaves none of its files."""
    done, seconds = [], 0.0
    try:
        for path, data in blobs:
            seconds += write_output(path, data)
            done.append(path)
    except BaseException:
        for path in done:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return seconds


def _zoom(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(C, H, W) enlarged ``scale`` times by repeating pixels (nearest), so each stays a crisp block."""
    return x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def _shown(rec: dict, when: str) -> str:
    """A prediction as the strip's caption shows it: the class name (else its index) and probability."""
    name = rec[f"class_{when}"] if rec.get(f"class_{when}") is not None else rec[f"pred_{when}"]
    p = rec.get(f"prob_{when}")
    return f"{name} ({p:.0%})" if p is not None else f"{name}"


def strip_captions(rec: dict) -> list[str]:
    """The two-line captions under a strip's four panels, from the file's manifest record: the
    prediction before purification | the share removed | the prediction after | the label (if
    known), else what the last panel shows. So a strip alone tells whether purification changed
    the answer, and whether to the truth."""
    removed = rec.get("removed_fraction")
    return [f"before\n{_shown(rec, 'before')}",
            f"removed\n{removed:.0%}" if removed is not None else "removed\n?",
            f"after\n{_shown(rec, 'after')}",
            f"label\n{rec['label']}" if rec.get("label") is not None else f"|out-in|\nx{DIFF_GAIN}"]


@functools.lru_cache(maxsize=1)
def _caption_font():
    from PIL import ImageFont

    return ImageFont.load_default(size=CAPTION_FONT_PX)  # Pillow's own font: the same on every machine


def caption_band(texts: list[str], panel_width: int, mode: str):
    """A CAPTION_PX-high black band, one white caption (lines split at newlines) per panel,
    left-aligned, each line cut to fit its panel."""
    from PIL import Image, ImageDraw

    band = Image.new(mode, (len(texts) * panel_width, CAPTION_PX), 0)
    draw, font = ImageDraw.Draw(band), _caption_font()
    white = 255 if mode == "L" else (255,) * len(mode)
    for i, text in enumerate(texts):
        for j, line in enumerate(text.split("\n")[:2]):
            while len(line) > 1 and draw.textlength(line, font=font) > panel_width - 4:
                line = line[:-2] + "."
            draw.text((i * panel_width + 2, 1 + j * (CAPTION_PX // 2)), line, fill=white, font=font)
    return band


def encode_views(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor,
                 captions: list[str] | None = None) -> tuple[bytes, bytes]:
    """(mask PNG, strip PNG) of one image: the mask white where removed; the strip input | mask |
    output | |output - input| x DIFF_GAIN, both enlarged by view_scale (see the module docstring),
    the strip with ``captions`` (strip_captions) in a band below its panels."""
    from PIL import Image

    x_hat = x_hat.detach().float().cpu()
    m = mask.detach().float().cpu()
    diff = ((x_hat - x).abs() * DIFF_GAIN).clamp_(max=1)
    strip = torch.cat([x, m.expand_as(x), x_hat, diff], dim=2)
    s = view_scale(x.shape[-1])
    panels = _to_image(_zoom(strip, s))
    if captions:
        band = caption_band(captions, x.shape[-1] * s, panels.mode)
        canvas = Image.new(panels.mode, (panels.width, panels.height + band.height))
        canvas.paste(panels, (0, 0))
        canvas.paste(band, (0, panels.height))
        panels = canvas
    return encode(_zoom(m, s), ".png"), _save(panels, ".png")


# --------------------------------------------------------------------------------------------
# Models


class ModelUnavailable(Exception):
    """A model of `auto` that could not be loaded (the files that need it fail)."""


@dataclass
class Model:
    label: str  # mnist, cifar10, or the checkpoint path
    purifier: purifier_mod.Purifier
    spec: purifier_mod.PurifierSpec
    cspec: object
    device: torch.device

    @property
    def channels(self) -> int:
        return self.cspec.in_channels

    @property
    def size(self) -> int:
        return self.cspec.image_size

    @property
    def names(self) -> tuple[str, ...]:
        """The class names, or the indices as text for a classifier without names."""
        classes = tuple(getattr(self.cspec, "classes", ()) or ())
        return classes or tuple(str(i) for i in range(self.cspec.num_classes))

    def run(self, x: torch.Tensor, times: dict, sync: bool = False) -> dict:
        """Purify a batch stage by stage (timed into ``times``); the same as ``Purifier.purify``."""
        p = self.purifier
        classifier = p.classifier

        def lap(stage, t0):
            if sync and x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            t1 = time.perf_counter()
            times[stage] += t1 - t0
            return t1

        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            t = time.perf_counter()
            grad, logits_before = p.surgery.saliency(x)  # enables grad itself
            t = lap("saliency", t)
            x_s, mask = p.surgery.cut(x, grad)
            t = lap("surgery", t)
            cl = torch.channels_last
            x_s_cl = x_s.contiguous(memory_format=cl)
            x_hat = compose(x_s_cl, mask, p.regenerator(x_s_cl, mask.contiguous(memory_format=cl)))
            t = lap("regeneration", t)
            logits_after = classifier(x_hat.contiguous(memory_format=cl))
            lap("classify", t)
        before = torch.softmax(logits_before.detach().float(), 1).max(1)
        after = torch.softmax(logits_after.float(), 1).max(1)
        return {
            "x_hat": x_hat, "mask": mask,
            "removed_fraction": mask.float().mean((1, 2, 3)).tolist(),
            "pred_before": before.indices.tolist(), "prob_before": before.values.tolist(),
            "pred_after": after.indices.tolist(), "prob_after": after.values.tolist(),
        }


class Models:
    """The models of a run, each loaded when a file first needs it."""

    def __init__(self, options: Options, device: torch.device):
        self.options, self.device = options, device
        self.loaded: dict[str, Model] = {}
        self.failed: dict[str, str] = {}
        m = options.model
        if m == "auto" and options.classifier is not None:
            raise PurifyError("--classifier needs one model (--model mnist, cifar10 or a path), not auto")
        if m not in MODELS and not Path(m).expanduser().exists():
            close = difflib.get_close_matches(m.lower(), MODELS, n=1)
            if close:
                raise PurifyError(f"unknown model {m!r}: did you mean {close[0]!r}? (--model takes "
                                  f"{', '.join(MODELS)} or a purifier checkpoint path)")
            raise PurifyError(f"purifier checkpoint {Path(m).expanduser()} does not exist (--model takes "
                              f"{', '.join(MODELS)} or a purifier checkpoint path)")

    def key_for(self, decoded: Decoded) -> str:
        m = self.options.model
        if m != "auto":
            return m
        return "mnist" if decoded.grey else "cifar10"

    def get(self, key: str) -> Model:
        if key in self.loaded:
            return self.loaded[key]
        if key in self.failed:
            raise ModelUnavailable(self.failed[key])
        try:
            model = self._load(key)
        except PurifyError as exc:
            if self.options.model != "auto":
                raise
            self.failed[key] = str(exc)
            raise ModelUnavailable(str(exc)) from None
        self.loaded[key] = model
        return model

    def _load(self, key: str) -> Model:
        if key in ("mnist", "cifar10"):
            path = purifier_mod.shipped_path(f"purifier-{key}")
            if not path.is_file():
                raise PurifyError(f"the {key} purifier is not installed ({path} is missing); "
                                  "pass --model PATH to a purifier checkpoint")
        else:
            path = Path(key).expanduser()
            if not path.is_file():
                raise PurifyError(f"purifier checkpoint {path} does not exist")
        cpath = self.options.classifier
        if cpath is None:
            cpath = find_classifier(path)
        try:
            p, spec, cspec = purifier_mod.load(path, cpath, self.device, trust_arch=self.options.trust_arch)
        except checkpoint.CheckpointError as exc:
            raise PurifyError(_one_line(exc)) from None
        if key == "mnist" and cspec.in_channels != 1 or key == "cifar10" and cspec.in_channels != 3:
            raise PurifyError(f"{path}: a {cspec.in_channels}-channel purifier cannot be the {key} model")
        # BN folded into the convolutions (~15% faster) and channels-last memory (oneDNN's
        # convolutions are ~1.5x faster in it): both measured on the CPU, ResNet-9 at 32x32
        p.surgery.classifier = classifiers.fold_batchnorm(p.classifier)
        p.to(memory_format=torch.channels_last)
        return Model(key, p, spec, cspec, self.device)


def find_classifier(path: Path) -> Path:
    """The classifier the purifier at ``path`` was trained with: :func:`pssr.purifier.find_classifier`
    (the lookup ``pssr eval`` and the Python API share), whose one-line error names ``--classifier``."""
    try:
        return purifier_mod.find_classifier(path, hint="pass it with --classifier PATH")
    except checkpoint.CheckpointError as exc:
        raise PurifyError(_one_line(exc)) from None


# --------------------------------------------------------------------------------------------
# Manifest


def _finite(v):
    return v if v is None or math.isfinite(v) else None


_SURROGATE = re.compile("[\ud800-\udfff]")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _dumps(record: dict) -> str:
    """One JSON line, UTF-8 safe: non-ASCII text stays readable, and the lone surrogates that stand
    for a file name's undecodable bytes (``os.fsdecode``) become ``\\udcNN`` escapes, which
    ``json.loads`` turns back into the same string (so ``os.fsencode`` gives back the very bytes)."""
    text = json.dumps(record, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _after_disk_error(exc: OSError) -> str:
    """What to do next, after a write failed with ``exc``."""
    if exc.errno in _DISK_FULL:
        return ("; every file written so far is whole and recorded: free some space and rerun the same command "
                "to finish")
    return ""


class Manifest:
    """Append-only JSON lines, one ``os.write`` per record; a torn last line is dropped on open.

    A write that fails (a full disk) is cut back to the last whole line and stops the run
    (PurifyError): a record is either whole or absent, and a rerun appends after it.
    """

    def __init__(self, path: Path):
        self.path = path
        self._repair()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self.size = os.fstat(self.fd).st_size

    def _repair(self) -> None:
        try:
            with open(self.path, "rb+") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                if size == 0:
                    return
                fh.seek(size - 1)
                if fh.read(1) == b"\n":
                    return
                fh.seek(0)
                data = fh.read()
                fh.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            pass

    def write(self, record: dict) -> None:
        data = (_dumps(record) + "\n").encode()
        rest = data
        try:
            while rest:
                rest = rest[os.write(self.fd, rest):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)  # no torn line (the next start would drop it too)
            raise PurifyError(f"cannot append to the manifest {self.path}: {_one_line(first_line(exc))}"
                              f"{_after_disk_error(exc)}") from None
        self.size += len(data)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def compact(self) -> list[dict]:
        """Rewrite atomically: one record per path, sorted (see the module docstring); returns them."""
        merged: dict[str, dict] = {}
        with open(self.path, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    path = rec["path"]
                except (ValueError, KeyError, TypeError):
                    continue
                prev = merged.get(path)
                if (prev is not None and prev.get("status") == "ok" and rec.get("status") == "skipped"
                        and rec.get("error") == "exists" and prev.get("output") == rec.get("output")):
                    continue
                merged[path] = rec
        records = [merged[p] for p in sorted(merged)]
        text = "".join(_dumps(rec) + "\n" for rec in records)

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)

        try:
            checkpoint.atomic_write(self.path, write)
        except OSError as exc:
            raise PurifyError(f"cannot rewrite the manifest {self.path}: {_one_line(first_line(exc))} (its records "
                              f"are all there, appended; a rerun compacts them)"
                              f"{_after_disk_error(exc)}") from None
        return records


def _record(rel: str) -> dict:
    return {"path": rel, "status": None, "error": None, "model": None, "removed_fraction": None,
            "pred_before": None, "pred_after": None, "prob_before": None, "prob_after": None,
            "class_before": None, "class_after": None, "seconds": None, "conversions": [], "output": None,
            "mask": None, "strip": None, "label": None}


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM (torchrun, kill) unwinds like Ctrl-C, so that temporary files are removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class _Todo:
    """One input that needs purifying: its record so far and the files still to write."""

    record: dict
    out_path: Path
    todo: list[Path]  # the files to write (output, mask, strip): all, or those missing


@dataclass
class _Item:
    key: str  # the model that purifies it
    record: dict
    array: np.ndarray
    out_path: Path
    todo: list[Path]  # the files to write (output, mask, strip): all, or those missing
    seconds: float


class _Outputs:
    """The records and the output writes of a run, kept in file order.

    Writes run in background threads (the fsync is mostly waiting). A purified file's record, with
    its predictions, is appended *before* its files are handed to the writers, and again once they
    are written (with the write time; the later line wins when the manifest is compacted). So an
    output on disk always has a record, even after kill -9 between its rename and anything else; a
    record whose output never arrived is redone by the rerun, which finds the output missing.

    A write error fails that file, except a full disk, which stops the run (PurifyError): the next
    files would fail too, and the failed file leaves nothing (atomic writes). Leaving the ``with``
    block, after an error or an interrupt too, waits for the writes under way (each file is whole
    or absent), drops the queued ones, records the outputs that were written (if the manifest still
    can be written) and closes the progress bar and the manifest.
    """

    def __init__(self, manifest: "Manifest", summary: Summary, say, max_inflight: int, bar):
        self.manifest, self.summary, self.say, self.bar = manifest, summary, say, bar
        self.max_inflight = max_inflight
        self.writer = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="pssr-purify-write")
        self.inflight: deque[tuple[dict, object]] = deque()  # (record, future of write_outputs), in file order

    def record(self, rec: dict) -> None:
        """One manifest line, the summary count and the bar."""
        self.manifest.write(rec)
        setattr(self.summary, rec["status"], getattr(self.summary, rec["status"]) + 1)
        self.bar.update(1)

    def fail(self, rec: dict, error: str) -> None:
        rec["status"], rec["error"] = "failed", error
        rec["output"] = rec["mask"] = rec["strip"] = None
        self.say(f"failed {rec['path']}: {error}")
        self.record(rec)

    def _written(self, rec: dict, seconds: float) -> None:
        self.summary.times["write"] += seconds
        rec["status"], rec["seconds"] = "ok", round(rec["seconds"] + seconds, 6)
        self.record(rec)

    def submit(self, rec: dict, blobs: list[tuple[Path, bytes]]) -> None:
        """Record one purified input, then hand its files to the writer threads (recorded again when written)."""
        rec["status"] = "ok"
        self.manifest.write(rec)
        self.inflight.append((rec, self.writer.submit(write_outputs, blobs)))

    def collect(self, limit: int) -> None:
        """Record the finished writes in order; wait while more than ``limit`` are in flight."""
        while self.inflight and (len(self.inflight) > limit or self.inflight[0][1].done()):
            rec, future = self.inflight.popleft()
            try:
                seconds = future.result()
            except OSError as exc:
                if exc.errno in _DISK_FULL:
                    raise PurifyError(f"cannot write {rec['output']}: {_one_line(first_line(exc))}"
                                      f"{_after_disk_error(exc)}") from None
                self.fail(rec, f"cannot write {rec['output']}: {_one_line(first_line(exc))}")
                continue
            self._written(rec, seconds)

    def __enter__(self) -> "_Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.writer.shutdown(wait=True, cancel_futures=True)
        try:
            for rec, future in self.inflight:
                if future.done() and not future.cancelled() and future.exception() is None:
                    self._written(rec, future.result())
        except PurifyError:
            if exc_type is None:
                raise
            # already stopping (a full disk): these outputs' first records hold their predictions
        finally:
            self.bar.close()
            self.manifest.close()


class _Batches:
    """Decoded images waiting per model until a batch is full."""

    def __init__(self, size: int, purify):
        self.size, self.purify = size, purify
        self.pending: dict[str, list[_Item]] = defaultdict(list)

    def add(self, item: _Item) -> None:
        self.pending[item.key].append(item)
        if len(self.pending[item.key]) >= self.size:
            self.purify(item.key, self.pending.pop(item.key))

    def flush_all(self) -> None:
        for key in list(self.pending):
            self.purify(key, self.pending.pop(key))


@dataclass
class _Run:
    """What the steps of one run share."""

    src: Path
    dst: Path
    options: Options
    device: torch.device
    models: "Models"
    mine: list  # (rel, (output rel, clash error)) of this rank's files
    manifest: "Manifest"
    summary: Summary
    say: object
    outputs: _Outputs
    batches: _Batches = None
    labels: dict = field(default_factory=dict)  # path relative to IN: label, from the labels file
    unavailable_said: set = field(default_factory=set)
    bad_labels_said: set = field(default_factory=set)

    @property
    def times(self) -> dict:
        return self.summary.times


def run(in_dir, out_dir, options: Options = Options(), *, env=None, say=None) -> Summary:
    """Purify every image under ``in_dir`` into ``out_dir``; see the module docstring for the rules.

    Raises PurifyError for problems with the whole run; per-file problems are recorded as failed
    and reported through ``say`` (default: one line on stderr).
    """
    start = time.perf_counter()
    r = _start(in_dir, out_dir, options, env, say)
    with _sigterm_as_exit(), r.outputs:
        for rel, (out_rel, clash) in r.mine:
            t0 = time.perf_counter()
            todo = _plan(r, rel, out_rel, clash)
            item = _load(r, todo, t0) if todo else None
            if item:
                r.batches.add(item)
        r.batches.flush_all()
        r.outputs.collect(0)
    _tally(r.summary, r.manifest.compact())
    r.summary.seconds = time.perf_counter() - start
    return r.summary


def _start(in_dir, out_dir, options: Options, env, say) -> _Run:
    """Check the options and folders, list this rank's files, open the manifest, remove stale temporaries."""
    if options.batch_size < 1:
        raise PurifyError("--batch-size must be >= 1")
    if options.max_pixels < 1:
        raise PurifyError("--max-pixels must be >= 1")
    src, dst = check_folders(in_dir, out_dir)
    rank, world = shard_from_env(env)
    device = resolve_device(options.device, env)
    models = Models(options, device)  # checks the options; loads nothing yet
    labels_path = Path(options.labels).expanduser() if options.labels else src / LABELS_FILE
    if options.labels and not labels_path.is_file():
        raise PurifyError(f"labels file {labels_path} does not exist")
    labels_path = labels_path if labels_path.is_file() else None
    labels = read_labels(labels_path) if labels_path else {}
    files, ignored = list_files(src, exclude=dst, not_counted=labels_path)
    names = output_names(files, options.fmt, options.save_masks)
    mine = list(zip(files, names))[rank::world]
    print_line = say or (lambda msg: tqdm.write(f"pssr purify: {msg}", file=sys.stderr))

    def say(msg):
        print_line(printable(msg))

    unknown = sorted(set(labels) - set(files))
    if unknown:
        say(f"{len(unknown)} rows of {labels_path} name no image under {src} (e.g. {unknown[0]}); not used")
    manifest_path = dst / ("manifest.jsonl" if world == 1 else f"manifest-rank{rank}.jsonl")
    try:
        dst.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(manifest_path)
    except OSError as exc:
        raise PurifyError(f"cannot write the manifest {manifest_path}: {_one_line(first_line(exc))}") from None
    ours = [name for _, (out, _) in mine if out for name in (out, *view_names(out))]
    _remove_stale_temps(dst, ours + [manifest_path.name])
    summary = Summary(ignored=ignored, output=dst, manifest=manifest_path, rank=rank, world=world,
                      labels=labels_path)
    show = not options.quiet and sys.stderr.isatty()
    bar = tqdm(total=len(mine), disable=not show, file=sys.stderr, unit="img", dynamic_ncols=True)
    outputs = _Outputs(manifest, summary, say, max(2 * options.batch_size, 16), bar)
    r = _Run(src, dst, options, device, models, mine, manifest, summary, say, outputs, labels=labels)
    r.batches = _Batches(options.batch_size, lambda key, items: _purify_batch(r, key, items))
    return r


def _plan(r: _Run, rel: str, out_rel: str | None, clash: str | None) -> _Todo | None:
    """What to do with one input: None when it is already recorded (a name clash, an output that is a
    folder, or every file already written), else its record and the files still to write."""
    rec = _record(rel)
    if clash:
        r.outputs.fail(rec, clash)
        return None
    out_path = r.dst / out_rel
    rec["output"] = out_rel
    targets = [out_path]
    if r.options.save_masks:
        rec["mask"], rec["strip"] = view_names(out_rel)
        targets += [r.dst / rec["mask"], r.dst / rec["strip"]]
    folder = next((p for p in targets if p.is_dir()), None)
    if folder:
        r.outputs.fail(rec, f"output {folder.relative_to(r.dst).as_posix()} is a folder")
        return None
    todo = targets if r.options.overwrite else [p for p in targets if not p.exists()]
    if not todo:
        rec["status"], rec["error"] = "skipped", "exists"
        r.outputs.record(rec)
        return None
    return _Todo(rec, out_path, todo)


def _load(r: _Run, todo: _Todo, t0: float) -> _Item | None:
    """Decode one input, pick and load its model, convert it (timed into ``decode``, model loading
    excepted); None when it failed (recorded)."""
    rec = todo.record
    try:
        decoded = decode(r.src / rec["path"], r.options.max_pixels)
    except ImageError as exc:
        r.times["decode"] += time.perf_counter() - t0
        r.outputs.fail(rec, str(exc))
        return None
    key = r.models.key_for(decoded)
    t_load = time.perf_counter()
    try:
        model = r.models.get(key)
    except ModelUnavailable as exc:
        rec["model"], rec["output"] = key, None
        rec["status"], rec["error"] = "failed", f"model {key} unavailable: {exc}"
        if key not in r.unavailable_said:
            r.unavailable_said.add(key)
            r.say(f"the {key} model is unavailable, so its images fail: {exc}")
        r.outputs.record(rec)
        return None
    t_loaded = time.perf_counter()
    array, more = prepare(decoded, model.channels, model.size)
    rec["model"] = model.label
    rec["conversions"] = decoded.conversions + more
    rec["label"] = _label(r, rec["path"], model)
    seconds = (time.perf_counter() - t0) - (t_loaded - t_load)
    r.times["decode"] += seconds
    return _Item(key, rec, array, todo.out_path, todo.todo, seconds)


def _label(r: _Run, rel: str, model: Model) -> str | None:
    """The file's true class, where known: its row in the labels file, else the name of its folder
    when that is one of the model's classes (MNIST: 0..9; CIFAR-10: airplane, automobile, ...).
    A labels-file label that is not one of the model's classes is said once and not used."""
    given = r.labels.get(rel)
    if given is None:
        folder = Path(rel).parent.name
        return folder if folder and folder in model.names else None
    if given in model.names:
        return given
    if (given, model.label) not in r.bad_labels_said:
        r.bad_labels_said.add((given, model.label))
        shown = ", ".join(model.names[:10]) + (", ..." if len(model.names) > 10 else "")
        r.say(f"label {given!r} (of {rel}) is not a class of the {model.label} model ({shown}); "
              "not counted")
    return None


def _tally(summary: Summary, records: list[dict]) -> None:
    """What purification did, over the ok records of the compacted manifest: predictions changed, and
    accuracy before and after on the labelled ones (a label is a class name, or an index as text)."""
    def said(rec, when):
        name = rec.get(f"class_{when}")
        return name if name is not None else str(rec.get(f"pred_{when}"))

    for rec in records:
        if rec.get("status") != "ok" or rec.get("pred_before") is None:
            continue
        summary.purified += 1
        summary.changed += rec["pred_before"] != rec["pred_after"]
        if rec.get("label") is not None:
            summary.labelled += 1
            summary.correct_before += said(rec, "before") == rec["label"]
            summary.correct_after += said(rec, "after") == rec["label"]


def _purify_batch(r: _Run, key: str, items: list[_Item]) -> None:
    """Purify a batch of one model's images, encode the outputs (and views), fill in the records and
    hand the files to the writers."""
    if not items:
        return
    model, times = r.models.loaded[key], r.times
    t0 = time.perf_counter()
    x = torch.from_numpy(np.stack([it.array for it in items])).to(r.device)
    times["decode"] += time.perf_counter() - t0
    t_model = time.perf_counter()
    try:
        out = model.run(x, times, sync=r.options.profile)
    except RuntimeError as exc:  # e.g. out of memory: the whole run's problem, not one file's
        raise PurifyError(f"purifying a batch of {len(items)} images with the {model.label} model failed: "
                          f"{_one_line(first_line(exc))} (try a smaller --batch-size)") from None
    share = (time.perf_counter() - t_model) / len(items)
    classes = tuple(getattr(model.cspec, "classes", ()) or ())
    for i, it in enumerate(items):
        rec = it.record
        pb, pa = out["pred_before"][i], out["pred_after"][i]
        rec.update(
            removed_fraction=_finite(out["removed_fraction"][i]), pred_before=pb, pred_after=pa,
            prob_before=_finite(out["prob_before"][i]), prob_after=_finite(out["prob_after"][i]),
            class_before=classes[pb] if pb < len(classes) else None,
            class_after=classes[pa] if pa < len(classes) else None,
        )
        t_enc = time.perf_counter()
        blobs = [(it.out_path, encode(out["x_hat"][i], it.out_path.suffix))]
        if r.options.save_masks:  # before the output, whose presence then means "done"
            views = encode_views(torch.from_numpy(it.array), out["x_hat"][i], out["mask"][i], strip_captions(rec))
            blobs[:0] = zip((r.dst / rec["mask"], r.dst / rec["strip"]), views)
        dt = time.perf_counter() - t_enc
        times["encode"] += dt
        rec["seconds"] = it.seconds + share + dt
        r.outputs.submit(rec, [(path, data) for path, data in blobs if path in it.todo])
    r.outputs.collect(r.outputs.max_inflight)


def format_profile(summary: Summary) -> str:
    """The per-stage time breakdown of a run (``--profile``)."""
    total = summary.seconds
    n = max(summary.ok, 1)
    lines = [f"profile: {summary.ok} images purified in {total:.3f} s = {summary.images_per_second:.1f} images/s"
             + (f" (rank {summary.rank} of {summary.world})" if summary.world > 1 else "")]
    staged = 0.0
    for stage in STAGES:
        t = summary.times[stage]
        staged += t
        lines.append(f"  {stage:<13}{t:9.3f} s {100 * t / total if total else 0:6.1f}% {1000 * t / n:9.3f} ms/image")
    other = max(total - staged, 0.0)
    lines.append(f"  {'other':<13}{other:9.3f} s {100 * other / total if total else 0:6.1f}%"
                 "   (listing, model loading, manifest, waiting for writes)")
    w = summary.times["write"]
    lines.append(f"  {'write':<13}{w:9.3f} s {'':7} {1000 * w / n:9.3f} ms/image"
                 f"   (file, fsync and rename in {WRITERS} background threads, overlapping the stages above)")
    return "\n".join(lines)
