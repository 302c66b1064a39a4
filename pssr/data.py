"""Data-set loaders: MNIST, CIFAR-10 and CIFAR-100 in their official formats, and image folders.

A data-set name is ``mnist``, ``cifar10``, ``cifar100`` or ``folder:PATH``: an image folder with
``train/`` and ``test/`` sub-folders, one sub-folder per class in each (the classes are the
sorted sub-folder names of ``train/``). PATH is relative to the data root, like every other
data set, or absolute.

Everything is read from local files (never downloaded) into one uint8 tensor, because the data sets
are small (≤ 150 MB) and every pipeline wants random access, seeded subsets and whole batches.
Files are parsed with numpy ``frombuffer`` and checked (magic numbers, sizes, label ranges) so that
a truncated or wrong file fails loudly with a one-line :class:`DataError` instead of training on
garbage. CIFAR's python pickles go through a restricted unpickler: the project never runs code
from a data file.
"""

from __future__ import annotations

import codecs
import gzip
import io
import lzma
import operator
import os
import pickle
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASETS", "DataError", "ImageDataset", "dataset_key", "load_dataset", "load_image_folder", "short_name"]

DATASETS: tuple[str, ...] = ("mnist", "cifar10", "cifar100")
FOLDER = "folder:"  # prefix of an image-folder data set: folder:PATH
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The fine label names of the official `meta` file (alphabetical), for copies that lack it.
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

CIFAR_PIXELS = 3 * 32 * 32


class DataError(Exception):
    """A missing/corrupt data set; the message is one line naming the expected files and the root searched."""


def _one_line(e: BaseException | str) -> str:
    """Library messages may span lines; ours must not (they end up in CLI errors and logs)."""
    return " ".join(str(e).split())


# --------------------------------------------------------------------------------------------
# The data set


@dataclass(eq=False, repr=False)
class ImageDataset(torch.utils.data.Dataset):
    """A whole labelled image set in memory as uint8, handed out as float images in [0, 1].

    uint8 keeps 60k CIFAR images at 184 MB instead of 737 MB; models take floats in [0, 1]
    (DESIGN.md §9: normalisation is the classifier's first layer), so items are converted here.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self):
        """Check the invariants once, so every consumer can rely on them."""
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        labels = torch.as_tensor(self.labels)
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError("labels must be a 1-D integer tensor")
        if len(labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(labels)} labels")
        self.classes = tuple(str(c) for c in self.classes)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)})")
        self.images = self.images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        i = operator.index(i)
        return self.images[i].to(torch.float32).div_(255), int(self.labels[i])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, n: int | None, seed: int | None = None) -> ImageDataset:
        """The first ``n`` images, or with ``seed`` a reproducible random ``n`` without replacement.

        Evaluations run on "the first 1000 test images" (as papers do) or on a seeded sample; the
        sampled indices are kept in data-set order so that the same seed names the same images
        in the same order. ``n=None`` or ``n >= len(self)`` returns ``self``.
        """
        if n is None or n >= len(self):
            return self
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        if seed is None:
            index = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(seed)
            index = torch.randperm(len(self), generator=g)[:n].sort().values
        return ImageDataset(self.name, self.images[index], self.labels[index], self.classes)


# --------------------------------------------------------------------------------------------
# Reading files


def _read_bytes(path: Path) -> bytes:
    """A file's content, decompressed by its suffix (.gz, .xz); bad streams become DataError."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            return gzip.decompress(raw)
        if path.suffix == ".xz":
            return lzma.decompress(raw)
        return raw
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise DataError(f"cannot read {path}: {_one_line(e)}") from e


