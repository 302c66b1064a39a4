"""Tests for pssr.data: the real MNIST / CIFAR-10 copies in ../shared/data, and small synthetic
files written here in the official formats (IDX, CIFAR binary, CIFAR python pickles, CIFAR-100)."""

from __future__ import annotations

import gzip
import lzma
import os
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pssr.data import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DATASETS,
    DataError,
    ImageDataset,
    load_dataset,
    load_image_folder,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"real MNIST not found in {DATA / 'mnist'}")
needs_cifar10 = pytest.mark.skipif(
    not (DATA / "cifar10").is_dir(), reason=f"real CIFAR-10 not found in {DATA / 'cifar10'}"
)


# --------------------------------------------------------------------------------------------
# Real data (each split loaded once per module: CIFAR-10 train is 5 x 21 MB of xz)


@pytest.fixture(scope="module")
def mnist_train():
    return load_dataset("mnist", DATA, "train")


@pytest.fixture(scope="module")
def mnist_test():
    return load_dataset("mnist", DATA, "test")


@pytest.fixture(scope="module")
def cifar_train():
    return load_dataset("cifar10", DATA, "train")


@pytest.fixture(scope="module")
def cifar_test():
    return load_dataset("cifar10", DATA, "test")


def _gunzip(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


def _unxz_head(path: Path, n: int) -> bytes:
    """The first n decompressed bytes only: enough for a record or two, without the 1.3 s full decode."""
    return lzma.LZMADecompressor().decompress(path.read_bytes(), max_length=n)


@needs_mnist
def test_mnist_real_shapes_and_counts(mnist_train, mnist_test):
    for ds, n in ((mnist_train, 60000), (mnist_test, 10000)):
        assert ds.name == "mnist" and len(ds) == n
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
        assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
        assert ds.image_shape == (1, 28, 28) and ds.num_classes == 10
        assert ds.classes == tuple(str(d) for d in range(10))
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
    # The usual normalisation constant: a check that pixels are where they should be.
    assert abs(mnist_train.images.float().mean().item() / 255 - 0.1307) < 1e-3


@needs_mnist
def test_mnist_real_matches_raw_bytes(mnist_train, mnist_test):
    for ds, prefix in ((mnist_train, "train"), (mnist_test, "t10k")):
        labels = _gunzip(DATA / "mnist" / f"{prefix}-labels-idx1-ubyte.gz")
        images = _gunzip(DATA / "mnist" / f"{prefix}-images-idx3-ubyte.gz")
        assert torch.equal(ds.labels, torch.tensor(list(labels[8:]), dtype=torch.int64))
        for i in (0, len(ds) - 1):
            raw = np.frombuffer(images, np.uint8, count=784, offset=16 + 784 * i).reshape(1, 28, 28)
            assert torch.equal(ds.images[i], torch.from_numpy(raw.copy()))
    # The first test digit is a 7 (first label byte after the 8-byte header).
    assert _gunzip(DATA / "mnist" / "t10k-labels-idx1-ubyte.gz")[8] == 7
    image, label = mnist_test[0]
    assert label == 7 and image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert 0.0 <= image.min() and image.max() <= 1.0


@needs_mnist
def test_mnist_both_root_forms(mnist_test):
    other = load_dataset("mnist", DATA / "mnist", "test")
    assert torch.equal(other.images, mnist_test.images) and torch.equal(other.labels, mnist_test.labels)


@needs_cifar10
def test_cifar10_real_train(cifar_train):
    ds = cifar_train
    assert ds.name == "cifar10" and len(ds) == 50000
    assert ds.images.shape == (50000, 3, 32, 32) and ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert ds.labels.dtype == torch.int64 and torch.equal(torch.bincount(ds.labels), torch.full((10,), 5000))
    # Per-channel means (R > G > B): a check on the plane order.
    mean = ds.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-3)
    for batch in (1, 5):  # the first record of data_batch_1 and of data_batch_5 (index 40000)
        raw = _unxz_head(DATA / "cifar10" / f"data_batch_{batch}.bin.xz", 3073)
        i = (batch - 1) * 10000
        assert int(ds.labels[i]) == raw[0]
        assert torch.equal(ds.images[i], torch.frombuffer(bytearray(raw[1:]), dtype=torch.uint8).reshape(3, 32, 32))


