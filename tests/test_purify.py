"""`pssr purify IN OUT`: folder purification, manifest, reruns, conversions, routing, sharding."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pssr import checkpoint, classifiers, purifier, purify_folder
from pssr.classifiers import ClassifierSpec
from pssr.regeneration import Regenerator, RegeneratorSpec
from pssr.surgery import SurgeryConfig
from pssr_cli.main import cli

FIELDS = {"path", "status", "error", "model", "removed_fraction", "pred_before", "pred_after", "prob_before",
          "prob_after", "seconds", "conversions", "output", "mask", "strip"}
_REAL_SHIPPED = purifier.shipped_path


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    torch.set_num_threads(1)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _save_purifier(path: Path, classifier, channels: int, classifier_file: str, dataset: str, seed: int) -> Path:
    torch.manual_seed(seed)
    G = Regenerator(RegeneratorSpec(channels=channels, width=8, dropout=0.0))
    spec = purifier.PurifierSpec(regenerator=G.spec, surgery=SurgeryConfig(),
                                 classifier_sha256=checkpoint.weights_sha256(classifier.state_dict()),
                                 classifier_file=classifier_file, dataset=dataset)
    purifier.save(path, G, spec)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{'mnist': path, 'cifar10': path}: random-weights purifiers (the shipped MNIST classifier; a tiny
    random 3-channel classifier saved next to the colour one)."""
    root = tmp_path_factory.mktemp("models")
    mnist_clf, _ = classifiers.load(_REAL_SHIPPED("classifier-mnist"))
    mnist = _save_purifier(root / "p-mnist.safetensors", mnist_clf, 1, "classifier-mnist.safetensors", "mnist", 0)
    torch.manual_seed(1)
    cspec = ClassifierSpec("lenet", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, "cifar10",
                           classes=tuple(f"c{i}" for i in range(10)))
    clf3 = classifiers.build(cspec).eval()
    classifiers.save(root / "classifier-tiny3.safetensors", clf3, cspec)
    cifar = _save_purifier(root / "p-cifar.safetensors", clf3, 3, "classifier-tiny3.safetensors", "cifar10", 2)
    return {"mnist": mnist, "cifar10": cifar}


def _grey(rng, h=28, w=28):
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))