def _read_all(paths: list[Path]) -> list[bytes]:
    """Read and decompress several files at once: zlib and liblzma release the GIL, so the
    five 21 MB CIFAR-10 .xz batches decompress on all cores."""
    if len(paths) < 2:
        return [_read_bytes(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(_read_bytes, paths))


def _parse_idx(data: bytes, path: Path, ndim: int) -> np.ndarray:
    """An IDX uint8 array (LeCun's MNIST format), checking magic, rank and exact size."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim:
        magic = data[:4].hex() if len(data) >= 4 else "a truncated header"
        raise DataError(
            f"{path} is not an IDX uint8 file of rank {ndim}: expected magic 0x0000080{ndim}, found {magic}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    dims = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "corrupt (trailing bytes)"
        raise DataError(f"{path} is {what}: header says {dims} = {expected} bytes, file has {len(data)}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _parse_cifar_bin(data: bytes, path: Path, label_bytes: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of label byte(s) + 3072 pixels (R, G, B planes, row-major); the last label byte is
    the one used (CIFAR-100: coarse, fine). Returns an (N, 3073|3074) view and the labels."""
    record = label_bytes + CIFAR_PIXELS
    if len(data) == 0 or len(data) % record:
        raise DataError(
            f"{path} is truncated or not a CIFAR binary file: "
            f"{len(data)} bytes is not a multiple of the {record}-byte record"
        )
    rec = np.frombuffer(data, np.uint8).reshape(-1, record)
    labels = rec[:, label_bytes - 1]
    if label_bytes == 2 and int(rec[:, 0].max()) >= 20:
        raise DataError(f"{path} is corrupt: coarse label {int(rec[:, 0].max())} >= 20")
    if int(labels.max()) >= num_classes:
        raise DataError(f"{path} is corrupt: label {int(labels.max())} >= {num_classes} classes")
    return rec, labels


def _read_names(path: Path, count: int) -> tuple[str, ...]:
    """Class names, one a line (batches.meta.txt, classes.txt, fine_label_names.txt)."""
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read class names from {path}: {_one_line(e)}") from e
    if len(names) != count:
        raise DataError(f"{path} lists {len(names)} class names, expected {count}")
    return names


# --------------------------------------------------------------------------------------------
# Restricted unpickling (CIFAR python version)


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled numpy array (py2 or py3, protocol 2-5) needs. numpy 1.x pickles
    name ``numpy.core``, numpy 2 pickles ``numpy._core``; both map to the objects in this numpy."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain dict/list/bytes/str/int only: a pickle can name any
    callable (os.system, eval) and pickle.load would call it, so every other global is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the official files are Python 2 pickles
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} in {self._path}: "
                "only numpy arrays and plain containers are allowed"
            ) from None

    def persistent_load(self, pid):
        raise DataError(f"refusing to unpickle a persistent id in {self._path}")