@needs_cifar10
def test_cifar10_real_test(cifar_test):
    ds = cifar_test
    assert len(ds) == 10000 and ds.image_shape == (3, 32, 32) and ds.num_classes == 10
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 1000))
    names = (DATA / "cifar10" / "classes.txt").read_text().split()
    assert ds.classes == tuple(names) == CIFAR10_CLASSES
    raw = _unxz_head(DATA / "cifar10" / "test_batch.bin.xz", 2 * 3073)
    assert raw[0] == 3 and names[3] == "cat"  # the first test image is a cat, read from the bytes
    image, label = ds[0]
    assert label == 3 and ds.classes[label] == "cat"
    expected = torch.frombuffer(bytearray(raw[1:3073]), dtype=torch.uint8).reshape(3, 32, 32).float() / 255
    assert torch.equal(image, expected)
    assert int(ds.labels[1]) == raw[3073]


@needs_cifar10
def test_cifar10_both_root_forms(cifar_test):
    other = load_dataset("cifar10", DATA / "cifar10")  # split defaults to "test"
    assert torch.equal(other.images, cifar_test.images) and torch.equal(other.labels, cifar_test.labels)


@needs_mnist
def test_wrong_dataset_in_root_names_expected_files():
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", DATA, "test")
    msg = str(e.value)
    assert "test.bin" in msg and str(DATA) in msg and "\n" not in msg