def _colour(rng, h=32, w=32):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _invoke(*args):
    result = CliRunner().invoke(cli, ["purify", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def _manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_error_for(monkeypatch, name: str) -> None:
    """Writing the file called ``name`` fails with EIO; every other write goes through. (A full disk,
    ENOSPC, stops the whole run instead: tests/test_purify_safety.py.)"""
    real_write = purify_folder.write_output

    def full_disk(path, data):
        if path.name == name:
            raise OSError(errno.EIO, "Input/output error")
        return real_write(path, data)

    monkeypatch.setattr(purify_folder, "write_output", full_disk)


def _by_path(path: Path) -> dict[str, dict]:
    records = _manifest(path)
    by = {r["path"]: r for r in records}
    assert len(by) == len(records), "one record per input file"
    return by


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def mixed_folder(tmp_path):
    """Good greyscale images in nested folders (4 formats), three bad image files, a text file, a hidden file."""
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    (src / "a" / "b").mkdir(parents=True)
    (src / "c").mkdir()
    _grey(rng).save(src / "a" / "b" / "one.png")
    _grey(rng).save(src / "a" / "b" / "two.PNG")
    _grey(rng).save(src / "a" / "three.jpg", quality=95)
    _grey(rng).save(src / "c" / "four.bmp")
    _grey(rng).save(src / "five.webp", lossless=True)
    (src / "c" / "corrupt.png").write_bytes(_png_bytes(_grey(rng))[:60])  # truncated PNG
    (src / "c" / "text.jpg").write_text("this is not a JPEG\n" * 20)
    (src / "empty.png").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden.png").write_bytes(b"")
    good = {"a/b/one.png": "a/b/one.png", "a/b/two.PNG": "a/b/two.png", "a/three.jpg": "a/three.png",
            "c/four.bmp": "c/four.png", "five.webp": "five.png"}
    bad = {"c/corrupt.png", "c/text.jpg", "empty.png"}
    return src, good, bad


def test_folder_purified_with_bad_files_reported(tmp_path, mixed_folder, models):
    src, good, bad = mixed_folder
    out = tmp_path / "out"
    result = _invoke(src, out, "--model", models["mnist"], "--batch-size", 2)
    assert result.exit_code == 1, result.output
    assert "5 ok, 0 skipped, 3 failed, 1 non-image files ignored" in result.stdout
    assert str(out / "manifest.jsonl") in result.stdout
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("pssr purify: failed")]
    assert sorted(line.split()[3].rstrip(":") for line in failed_lines) == sorted(bad)
    # good ones written under the same relative paths, as PNG, at the model's size; nothing else written
    assert _files(out) == set(good.values()) | {"manifest.jsonl"}
    for rel in good.values():
        with Image.open(out / rel) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", (28, 28))
    records = _by_path(out / "manifest.jsonl")
    assert set(records) == set(good) | bad  # the text file and the hidden file are not inputs
    for rel in bad:
        r = records[rel]
        assert r["status"] == "failed" and r["error"] and r["output"] is None and r["pred_after"] is None
    assert records["empty.png"]["error"] == "empty file"
    assert records["c/text.jpg"]["error"].startswith("cannot decode")
    for rel, out_rel in good.items():
        assert records[rel]["status"] == "ok" and records[rel]["output"] == out_rel


def test_manifest_fields_and_outputs_match_the_purifier(tmp_path, models):
    rng = np.random.default_rng(1)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    images = {f"d{i}.png": _grey(rng) for i in range(5)}
    for name, img in images.items():
        img.save(src / name)
    result = _invoke(src, out, "--model", models["mnist"], "--batch-size", 3)
    assert result.exit_code == 0, result.output
    records = _by_path(out / "manifest.jsonl")
    assert list(records) == sorted(images)  # compacted: sorted, one per path
    p, _, _ = purifier.load(models["mnist"])
    p = purifier.Purifier(classifiers.fold_batchnorm(p.classifier), p.regenerator, p.surgery.config)  # as purify runs it
    for name, img in images.items():
        r = records[name]
        assert FIELDS <= set(r)
        assert r["status"] == "ok" and r["error"] is None and r["model"] == str(models["mnist"])
        assert 0.0 < r["removed_fraction"] < 1.0
        for key in ("pred_before", "pred_after"):
            assert isinstance(r[key], int) and 0 <= r[key] <= 9
        for key in ("prob_before", "prob_after"):
            assert 0.0 <= r[key] <= 1.0
        assert r["seconds"] > 0 and r["conversions"] == []
        # the written image is Purifier.purify's output (the stage-by-stage run changes nothing)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)[None, None]
        with torch.no_grad():
            res = p.purify(x)
            logits_after = p.classifier(res.x_hat)
        expected = (res.x_hat[0, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), expected)
        assert r["removed_fraction"] == pytest.approx(res.mask.float().mean().item())
        assert r["pred_before"] == res.logits_before.argmax(1).item()
        assert r["pred_after"] == logits_after.argmax(1).item()
        assert r["prob_after"] == pytest.approx(torch.softmax(logits_after, 1).max().item(), abs=1e-6)


def test_no_overwrite_without_flag(tmp_path, models):
    rng = np.random.default_rng(2)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        _grey(rng).save(src / f"g{i}.png")
    assert _invoke(src, out, "--model", models["mnist"]).exit_code == 0
    marker = _png_bytes(Image.new("L", (5, 5), 7))
    (out / "g1.png").write_bytes(marker)
    result = _invoke(src, out, "--model", models["mnist"])
    assert result.exit_code == 0, result.output
    assert "0 ok, 3 skipped, 0 failed" in result.stdout
    assert (out / "g1.png").read_bytes() == marker
    # earlier ok records are kept for outputs that were skipped as existing
    assert all(r["status"] == "ok" for r in _manifest(out / "manifest.jsonl"))

    result = _invoke(src, out, "--model", models["mnist"], "--overwrite")
    assert result.exit_code == 0 and "3 ok, 0 skipped, 0 failed" in result.stdout
    with Image.open(out / "g1.png") as img:
        assert img.size == (28, 28)

    # an output that exists with no earlier record: skipped, error "exists"
    (out / "manifest.jsonl").unlink()
    (out / "g2.png").write_bytes(marker)
    (out / "g0.png").unlink()
    result = _invoke(src, out, "--model", models["mnist"])
    assert "1 ok, 2 skipped, 0 failed" in result.stdout
    records = _by_path(out / "manifest.jsonl")
    assert records["g2.png"]["status"] == "skipped" and records["g2.png"]["error"] == "exists"
    assert records["g0.png"]["status"] == "ok"
    assert (out / "g2.png").read_bytes() == marker


def test_interrupted_run_leaves_no_partial_files_and_rerun_finishes(tmp_path, models, monkeypatch):
    rng = np.random.default_rng(3)
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "s").mkdir(parents=True)
    names = [f"s/g{i}.png" for i in range(6)]
    for name in names:
        _grey(rng).save(src / name)
    real_write = purify_folder.write_output

    def dying_write(path, data):
        if path.name == "g3.png":  # killed in the middle of writing the 4th image

            def half(tmp):
                Path(tmp).write_bytes(data[: len(data) // 2])
                raise KeyboardInterrupt

            checkpoint.atomic_write(path, half)
        return real_write(path, data)

    monkeypatch.setattr(purify_folder, "write_output", dying_write)
    options = purify_folder.Options(model=str(models["mnist"]), batch_size=4, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        purify_folder.run(src, out, options)
    # no temporary or half file; every output that was written whole is in the manifest with its predictions
    # (records are written ahead of their outputs: one whose output never came is redone by the rerun)
    written = _files(out) - {"manifest.jsonl"}
    assert "manifest.jsonl" in _files(out) and "s/g3.png" not in written and set(names[:3]) <= written
    records = _manifest(out / "manifest.jsonl")
    assert all(r["status"] == "ok" for r in records)
    assert written <= {r["path"] for r in records if r["pred_after"] is not None}
    for name in written:
        with Image.open(out / name) as img:
            img.load()
    monkeypatch.setattr(purify_folder, "write_output", real_write)

    # a torn manifest line and a temporary file left by a harder kill are cleaned up on rerun
    with open(out / "manifest.jsonl", "a") as fh:
        fh.write('{"path": "s/g3.png", "sta')
    (out / "s" / ".g3.png.k1l2m3n4.tmp").write_bytes(b"partial")
    (out / "s" / ".unrelated.tmp").write_bytes(b"keep")
    summary = purify_folder.run(src, out, options)
    assert (summary.ok, summary.skipped, summary.failed) == (len(names) - len(written), len(written), 0)
    assert _files(out) == set(names) | {"manifest.jsonl", "s/.unrelated.tmp"}
    records = _by_path(out / "manifest.jsonl")
    assert list(records) == names and all(r["status"] == "ok" for r in records.values())


def test_write_error_fails_that_file_only(tmp_path, models, monkeypatch):
    rng = np.random.default_rng(12)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        _grey(rng).save(src / f"g{i}.png")
    _write_error_for(monkeypatch, "g1.png")
    result = _invoke(src, out, "--model", models["mnist"])
    assert result.exit_code == 1 and "2 ok, 0 skipped, 1 failed" in result.stdout
    r = _by_path(out / "manifest.jsonl")
    assert r["g1.png"]["status"] == "failed" and "Input/output error" in r["g1.png"]["error"]
    assert _files(out) == {"g0.png", "g2.png", "manifest.jsonl"}


def test_exif_orientation_and_animation(tmp_path, models):
    rng = np.random.default_rng(13)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: a 30x20 (WxH) file shows as 20x30
    _grey(rng, 20, 30).save(src / "rotated.jpg", exif=exif, quality=95)
    frames = [_grey(rng) for _ in range(3)]
    frames[0].save(src / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    result = _invoke(src, out, "--model", models["mnist"])
    assert result.exit_code == 0, result.output
    r = _by_path(out / "manifest.jsonl")
    assert r["rotated.jpg"]["conversions"] == ["EXIF orientation applied", "resized 20x30->28x28 (WxH, bilinear)"]
    # animated WebP frames decode as RGBA in Pillow
    assert r["anim.webp"]["conversions"] == [
        "first of 3 frames", "RGBA->RGB (alpha composited on white)", "RGB->L (all pixels grey)"]


def test_conversions_recorded_and_applied(tmp_path, models):
    rng = np.random.default_rng(4)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    # fully transparent RGBA of random colours: composited on white, every pixel becomes 255
    rgba = rng.integers(0, 256, (28, 28, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    Image.fromarray(rgba).save(src / "rgba.png")
    # 16-bit grey with values far above 255: scaled, not clipped at 255
    a16 = rng.integers(0, 65536, (28, 28)).astype(np.uint16)
    Image.fromarray(a16).save(src / "grey16.png")
    assert Image.open(src / "grey16.png").mode == "I;16"
    _colour(rng, 28, 28).convert("P", palette=Image.Palette.ADAPTIVE).save(src / "palette.png")
    Image.fromarray(np.repeat(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), 3, axis=2)).save(src / "rgbgrey.png")
    _grey(rng).convert("LA").save(src / "la.png")
    _grey(rng, 64, 48).save(src / "big.png")  # 48 wide, 64 high
    result = _invoke(src, out, "--model", models["mnist"])
    assert result.exit_code == 0, result.output
    r = _by_path(out / "manifest.jsonl")
    assert r["rgba.png"]["conversions"] == ["RGBA->RGB (alpha composited on white)", "RGB->L (all pixels grey)"]
    assert r["grey16.png"]["conversions"][0].startswith("I;16->L (16-bit")
    assert r["palette.png"]["conversions"] == ["P->RGB", "RGB->L (luma)"]
    assert r["rgbgrey.png"]["conversions"] == ["RGB->L (all pixels grey)"]
    assert r["la.png"]["conversions"] == ["LA->RGB (alpha composited on white)", "RGB->L (all pixels grey)"]
    assert r["big.png"]["conversions"] == ["resized 48x64->28x28 (WxH, bilinear)"]
    for name in r:
        with Image.open(out / name) as img:
            assert (img.mode, img.size) == ("L", (28, 28))
    # surviving pixels pass through the purifier unchanged: check the conversions' values on them
    white = np.asarray(Image.open(out / "rgba.png")) == 255
    assert white.mean() >= 1 - r["rgba.png"]["removed_fraction"] - 1e-9
    expected16 = np.round(a16.astype(np.float64) / 65535 * 255)
    close = np.abs(np.asarray(Image.open(out / "grey16.png")).astype(np.float64) - expected16) <= 1
    assert close.mean() >= 1 - r["grey16.png"]["removed_fraction"] - 1e-9


def test_colour_model_and_wrong_sizes(tmp_path, models):
    rng = np.random.default_rng(5)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _colour(rng, 40, 50).save(src / "wide.png")
    _colour(rng).save(src / "exact.png")
    _grey(rng).save(src / "grey.png")
    result = _invoke(src, out, "--model", models["cifar10"])
    assert result.exit_code == 0, result.output
    r = _by_path(out / "manifest.jsonl")
    assert r["wide.png"]["conversions"] == ["resized 50x40->32x32 (WxH, bilinear)"]
    assert r["exact.png"]["conversions"] == []
    assert r["grey.png"]["conversions"] == ["resized 28x28->32x32 (WxH, bilinear)", "L->RGB"]
    assert r["wide.png"]["class_before"] == f"c{r['wide.png']['pred_before']}"
    for name in r:
        with Image.open(out / name) as img:
            assert (img.mode, img.size) == ("RGB", (32, 32))


@pytest.mark.parametrize("kind", ["missing", "text", "pickle", "classifier"])
def test_bad_model_path_is_a_one_line_error(tmp_path, kind, models):
    src = tmp_path / "in"
    src.mkdir()
    _grey(np.random.default_rng(6)).save(src / "g.png")
    bad = tmp_path / "bad.safetensors"
    if kind == "text":
        bad.write_text("hello")
    elif kind == "pickle":
        torch.save({"w": torch.zeros(2)}, bad)
    elif kind == "classifier":  # a real checkpoint, but not a purifier
        bad = _REAL_SHIPPED("classifier-mnist")
    result = _invoke(src, tmp_path / "out", "--model", bad)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(bad) in lines[0], result.stderr
    assert not (tmp_path / "out" / "g.png").exists()


def _route(monkeypatch, mapping):
    def shipped(name):
        return Path(mapping[name]) if name in mapping else _REAL_SHIPPED(name)

    monkeypatch.setattr(purifier, "shipped_path", shipped)


def test_auto_routes_grey_to_mnist_and_colour_to_cifar10(tmp_path, models, monkeypatch):
    _route(monkeypatch, {"purifier-mnist": models["mnist"], "purifier-cifar10": models["cifar10"]})
    rng = np.random.default_rng(7)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _grey(rng).save(src / "grey.png")
    _grey(rng).convert("RGB").save(src / "grey-as-rgb.png")
    _colour(rng).save(src / "colour.png")
    rgba = np.asarray(_colour(rng).convert("RGBA")).copy()
    rgba[..., 3] = 128
    Image.fromarray(rgba).save(src / "colour-rgba.png")
    result = _invoke(src, out)
    assert result.exit_code == 0, result.output
    r = _by_path(out / "manifest.jsonl")
    assert {k: v["model"] for k, v in r.items()} == {
        "grey.png": "mnist", "grey-as-rgb.png": "mnist", "colour.png": "cifar10", "colour-rgba.png": "cifar10"}
    for name, shape in (("grey.png", ("L", (28, 28))), ("colour.png", ("RGB", (32, 32)))):
        with Image.open(out / name) as img:
            assert (img.mode, img.size) == shape


def test_missing_shipped_weights(tmp_path, models, monkeypatch):
    _route(monkeypatch, {"purifier-mnist": models["mnist"], "purifier-cifar10": tmp_path / "none.safetensors"})
    rng = np.random.default_rng(8)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _grey(rng).save(src / "grey.png")
    _colour(rng).save(src / "c1.png")
    _colour(rng).save(src / "c2.png")
    # auto: the colour files fail (one message), the grey one is still purified
    result = _invoke(src, out)
    assert result.exit_code == 1
    assert "1 ok, 0 skipped, 2 failed" in result.stdout
    assert result.stderr.count("cifar10 model is unavailable") == 1
    r = _by_path(out / "manifest.jsonl")
    assert r["grey.png"]["status"] == "ok"
    assert all(r[c]["status"] == "failed" and "not installed" in r[c]["error"] for c in ("c1.png", "c2.png"))
    # a forced model that is missing stops the run with one line
    result = _invoke(src, tmp_path / "out2", "--model", "cifar10")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cifar10 purifier is not installed" in lines[0]


def test_folder_errors(tmp_path, models):
    src = tmp_path / "in"
    src.mkdir()
    (tmp_path / "file").write_text("x")
    cases = [
        ((tmp_path / "nope", tmp_path / "out"), "does not exist"),
        ((tmp_path / "file", tmp_path / "out"), "is not a folder"),
        ((src, src), "inside the input folder"),
        ((src, src / "out"), "inside the input folder"),
        ((src, tmp_path), "inside the output folder"),
        ((src, tmp_path / "file"), "is not a folder"),
    ]
    for (a, b), message in cases:
        result = _invoke(a, b, "--model", models["mnist"])
        assert result.exit_code == 1, (a, b, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (a, b, result.stderr)
    result = _invoke(src, tmp_path / "out", "--classifier", models["mnist"])
    assert result.exit_code == 1 and "--classifier needs one model" in result.stderr
    assert not (src / "out").exists() and not (tmp_path / "out").exists()


def test_symlink_loops_and_links_into_out_are_not_followed(tmp_path, models):
    rng = np.random.default_rng(14)
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "d").mkdir(parents=True)
    out.mkdir()
    _grey(rng).save(src / "d" / "g.png")
    _grey(rng).save(out / "old.png")
    (src / "d" / "loop").symlink_to(src, target_is_directory=True)
    (src / "to-out").symlink_to(out, target_is_directory=True)
    result = _invoke(src, out, "--model", models["mnist"])
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in _manifest(out / "manifest.jsonl")] == ["d/g.png"]


def test_name_collisions_and_format_same(tmp_path, models):
    rng = np.random.default_rng(9)
    src = tmp_path / "in"
    src.mkdir()
    _grey(rng).save(src / "a.jpg", quality=95)
    _grey(rng).save(src / "a.png")
    _grey(rng).save(src / "b.webp", lossless=True)
    result = _invoke(src, tmp_path / "out", "--model", models["mnist"])
    assert result.exit_code == 1
    r = _by_path(tmp_path / "out" / "manifest.jsonl")
    assert r["a.jpg"]["status"] == "ok" and r["a.jpg"]["output"] == "a.png"
    assert r["a.png"]["status"] == "failed" and "a.jpg" in r["a.png"]["error"]
    result = _invoke(src, tmp_path / "same", "--model", models["mnist"], "--format", "same")
    assert result.exit_code == 0, result.output
    assert _files(tmp_path / "same") == {"a.jpg", "a.png", "b.webp", "manifest.jsonl"}
    for name, fmt in (("a.jpg", "JPEG"), ("a.png", "PNG"), ("b.webp", "WEBP")):
        with Image.open(tmp_path / "same" / name) as img:
            assert img.format == fmt and img.size == (28, 28)


def test_rank_sharding_is_disjoint_and_complete(tmp_path, models, monkeypatch):
    rng = np.random.default_rng(10)
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "x").mkdir(parents=True)
    names = sorted([f"x/g{i}.png" for i in range(4)] + [f"h{i}.png" for i in range(3)])
    for name in names:
        _grey(rng).save(src / name)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shards = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        result = _invoke(src, out, "--model", models["mnist"])
        assert result.exit_code == 0, result.output
        assert f"(rank {rank} of 2)" in result.stdout
        shards.append([r["path"] for r in _manifest(out / f"manifest-rank{rank}.jsonl")])
    assert shards == [names[0::2], names[1::2]]
    assert not (out / "manifest.jsonl").exists()
    assert _files(out) == set(names) | {"manifest-rank0.jsonl", "manifest-rank1.jsonl"}
    with pytest.raises(purify_folder.PurifyError):
        purify_folder.shard_from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_profile_and_subprocess_end_to_end(tmp_path, models):
    rng = np.random.default_rng(11)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        _grey(rng).save(src / f"g{i}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "pssr_cli.main", "purify", str(src), str(out), "--model",
                           str(models["mnist"]), "--profile"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 ok, 0 skipped, 0 failed" in proc.stdout
    assert "images/s" in proc.stderr
    for stage in purify_folder.STAGES:
        assert f"  {stage} " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(_manifest(out / "manifest.jsonl")) == 3


# --------------------------------------------------------------------------------------------
# --save-masks


def _grid(path: Path, scale: int, rows: int | None = None) -> np.ndarray:
    """A mask or strip (its first ``rows``: the panels above the caption) back at the model's size, after
    checking that it is a nearest enlargement."""
    a = np.asarray(Image.open(path))[:rows]
    small = a[::scale, ::scale]
    np.testing.assert_array_equal(np.repeat(np.repeat(small, scale, 0), scale, 1), a)
    return small


def test_save_masks_writes_mask_and_strip(tmp_path, mixed_folder, models):
    src, good, bad = mixed_folder
    out = tmp_path / "out"
    result = _invoke(src, out, "--model", models["mnist"], "--batch-size", 2, "--save-masks")
    assert result.exit_code == 1 and "5 ok, 0 skipped, 3 failed" in result.stdout  # bad files stop nothing
    views = {name for o in good.values() for name in purify_folder.view_names(o)}
    assert _files(out) == set(good.values()) | views | {"manifest.jsonl"}
    records = _by_path(out / "manifest.jsonl")
    assert all(records[rel]["mask"] is None and records[rel]["strip"] is None for rel in bad)
    s = purify_folder.view_scale(28)
    assert s == 4
    for rel, out_rel in good.items():
        r = records[rel]
        stem = out_rel[: -len(".png")]
        assert (r["mask"], r["strip"]) == (stem + ".mask.png", stem + ".strip.png")
        with Image.open(out / r["mask"]) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", (28 * s, 28 * s))
        with Image.open(out / r["strip"]) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", (4 * 28 * s, 28 * s + purify_folder.CAPTION_PX))
        mask = _grid(out / r["mask"], s)
        assert set(np.unique(mask)) <= {0, 255}
        assert (mask == 255).mean() == pytest.approx(r["removed_fraction"], abs=1e-6)
        given, shown_mask, regenerated, diff = np.split(_grid(out / r["strip"], s, 28 * s), 4, axis=1)
        np.testing.assert_array_equal(given, np.asarray(Image.open(src / rel).convert("L")))
        np.testing.assert_array_equal(shown_mask, mask)
        np.testing.assert_array_equal(regenerated, np.asarray(Image.open(out / out_rel)))
        kept = mask == 0
        assert (given[kept] == regenerated[kept]).all() and (diff[kept] == 0).all()
        amplified = np.minimum(np.abs(regenerated.astype(int) - given) * purify_folder.DIFF_GAIN, 255)
        assert np.abs(diff.astype(int) - amplified).max() <= purify_folder.DIFF_GAIN  # 8-bit rounding only


def test_save_masks_colour_sizes(tmp_path, models):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _colour(np.random.default_rng(15), 40, 50).save(src / "c.png")
    result = _invoke(src, out, "--model", models["cifar10"], "--save-masks")
    assert result.exit_code == 0, result.output
    strip = (4 * 128, 128 + purify_folder.CAPTION_PX)
    for name, mode, size in (("c.mask.png", "L", (128, 128)), ("c.strip.png", "RGB", strip)):
        with Image.open(out / name) as img:
            assert (img.mode, img.size) == (mode, size)


def test_save_masks_rerun_skips_and_writes_only_what_is_missing(tmp_path, models):
    rng = np.random.default_rng(16)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        _grey(rng).save(src / f"g{i}.png")
    assert _invoke(src, out, "--model", models["mnist"], "--save-masks").exit_code == 0
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns)
              for name in _files(out) - {"manifest.jsonl"}}
    result = _invoke(src, out, "--model", models["mnist"], "--save-masks")
    assert result.exit_code == 0 and "0 ok, 3 skipped, 0 failed" in result.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in before} == {n: v[1] for n, v in before.items()}
    # a missing mask (or output) makes its file run again; what exists is kept, not replaced
    (out / "g1.mask.png").unlink()
    (out / "g2.png").unlink()
    result = _invoke(src, out, "--model", models["mnist"], "--save-masks")
    assert result.exit_code == 0 and "2 ok, 1 skipped, 0 failed" in result.stdout
    for name, (data, mtime) in before.items():
        assert (out / name).read_bytes() == data  # the same purifier gives the same files
        kept = name not in ("g1.mask.png", "g2.png")
        assert ((out / name).stat().st_mtime_ns == mtime) == kept, name
    records = _by_path(out / "manifest.jsonl")
    assert all(r["status"] == "ok" and r["mask"] == r["path"][:-4] + ".mask.png" for r in records.values())


def test_save_masks_name_clash_and_write_error(tmp_path, models, monkeypatch):
    rng = np.random.default_rng(17)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a.png", "a.mask.png", "g.png"):
        _grey(rng).save(src / name)
    _write_error_for(monkeypatch, "g.strip.png")
    result = _invoke(src, out, "--model", models["mnist"], "--save-masks")
    assert result.exit_code == 1 and "1 ok, 0 skipped, 2 failed" in result.stdout
    r = _by_path(out / "manifest.jsonl")
    assert r["a.mask.png"]["status"] == "ok"  # sorted first, so it owns the name a.mask.png
    assert r["a.png"]["status"] == "failed" and "a.mask.png is already written for a.mask.png" in r["a.png"]["error"]
    assert r["g.png"]["status"] == "failed" and "Input/output error" in r["g.png"]["error"]
    # g.png's mask was written before its strip failed, and removed: a failed input leaves no file
    assert _files(out) == {"a.mask.png", "a.mask.mask.png", "a.mask.strip.png", "manifest.jsonl"}


def test_readme_main_command_purifies_the_samples_with_the_shipped_purifier(tmp_path):
    """`pssr purify samples/ purified/`: the greyscale samples go to the shipped MNIST purifier, the colour
    ones to the CIFAR-10 one; the predictions after purification are the shipped classifier's on the outputs."""
    samples = Path(__file__).resolve().parent.parent / "samples"
    out = tmp_path / "purified"
    result = _invoke(samples, out)
    assert result.exit_code == 0, result.output
    r = _by_path(out / "manifest.jsonl")
    pngs = sorted(p.relative_to(samples).as_posix() for p in samples.rglob("*.png"))
    assert sorted(r) == pngs and all(v["status"] == "ok" and v["model"] == v["path"].split("/")[0] for v in r.values())
    assert {v["model"] for v in r.values()} == {"mnist", "cifar10"}
    f = {name: classifiers.fold_batchnorm(classifiers.load(_REAL_SHIPPED(f"classifier-{name}"))[0])
         for name in ("mnist", "cifar10")}
    for name, rec in r.items():
        a = np.asarray(Image.open(out / rec["output"]), dtype=np.float32) / 255
        x = torch.from_numpy(a)[None, None] if a.ndim == 2 else torch.from_numpy(a).permute(2, 0, 1)[None]
        assert 0.2 < rec["removed_fraction"] < 0.8
        assert int(f[rec["model"]](x).argmax(1)) == rec["pred_after"], name  # the 8-bit output was classified
    # samples/labels.csv is picked up (not an input): every record has its label, and the summary says
    # how many predictions changed and the accuracy before and after
    assert all(rec["label"] == Path(name).stem.split("-", 1)[1] for name, rec in r.items())
    changed = sum(v["pred_before"] != v["pred_after"] for v in r.values())
    before = sum(v["class_before"] == v["label"] for v in r.values())
    after = sum(v["class_after"] == v["label"] for v in r.values())
    assert (f"purification changed {changed} of 16 predictions; accuracy on 16 labelled images: "
            f"{100 * before / 16:.1f}% before, {100 * after / 16:.1f}% after, labels from {samples / 'labels.csv'}"
            ) in result.stdout, result.stdout
    assert "16 ok, 0 skipped, 0 failed, 1 non-image files ignored" in result.stdout  # README.md