def _load_pickle(path: Path, data: bytes | None = None) -> dict:
    """A CIFAR python-version file as a dict with str keys, through the restricted unpickler."""
    data = _read_bytes(path) if data is None else data
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as e:  # a corrupt pickle can raise almost anything; none of it is code we run
        raise DataError(f"cannot unpickle {path}: {type(e).__name__}: {_one_line(e)}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python batch: it holds a {type(obj).__name__}, not a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _pickle_field(batch: dict, key: str, path: Path):
    if key not in batch:
        raise DataError(f"{path} is not a CIFAR python batch: no '{key}' entry")
    return batch[key]


def _parse_cifar_pickle(batch: dict, path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3072) uint8 pixels and (N,) labels from one unpickled batch, checked."""
    data = _pickle_field(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path} is corrupt: 'data' must be a uint8 (N, {CIFAR_PIXELS}) array, found {desc}")
    try:
        labels = np.asarray(_pickle_field(batch, label_key, path))
    except (ValueError, TypeError) as e:
        raise DataError(f"{path} is corrupt: bad '{label_key}': {_one_line(e)}") from e
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        found = f"{labels.dtype} {labels.shape}"
        raise DataError(f"{path} is corrupt: '{label_key}' must be {len(data)} integers, found {found}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"{path} is corrupt: labels outside [0, {num_classes})")
    return data, labels


def _pickle_names(path: Path, key: str, count: int) -> tuple[str, ...]:
    """Class names from a python-version meta file (bytes under Python 2, str otherwise)."""
    names = _pickle_field(_load_pickle(path), key, path)
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path} is corrupt: '{key}' must be a list of {count} names")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


# --------------------------------------------------------------------------------------------
# Locating files under a root


@dataclass(frozen=True)
class _Format:
    """One on-disk layout of a data set: the files of each split and their allowed suffixes."""

    kind: str  # "idx", "cifar-bin" or "cifar-pickle"
    files: dict  # split -> base file names, in load order
    suffixes: tuple[str, ...]  # "" first: an uncompressed copy loads fastest

    def pattern(self, base: str) -> str:
        """How error messages name a file: ``data_batch_1.bin[.xz]``."""
        compressed = "|".join(s for s in self.suffixes if s)
        return f"{base}[{compressed}]" if compressed else base

    def describe(self, split: str) -> str:
        names = [self.pattern(b) for b in self.files[split]]
        text = " .. ".join((names[0], names[-1])) if len(names) > 2 else " and ".join(names)
        return text + (" (python version)" if self.kind == "cifar-pickle" else "")


def _batches(ext: str) -> dict:
    return {"train": tuple(f"data_batch_{i}{ext}" for i in range(1, 6)), "test": (f"test_batch{ext}",)}


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FORMATS = {
    "mnist": (_Format("idx", _MNIST_FILES, ("", ".gz")),),
    "cifar10": (
        _Format("cifar-bin", _batches(".bin"), ("", ".xz")),
        _Format("cifar-pickle", _batches(""), ("",)),
    ),
    "cifar100": (
        _Format("cifar-bin", {"train": ("train.bin",), "test": ("test.bin",)}, ("", ".xz")),
        _Format("cifar-pickle", {"train": ("train",), "test": ("test",)}, ("",)),
    ),
}
_SUBFOLDERS = {
    "mnist": ("mnist", "MNIST/raw"),
    "cifar10": ("cifar10", "cifar-10-batches-bin", "cifar-10-batches-py",
                "cifar10/cifar-10-batches-bin", "cifar10/cifar-10-batches-py"),
    "cifar100": ("cifar100", "cifar-100-binary", "cifar-100-python",
                 "cifar100/cifar-100-binary", "cifar100/cifar-100-python"),
}  # fmt: skip


def _find_file(folder: Path, base: str, suffixes: tuple[str, ...]) -> Path | None:
    """The first existing ``base + suffix``."""
    for suffix in suffixes:
        p = folder / (base + suffix)
        if p.is_file():
            return p
    return None


def _locate(name: str, root: Path, split: str) -> tuple[_Format, list[Path]]:
    """The format and files of ``split``, from root or its conventional sub-folders.

    The first folder holding every file of a format wins; a folder holding only some of them is
    reported by name, because "missing data_batch_3.bin in X" is what the user needs to hear.
    """
    folders = [root] + [root / sub for sub in _SUBFOLDERS[name]]
    partial = None
    for folder in folders:
        if not folder.is_dir():
            continue
        for fmt in _FORMATS[name]:
            found = [_find_file(folder, base, fmt.suffixes) for base in fmt.files[split]]
            if all(found):
                return fmt, found
            if any(found) and partial is None:
                missing = ", ".join(fmt.pattern(b) for b, f in zip(fmt.files[split], found) if f is None)
                partial = f"{name} {split} split incomplete in {folder}: missing {missing}"
    if partial:
        raise DataError(partial)
    expected = " or ".join(fmt.describe(split) for fmt in _FORMATS[name])
    raise DataError(f"{name} {split} split not found: expected {expected} in {', '.join(map(str, folders))}")


# --------------------------------------------------------------------------------------------
# The three data sets


def _load_mnist(paths: list[Path]) -> ImageDataset:
    images_data, labels_data = _read_all(paths)
    images = _parse_idx(images_data, paths[0], 3)
    labels = _parse_idx(labels_data, paths[1], 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{paths[0]} holds {images.shape[1]}x{images.shape[2]} images; MNIST images are 28x28")
    if len(images) != len(labels):
        raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= 10:
        raise DataError(f"{paths[1]} is corrupt: label {int(labels.max())} >= 10 classes")
    return _dataset("mnist", images[:, None].copy(), labels, MNIST_CLASSES)


def _load_cifar(name: str, fmt: _Format, paths: list[Path]) -> ImageDataset:
    num_classes = 10 if name == "cifar10" else 100
    folder = paths[0].parent
    if fmt.kind == "cifar-bin":
        label_bytes = 1 if name == "cifar10" else 2
        parts = [_parse_cifar_bin(d, p, label_bytes, num_classes) for d, p in zip(_read_all(paths), paths)]
        pixels = [rec[:, label_bytes:] for rec, _ in parts]
    else:
        label_key = "labels" if name == "cifar10" else "fine_labels"
        batches = [_load_pickle(p, d) for d, p in zip(_read_all(paths), paths)]
        parts = [_parse_cifar_pickle(b, p, label_key, num_classes) for b, p in zip(batches, paths)]
        pixels = [data for data, _ in parts]
    images = np.concatenate(pixels).reshape(-1, 3, 32, 32)  # one copy: contiguous and writable
    labels = np.concatenate([lab for _, lab in parts])
    return _dataset(name, images, labels, _cifar_classes(name, fmt, folder))


def _cifar_classes(name: str, fmt: _Format, folder: Path) -> tuple[str, ...]:
    """Names from the copy's own meta file when it has one, else the official names."""
    if name == "cifar10":
        if fmt.kind == "cifar-pickle" and (folder / "batches.meta").is_file():
            return _pickle_names(folder / "batches.meta", "label_names", 10)
        for txt in ("batches.meta.txt", "classes.txt"):
            if (folder / txt).is_file():
                return _read_names(folder / txt, 10)
        return CIFAR10_CLASSES
    if fmt.kind == "cifar-pickle" and (folder / "meta").is_file():
        return _pickle_names(folder / "meta", "fine_label_names", 100)
    if (folder / "fine_label_names.txt").is_file():
        return _read_names(folder / "fine_label_names.txt", 100)
    return CIFAR100_CLASSES


def _dataset(name: str, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> ImageDataset:
    """Wrap numpy arrays without another copy (``images`` must be a fresh writable array)."""
    return ImageDataset(name, torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), classes)


def dataset_key(name: str) -> str:
    """A data-set name as stored and compared: built-in names lower-cased, a folder's PATH as written."""
    if isinstance(name, str) and name[: len(FOLDER)].lower() == FOLDER:
        return FOLDER + name[len(FOLDER) :]
    return name.lower() if isinstance(name, str) else name


def short_name(name: str) -> str:
    """A name fit for a run folder: ``mnist``, or the folder's own name for ``folder:PATH``."""
    key = dataset_key(name)
    if isinstance(key, str) and key.startswith(FOLDER):
        return Path(key[len(FOLDER) :]).expanduser().name or "folder"
    return key


def folder_path(name: str, root) -> Path:
    """Where ``folder:PATH`` lives: PATH itself if absolute, else PATH under the data root."""
    path = Path(dataset_key(name)[len(FOLDER) :]).expanduser()
    if not str(path) or str(path) == ".":
        raise DataError(f"{name!r}: name the image folder, e.g. folder:my-images (relative to the data root)")
    if path.is_absolute():
        return path
    if root is None:
        raise DataError(f"{name}: a relative image folder needs a data root (--data-root or $PSSR_DATA_ROOT)")
    return Path(root).expanduser() / path


def load_dataset(name: str, root, split: str = "test") -> ImageDataset:
    """Load ``split`` ("train" or "test") of mnist, cifar10, cifar100 or ``folder:PATH`` from ``root``.

    Looks in ``root`` and its conventional sub-folders (mnist: mnist/, MNIST/raw/; cifar10:
    cifar10/, cifar-10-batches-bin/, cifar-10-batches-py/; cifar100: cifar100/,
    cifar-100-binary/, cifar-100-python/), so both the data root and the data set's own folder
    work. ``folder:PATH`` reads ``PATH/<split>/<class>/<image>`` (PATH under ``root`` unless
    absolute) with :func:`load_image_folder`, the classes being ``PATH/train``'s sub-folders, so
    both splits number them alike; the data set is named ``folder:PATH`` as given. Raises
    DataError (one line) for an unknown name or split, or a missing or corrupt file.
    """
    key = dataset_key(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {key}: choose 'train' or 'test'")
    if isinstance(key, str) and key.startswith(FOLDER):
        return _load_folder_split(key, root, split)
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}: choose from {', '.join(DATASETS)}, "
                        "or folder:PATH (an image folder)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder (looking for {key} {split})")
    fmt, paths = _locate(key, root, split)
    if key == "mnist":
        return _load_mnist(paths)
    return _load_cifar(key, fmt, paths)