# --------------------------------------------------------------------------------------------
# Writers for the official formats


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train=7, n_test=5, gz=True, seed=0) -> dict:
    """Write the four IDX files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        out[split] = (x, y)
    return out


def cifar_records(x: np.ndarray, labels: list[np.ndarray]) -> bytes:
    """Label byte(s) then 3072 pixels (R, G, B planes) per image."""
    cols = [lab.astype(np.uint8)[:, None] for lab in labels] + [x.reshape(len(x), -1)]
    return np.concatenate(cols, axis=1).tobytes()


def write_cifar10_bin(folder: Path, n=4, xz=True, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"train": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        data = cifar_records(x, [y])
        if xz:
            (folder / (name + ".bin.xz")).write_bytes(lzma.compress(data))
        else:
            (folder / (name + ".bin")).write_bytes(data)
        if name == "test_batch":
            out["test"] = (x, y)
        else:
            out["train"].append((x, y))
    out["train"] = tuple(np.concatenate(p) for p in zip(*out["train"]))
    return out


def write_cifar100_bin(folder: Path, n=6, xz=False, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, 100, n, dtype=np.uint8)
        coarse = rng.integers(0, 20, n, dtype=np.uint8)
        data = cifar_records(x, [coarse, fine])
        if xz:
            (folder / f"{split}.bin.xz").write_bytes(lzma.compress(data))
        else:
            (folder / f"{split}.bin").write_bytes(data)
        out[split] = (x, fine)
    return out


def py2_pickle(obj) -> bytes:
    """Protocol-2 pickle as Python 2's cPickle wrote the official CIFAR python files: str keys and
    pixel data as 8-bit strings, arrays via numpy.core.multiarray._reconstruct (numpy 1.x names)."""

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def i(v: int) -> bytes:
        if 0 <= v < 256:
            return b"K" + bytes([v])
        if 0 <= v < 65536:
            return b"M" + struct.pack("<H", v)
        return b"J" + struct.pack("<i", v)

    def enc(o) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(enc(x) for x in o) + b"e"
        if isinstance(o, str):
            return s(o.encode())
        if isinstance(o, bytes):
            return s(o)
        if isinstance(o, (int, np.integer)):
            return i(int(o))
        assert isinstance(o, np.ndarray) and o.dtype == np.uint8
        shape = b"(" + b"".join(i(d) for d in o.shape) + b"t"
        dtype_state = b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"t"
        dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R" + dtype_state + b"b"
        head = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
        return head + b"(" + i(1) + shape + dtype + b"\x89" + s(o.tobytes()) + b"tb"

    return b"\x80\x02" + enc(obj) + b"."


def write_cifar10_py(folder: Path, n=3, seed=0, dumps=py2_pickle, meta=True) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": name.encode(), b"labels": y, b"data": x.reshape(n, -1), b"filenames": [b"f.png"] * n}
        (folder / name).write_bytes(dumps(batch))
        parts.append((x, np.array(y)))
    if meta:
        names = [f"c{k}".encode() for k in range(10)]
        meta_obj = {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}
        (folder / "batches.meta").write_bytes(dumps(meta_obj))
    return {"train": tuple(np.concatenate(p) for p in zip(*parts[:5])), "test": parts[5]}


def write_cifar100_py(folder: Path, n=4, seed=0, meta=True) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [int(v) for v in rng.integers(0, 20, n)]
        batch = {b"filenames": [b"f.png"] * n, b"batch_label": b"x", b"fine_labels": fine, b"coarse_labels": coarse}
        batch[b"data"] = x.reshape(n, -1)
        (folder / split).write_bytes(py2_pickle(batch))
        out[split] = (x, np.array(fine))
    if meta:
        meta_obj = {
            b"fine_label_names": [f"f{k}".encode() for k in range(100)],
            b"coarse_label_names": [f"g{k}".encode() for k in range(20)],
        }
        (folder / "meta").write_bytes(py2_pickle(meta_obj))
    return out


def assert_loaded(ds: ImageDataset, x: np.ndarray, y: np.ndarray):
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64 and ds.images.is_contiguous()
    assert torch.equal(ds.images, torch.from_numpy(x))
    assert torch.equal(ds.labels, torch.from_numpy(np.asarray(y, np.int64)))


# --------------------------------------------------------------------------------------------
# Synthetic files: formats and layouts


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("sub", ["", "mnist", "MNIST/raw"])
def test_mnist_idx_formats_and_layouts(tmp_path, gz, sub):
    written = write_mnist(tmp_path / sub, gz=gz)
    for split in ("train", "test"):
        x, y = written[split]
        ds = load_dataset("mnist", tmp_path, split)
        assert_loaded(ds, x[:, None], y)
        assert ds.classes == tuple("0123456789")


def test_mnist_prefers_uncompressed_when_both_exist(tmp_path):
    write_mnist(tmp_path, gz=True, seed=1)
    raw = write_mnist(tmp_path, gz=False, seed=2)
    assert_loaded(load_dataset("mnist", tmp_path, "test"), raw["test"][0][:, None], raw["test"][1])


@pytest.mark.parametrize("xz", [True, False], ids=["xz", "bin"])
@pytest.mark.parametrize("sub", ["", "cifar10", "cifar-10-batches-bin"])
def test_cifar10_binary(tmp_path, xz, sub):
    written = write_cifar10_bin(tmp_path / sub, xz=xz)
    for split in ("train", "test"):
        ds = load_dataset("cifar10", tmp_path, split)
        assert_loaded(ds, *written[split])
        assert ds.classes == CIFAR10_CLASSES and ds.image_shape == (3, 32, 32)
    assert len(load_dataset("cifar10", tmp_path, "train")) == 5 * 4


def test_cifar10_binary_plane_order(tmp_path):
    """Plane c of the record is channel c: R, G, B each 32x32 row-major."""
    x = np.zeros((1, 3, 32, 32), np.uint8)
    x[0, 0, 0, 1], x[0, 1, 2, 3], x[0, 2, 31, 30] = 10, 20, 30
    tmp_path.joinpath("test_batch.bin").write_bytes(cifar_records(x, [np.array([4])]))
    ds = load_dataset("cifar10", tmp_path)
    assert ds.images[0, 0, 0, 1] == 10 and ds.images[0, 1, 2, 3] == 20 and ds.images[0, 2, 31, 30] == 30
    assert int(ds.images.sum()) == 60 and ds[0][1] == 4


@pytest.mark.parametrize("names_file", ["batches.meta.txt", "classes.txt"])
def test_cifar10_class_names_file(tmp_path, names_file):
    write_cifar10_bin(tmp_path, xz=False)
    names = [f"name{k}" for k in range(10)]
    tmp_path.joinpath(names_file).write_text("\n".join(names) + "\n\n")  # the official file ends with blank lines
    assert load_dataset("cifar10", tmp_path).classes == tuple(names)


def test_cifar10_class_names_wrong_count(tmp_path):
    write_cifar10_bin(tmp_path, xz=False)
    tmp_path.joinpath("classes.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="classes.txt lists 2 class names, expected 10"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("sub", ["", "cifar10", "cifar-10-batches-py"])
def test_cifar10_python_py2_pickles(tmp_path, sub):
    written = write_cifar10_py(tmp_path / sub)
    for split in ("train", "test"):
        ds = load_dataset("cifar10", tmp_path, split)
        assert_loaded(ds, *written[split])
        assert ds.classes == tuple(f"c{k}" for k in range(10))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python_py3_pickles(tmp_path, protocol):
    """Copies re-pickled by Python 3 / numpy 2 (str keys, numpy._core names) load as well."""

    def dumps(batch):
        return pickle.dumps({k.decode(): v for k, v in batch.items()}, protocol=protocol)

    written = write_cifar10_py(tmp_path, dumps=dumps)
    ds = load_dataset("cifar10", tmp_path, "train")
    assert_loaded(ds, *written["train"])
    assert ds.classes == tuple(f"c{k}" for k in range(10))


def test_cifar10_python_without_meta_uses_official_names(tmp_path):
    write_cifar10_py(tmp_path, meta=False)
    assert load_dataset("cifar10", tmp_path).classes == CIFAR10_CLASSES


@pytest.mark.parametrize("xz", [True, False], ids=["xz", "bin"])
@pytest.mark.parametrize("sub", ["", "cifar100", "cifar-100-binary"])
def test_cifar100_binary_uses_fine_labels(tmp_path, xz, sub):
    written = write_cifar100_bin(tmp_path / sub, xz=xz)
    for split in ("train", "test"):
        ds = load_dataset("cifar100", tmp_path, split)
        assert_loaded(ds, *written[split])
        assert ds.name == "cifar100" and ds.num_classes == 100 and ds.classes == CIFAR100_CLASSES


def test_cifar100_binary_fine_label_names(tmp_path):
    write_cifar100_bin(tmp_path)
    names = [f"n{k:03d}" for k in range(100)]
    tmp_path.joinpath("fine_label_names.txt").write_text("\n".join(names))
    assert load_dataset("cifar100", tmp_path).classes == tuple(names)


def test_cifar100_official_names_fallback_is_sane():
    # The official fine_label_names are 100 distinct names in alphabetical order.
    assert len(set(CIFAR100_CLASSES)) == 100 and list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)


@pytest.mark.parametrize("sub", ["", "cifar100", "cifar-100-python"])
def test_cifar100_python(tmp_path, sub):
    written = write_cifar100_py(tmp_path / sub)
    for split in ("train", "test"):
        ds = load_dataset("cifar100", tmp_path, split)
        assert_loaded(ds, *written[split])
        assert ds.classes == tuple(f"f{k}" for k in range(100))


def test_binary_preferred_over_python_in_same_folder(tmp_path):
    binary = write_cifar10_bin(tmp_path, xz=False, seed=1)
    write_cifar10_py(tmp_path, seed=2, meta=False)
    assert_loaded(load_dataset("cifar10", tmp_path), *binary["test"])


# --------------------------------------------------------------------------------------------
# Missing and corrupt files


def test_missing_dataset_names_files_and_root(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path, "train")
    msg = str(e.value)
    assert "train-images-idx3-ubyte[.gz]" in msg and "train-labels-idx1-ubyte[.gz]" in msg
    assert str(tmp_path) in msg and str(tmp_path / "MNIST" / "raw") in msg and "\n" not in msg


def test_missing_one_file_is_named(tmp_path):
    write_cifar10_bin(tmp_path, xz=True)
    (tmp_path / "data_batch_3.bin.xz").unlink()
    with pytest.raises(DataError, match=r"missing data_batch_3\.bin\[\.xz\]") as e:
        load_dataset("cifar10", tmp_path, "train")
    assert str(tmp_path) in str(e.value)
    assert len(load_dataset("cifar10", tmp_path, "test")) == 4  # the other split is intact


def test_missing_labels_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path, "test")


def test_root_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_dataset("mnist", tmp_path / "nope")


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("mnist", tmp_path, "val")
    assert DATASETS == ("mnist", "cifar10", "cifar100")


def _mutate(path: Path, how: str):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif how == "garbage":
        path.write_bytes(b"this is not a compressed stream at all" * 10)
    elif how == "flip":  # corrupt the middle of a compressed stream
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :])
    elif how == "append":
        path.write_bytes(data + b"\x00")
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize(
    "gz, how, match",
    [
        (True, "truncate", "cannot read"),
        (True, "garbage", "cannot read"),
        (True, "flip", "cannot read"),
        (False, "truncate", "is truncated"),
        (False, "append", "trailing bytes"),
        (False, "empty", "not an IDX"),
    ],
)
def test_mnist_corrupt_file(tmp_path, gz, how, match):
    write_mnist(tmp_path, gz=gz)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    _mutate(tmp_path / name, how)
    with pytest.raises(DataError, match=match) as e:
        load_dataset("mnist", tmp_path, "test")
    assert name in str(e.value) and "\n" not in str(e.value)


def test_mnist_wrong_magic(tmp_path):
    write_mnist(tmp_path, gz=False)
    # Swap the files: the labels file where the images file should be.
    images, labels = tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte"
    data = labels.read_bytes()
    images.write_bytes(data)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is not an IDX uint8 file of rank 3.*00000801"):
        load_dataset("mnist", tmp_path, "test")
    images.write_bytes(bytes([0, 0, 0x0D, 3]) + b"\x00" * 12)  # float32 IDX: not ours
    with pytest.raises(DataError, match="not an IDX uint8"):
        load_dataset("mnist", tmp_path, "test")


def test_mnist_count_mismatch_and_bad_label(tmp_path):
    write_mnist(tmp_path, gz=False, n_test=5)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="has 5 images but .* has 4 labels"):
        load_dataset("mnist", tmp_path, "test")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 2, 3, 10], np.uint8)))
    with pytest.raises(DataError, match="label 10 >= 10"):
        load_dataset("mnist", tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((5, 32, 32), np.uint8)))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte holds 32x32 images; MNIST images are 28x28"):
        load_dataset("mnist", tmp_path, "test")


@pytest.mark.parametrize(
    "xz, how, match",
    [
        (True, "truncate", "cannot read"),
        (True, "garbage", "cannot read"),
        (True, "flip", "cannot read"),
        (False, "truncate", "not a multiple of the 3073-byte record"),
        (False, "append", "not a multiple"),
        (False, "empty", "not a multiple"),
    ],
)
def test_cifar10_corrupt_file(tmp_path, xz, how, match):
    write_cifar10_bin(tmp_path, xz=xz)
    name = "data_batch_2.bin" + (".xz" if xz else "")
    _mutate(tmp_path / name, how)
    with pytest.raises(DataError, match=match) as e:
        load_dataset("cifar10", tmp_path, "train")
    assert name in str(e.value) and "\n" not in str(e.value)


def test_cifar_label_out_of_range(tmp_path):
    x = np.zeros((2, 3, 32, 32), np.uint8)
    tmp_path.joinpath("test_batch.bin").write_bytes(cifar_records(x, [np.array([3, 10])]))
    with pytest.raises(DataError, match="test_batch.bin is corrupt: label 10 >= 10"):
        load_dataset("cifar10", tmp_path)
    # A CIFAR-10 file read as CIFAR-100 (1 label byte, not 2) fails the size check.
    tmp_path.joinpath("test.bin").write_bytes(cifar_records(x, [np.array([3, 4])]))
    with pytest.raises(DataError, match="3074-byte record"):
        load_dataset("cifar100", tmp_path)
    tmp_path.joinpath("test.bin").write_bytes(cifar_records(x, [np.array([1, 25]), np.array([3, 4])]))
    with pytest.raises(DataError, match="coarse label 25"):
        load_dataset("cifar100", tmp_path)


@pytest.mark.parametrize(
    "batch, match",
    [
        ("truncated", "cannot unpickle"),
        ({b"labels": [1]}, "no 'data' entry"),
        ({b"data": np.zeros((1, 3072), np.uint8)}, "no 'labels' entry"),
        ({b"data": np.zeros((1, 100), np.uint8), b"labels": [1]}, r"must be a uint8 \(N, 3072\) array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "must be 2 integers"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [12]}, r"labels outside \[0, 10\)"),
        ([1, 2, 3], "not a dict"),
    ],
)
def test_cifar_python_corrupt(tmp_path, batch, match):
    write_cifar10_py(tmp_path)
    path = tmp_path / "test_batch"
    if batch == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    else:
        path.write_bytes(py2_pickle(batch))
    with pytest.raises(DataError, match=match) as e:
        load_dataset("cifar10", tmp_path)
    assert "test_batch" in str(e.value)


class _Evil:
    """Unpickling this runs a shell command (touch MARKER) with a plain pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("target", ["test_batch", "batches.meta"])
def test_restricted_unpickler_refuses_os_system(tmp_path, target):
    write_cifar10_py(tmp_path)
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker)], b"label_names": [_Evil(marker)]}
    (tmp_path / target).write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system") as e:
        load_dataset("cifar10", tmp_path)
    assert target in str(e.value)
    assert not marker.exists(), "the malicious pickle was executed"


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_restricted_unpickler_refuses_eval(tmp_path, protocol):
    write_cifar100_py(tmp_path)
    (tmp_path / "test").write_bytes(pickle.dumps({"data": _EvalEvil()}, protocol=protocol))
    with pytest.raises(DataError, match=r"refusing to unpickle (builtins|__builtin__)\.eval"):
        load_dataset("cifar100", tmp_path)


# --------------------------------------------------------------------------------------------
# ImageDataset


def _toy(n=10, classes=3) -> ImageDataset:
    images = torch.arange(n * 2 * 2, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, 1, 2, 2)
    return ImageDataset("toy", images, torch.arange(n) % classes, tuple("abc"[:classes]))


def test_image_dataset_item_and_properties():
    ds = _toy()
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (1, 2, 2) and isinstance(y, int) and y == 0
    assert torch.equal(x, ds.images[3].float() / 255)
    assert len(ds) == 10 and ds.num_classes == 3 and ds.image_shape == (1, 2, 2)
    assert ds[-1][1] == 9 % 3 and ds[np.int64(2)][1] == 2
    with pytest.raises(IndexError):
        ds[10]
    assert "n=10" in repr(ds)
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch_x.shape == (4, 1, 2, 2) and batch_y.tolist() == [0, 1, 2, 0]
    ds[0][0].fill_(1.0)  # items are copies: the uint8 store is untouched
    assert ds.images[0, 0, 0, 0] == 0