def _load_folder_split(key: str, root, split: str) -> ImageDataset:
    """One split of a ``folder:PATH`` data set, numbered by the train split's classes."""
    base = folder_path(key, root)
    layout = f"{base}/train/<class>/<image> and {base}/test/<class>/<image>"
    if not base.is_dir():
        raise DataError(f"{key}: image folder {base} is not a folder (expected {layout})")
    if not (base / split).is_dir():
        raise DataError(f"{key}: no {split}/ sub-folder in {base} (expected {layout})")
    classes = _class_folders(base / "train") if (base / "train").is_dir() else None
    data = load_image_folder(base / split, classes=classes)
    return ImageDataset(key, data.images, data.labels, data.classes)


# --------------------------------------------------------------------------------------------
# Image folders

_EXTS = "|".join(e[1:] for e in IMAGE_EXTENSIONS)
_GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _pil():
    """Pillow is imported on first use: only image folders need it."""
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError("loading image folders needs Pillow: pip install pillow") from e
    return Image


def _decode(path: Path):
    """Open and fully decode one image (first frame); any failure names the file."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy() if getattr(img, "n_frames", 1) > 1 else img
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {_one_line(e)}") from e


def _to_array(img, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """Convert to L or RGB (transparency composited on white), resize to (H, W); (H, W[, 3]) uint8.

    Compositing on white (rather than dropping alpha) gives every file a defined background:
    pixels under full transparency are often black or arbitrary, and viewers show white.
    """
    Image = _pil()
    if img.mode.startswith("I;16"):  # 16-bit grey: scale, since PIL's convert("L") clips at 255
        a = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _image_files(folder: Path) -> list[Path]:
    """Image files under a class folder, recursively, in a stable (sorted) order; hidden ones skipped."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = [f for f in sorted(filenames) if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        files += [Path(dirpath) / f for f in names]
    return files