def test_image_dataset_subset():
    ds = _toy()
    first = ds.subset(4)
    assert len(first) == 4 and torch.equal(first.images, ds.images[:4]) and first.classes == ds.classes
    assert ds.subset(None) is ds and ds.subset(10) is ds and ds.subset(99, seed=1) is ds
    a, b, c = ds.subset(5, seed=0), ds.subset(5, seed=0), ds.subset(5, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    # Without replacement: 5 distinct images (every toy image is distinct), in data-set order.
    flat = [tuple(img.flatten().tolist()) for img in a.images]
    index = [next(k for k in range(10) if tuple(ds.images[k].flatten().tolist()) == f) for f in flat]
    assert index == sorted(set(index)) and len(index) == 5
    assert len(ds.subset(0)) == 0 and ds.subset(0).image_shape == (1, 2, 2)
    with pytest.raises(ValueError):
        ds.subset(-1)


def test_image_dataset_validates():
    with pytest.raises(ValueError):
        ImageDataset("x", torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), ("a",))  # float images
    with pytest.raises(ValueError):
        ImageDataset("x", torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ("a",))
    with pytest.raises(ValueError):
        ImageDataset("x", torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ("a",))
    nhwc = torch.zeros(2, 2, 2, 1, dtype=torch.uint8)
    ds = ImageDataset("x", nhwc.permute(0, 3, 1, 2), torch.tensor([0, 0], dtype=torch.uint8), ["a"])
    assert ds.images.is_contiguous() and ds.labels.dtype == torch.int64 and ds.classes == ("a",)


# --------------------------------------------------------------------------------------------
# Image folders


@pytest.fixture
def pil():
    return pytest.importorskip("PIL.Image")


def _rgb(h, w, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_image_folder_mixed_formats(tmp_path, pil):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "bird" / "nested").mkdir(parents=True)
    png = _rgb(6, 8, 1)
    pil.fromarray(png).save(tmp_path / "cat" / "a.png")
    pil.fromarray(np.full((6, 8, 3), (200, 40, 10), np.uint8)).save(tmp_path / "cat" / "b.JPG", quality=95)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:3, :, 3] = 255  # top half opaque, bottom half fully transparent
    pil.fromarray(rgba, "RGBA").save(tmp_path / "dog" / "c.png")
    grey = np.random.default_rng(2).integers(0, 256, (6, 8), dtype=np.uint8)
    pil.fromarray(grey, "L").save(tmp_path / "dog" / "d.png")
    pil.fromarray(png).save(tmp_path / "bird" / "nested" / "e.bmp")
    pil.fromarray(png).save(tmp_path / "bird" / "f.webp", lossless=True)
    (tmp_path / "bird" / "notes.txt").write_text("not an image")
    pil.fromarray(png).save(tmp_path / "bird" / ".hidden.png")
    pil.fromarray(png).save(tmp_path / "top-level.png")  # not in a class folder: ignored

    ds = load_image_folder(tmp_path)
    assert ds.name == tmp_path.name and ds.classes == ("bird", "cat", "dog")
    assert ds.images.shape == (6, 3, 6, 8) and ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]  # bird: f.webp, nested/e.bmp; cat: a, b; dog: c, d
    chw = torch.from_numpy(png).permute(2, 0, 1)
    assert torch.equal(ds.images[0], chw) and torch.equal(ds.images[1], chw) and torch.equal(ds.images[2], chw)
    jpeg = ds.images[3].float().mean(dim=(1, 2))
    assert torch.allclose(jpeg, torch.tensor([200.0, 40.0, 10.0]), atol=4)
    rgba_out = ds.images[4]
    assert (rgba_out[:, :3] == torch.tensor([10, 20, 30]).view(3, 1, 1)).all()  # opaque: kept
    assert (rgba_out[:, 3:] == 255).all()  # transparent: composited on white
    grey_out = ds.images[5]
    assert torch.equal(grey_out[0], torch.from_numpy(grey)) and torch.equal(grey_out[0], grey_out[2])