def _class_folders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_image_folder(path, *, size: tuple[int, int] | None = None, channels: int | None = None,
                      classes=None) -> ImageDataset:
    """Load ``path/<class>/<image>`` files: sorted sub-folder names are the classes.

    Images (.png .jpg .jpeg .bmp .webp, any case) are decoded with Pillow, converted to
    ``channels`` (1 = greyscale L, 3 = RGB; default 3 if any image is colour, else 1; alpha is
    composited on white) and resized to ``size`` = (H, W) with bilinear filtering. Without
    ``size`` all images must already have the same size. Files directly in ``path`` and other
    file types are ignored; an empty class folder is kept as a class (so label numbers follow
    the folder names) as long as some image exists. ``classes`` fixes the class names and their
    order instead (a test split numbered like its train split): a listed class without a
    sub-folder is an empty class, a sub-folder not listed is an error.
    """
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    if size is not None:
        if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
            raise DataError(f"size must be (H, W) with positive integers, got {size!r}")
        size = (int(size[0]), int(size[1]))
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a folder")
    found = _class_folders(root)
    if classes is None:
        classes = found
    else:
        classes = [str(c) for c in classes]
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"image folder {root}: class sub-folder(s) {', '.join(extra)} not among the "
                            f"{len(classes)} classes {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}")
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders: expected {root}/<class>/<image>.{{{_EXTS}}}")
    files = [(f, label) for label, c in enumerate(classes) if (root / c).is_dir() for f in _image_files(root / c)]
    if not files:
        kinds = " ".join(IMAGE_EXTENSIONS)
        raise DataError(f"image folder {root} has no images ({kinds}) in its class sub-folders {', '.join(classes)}")
    decoded = [_decode(f) for f, _ in files]
    if size is None:
        first = decoded[0].size
        for (f, _), img in zip(files, decoded):
            if img.size != first:
                (w0, h0), (w1, h1) = first, img.size
                raise DataError(
                    f"images differ in size: {files[0][0]} is {h0}x{w0} (HxW), {f} is {h1}x{w1}; "
                    "pass size=(H, W) to resize"
                )
    if channels is None:
        channels = 3 if any(img.mode not in _GREY_MODES for img in decoded) else 1
    arrays = [_to_array(img, channels, size) for img in decoded]
    images = np.stack(arrays)
    images = images[:, None] if channels == 1 else images.transpose(0, 3, 1, 2)
    name = root.name or root.resolve().name
    labels = np.array([label for _, label in files], dtype=np.int64)
    return _dataset(name, np.ascontiguousarray(images), labels, tuple(classes))