def test_image_folder_greyscale_default_and_forced_channels(tmp_path, pil):
    for c in ("0", "1"):
        (tmp_path / c).mkdir()
    grey = np.random.default_rng(0).integers(0, 256, (5, 5), dtype=np.uint8)
    pil.fromarray(grey, "L").save(tmp_path / "0" / "a.png")
    la = np.stack([grey, np.full_like(grey, 255)], axis=-1)
    pil.fromarray(la, "LA").save(tmp_path / "1" / "b.png")
    ds = load_image_folder(tmp_path)
    assert ds.image_shape == (1, 5, 5) and torch.equal(ds.images[0, 0], torch.from_numpy(grey))
    assert torch.equal(ds.images[1, 0], torch.from_numpy(grey))  # opaque LA: same grey values
    assert load_image_folder(tmp_path, channels=3).image_shape == (3, 5, 5)

    colour = _rgb(5, 5, 3)
    pil.fromarray(colour).save(tmp_path / "1" / "c.png")
    assert load_image_folder(tmp_path).image_shape == (3, 5, 5)  # one colour image makes it RGB
    forced = load_image_folder(tmp_path, channels=1)
    assert forced.image_shape == (1, 5, 5)
    expected = np.array(pil.fromarray(colour).convert("L"))
    assert torch.equal(forced.images[2, 0], torch.from_numpy(expected))


def test_image_folder_16bit_and_palette(tmp_path, pil):
    (tmp_path / "a").mkdir()
    deep = np.array([[0, 257, 65535]], dtype=np.uint16)
    pil.fromarray(deep).save(tmp_path / "a" / "deep.png")
    palette = pil.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putdata([0, 1, 1])
    palette.info["transparency"] = 0
    palette.save(tmp_path / "a" / "pal.png", transparency=0)
    ds = load_image_folder(tmp_path, channels=3)
    assert ds.images[0, 0, 0].tolist() == [0, 1, 255]  # 16-bit scaled, not clipped
    assert ds.images[1, :, 0, 0].tolist() == [255, 255, 255] and ds.images[1, :, 0, 1].tolist() == [255, 0, 0]


def test_image_folder_size_mismatch_and_resize(tmp_path, pil):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pil.fromarray(_rgb(6, 8)).save(tmp_path / "a" / "small.png")
    pil.fromarray(_rgb(10, 12)).save(tmp_path / "b" / "big.png")
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path)
    msg = str(e.value)
    assert "small.png" in msg and "big.png" in msg and "size=" in msg and "\n" not in msg
    ds = load_image_folder(tmp_path, size=(4, 7))
    assert ds.images.shape == (2, 3, 4, 7)
    uniform = np.full((10, 12, 3), 77, np.uint8)
    pil.fromarray(uniform).save(tmp_path / "b" / "big.png")
    assert (load_image_folder(tmp_path, size=(3, 5)).images[1] == 77).all()
    with pytest.raises(DataError, match="size must be"):
        load_image_folder(tmp_path, size=(0, 5))
    with pytest.raises(DataError, match="channels must be"):
        load_image_folder(tmp_path, channels=4)


def test_image_folder_errors(tmp_path, pil):
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path)  # empty
    pil.fromarray(_rgb(4, 4)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path)  # images but no class folders
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="has no images"):
        load_image_folder(tmp_path)
    pil.fromarray(_rgb(4, 4)).save(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.png") as e:
        load_image_folder(tmp_path)
    assert "\n" not in str(e.value)
    good = (tmp_path / "a" / "good.png").read_bytes()
    (tmp_path / "a" / "broken.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match=r"broken\.png"):
        load_image_folder(tmp_path)
    (tmp_path / "a" / "broken.png").unlink()
    (tmp_path / "empty-class").mkdir()
    ds = load_image_folder(tmp_path)
    assert ds.classes == ("a", "empty-class") and ds.labels.tolist() == [0]
