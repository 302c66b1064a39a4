"""`pssr bench-kernels` and its pipeline, on tiny shapes with a tiny timing budget (no thresholds)."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

import pssr.ops as ops
from pssr import bench
from pssr_cli.main import cli

TINY = ["--shape", "4x1x8x8", "--min-run-time", "0.01", "--threads", "1"]
HAS_CUDA = torch.cuda.is_available()


def invoke(*args):
    return CliRunner().invoke(cli, ["bench-kernels", *args])


def by_key(records):
    return {(r["op"], r["device"], tuple(r["shape"]), r["dtype"], r["mode"], r["impl"]): r for r in records}


def check_consistent(records):
    """Every derived number must follow from the raw medians of the same run."""
    table = by_key(records)
    for (op, device, shape, dtype, mode, impl), r in table.items():
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / (r["median_ms"] / 1e3) / 1e9, rel=1e-9)
        if impl == "copy":
            continue
        copy = table[("copy", device, shape, dtype, None, "copy")]
        assert r["fraction_of_copy_bandwidth"] == pytest.approx(r["gbps"] / copy["gbps"], rel=1e-9)
        if impl == "fused":
            eager = table[(op, device, shape, dtype, mode, "eager")]
            assert r["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / r["median_ms"], rel=1e-9)
            compiled = table.get((op, device, shape, dtype, mode, "compiled"))
            if compiled is None:
                assert r["speedup_vs_compiled"] is None
            else:
                assert r["speedup_vs_compiled"] == pytest.approx(compiled["median_ms"] / r["median_ms"], rel=1e-9)
        else:
            assert r["speedup_vs_eager"] is None and r["speedup_vs_compiled"] is None


def test_json_records_and_consistency(tmp_path):
    out = tmp_path / "bench.json"
    res = invoke(*TINY, "--shape", "2x3x5x7", "--device", "cpu", "--no-compiled", "--json", str(out), "-q")
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data) >= {"machine", "records"}
    m = data["machine"]
    assert m["torch"] == torch.__version__ and m["threads"] == 1
    assert m["extension_loaded"] is ops.EXTENSION_LOADED
    assert isinstance(m["extension_cuda_kernels"], bool) and m["cpu"]
    recs = data["records"]
    required = {"op", "device", "shape", "dtype", "mode", "impl", "median_ms", "gbps"}
    assert all(required <= set(r) for r in recs)
    got = {(r["op"], tuple(r["shape"]), r["mode"], r["impl"]) for r in recs}
    want = {("copy", s, None, "copy") for s in [(4, 1, 8, 8), (2, 3, 5, 7)]}
    for s in [(4, 1, 8, 8), (2, 3, 5, 7)]:
        want |= {("pixel_surgery", s, m, i) for m in ("mean", "topk") for i in ("fused", "eager")}
        want |= {("saliency_score", s, None, i) for i in ("fused", "eager")}
    assert got == want and len(recs) == len(want)
    for r in recs:
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["median_ms"] > 0 and math.isfinite(r["gbps"]) and r["gbps"] > 0
        if r["impl"] == "fused":
            assert {"speedup_vs_eager", "speedup_vs_compiled", "fraction_of_copy_bandwidth"} <= set(r)
            assert r["speedup_vs_eager"] > 0 and r["fraction_of_copy_bandwidth"] > 0
    check_consistent(recs)
    # The byte counts of the contract: pixel_surgery reads x, grad and writes x_s and a bool mask.
    table = by_key(recs)
    n, px = 2 * 3 * 5 * 7, 2 * 5 * 7
    assert table[("pixel_surgery", "cpu", (2, 3, 5, 7), "float32", "mean", "fused")]["bytes_moved"] == 3 * 4 * n + px
    assert table[("saliency_score", "cpu", (2, 3, 5, 7), "float32", None, "fused")]["bytes_moved"] == 4 * n + 4 * px
    assert table[("copy", "cpu", (2, 3, 5, 7), "float32", None, "copy")]["bytes_moved"] == 2 * (2 * 4 * n)
    # The table on stdout has a header and one row per record.
    assert "torch " + torch.__version__ in res.output and "pssr extension" in res.output
    rows = [line for line in res.output.splitlines() if line.startswith(("copy ", "pixel_surgery ", "saliency_score "))]
    assert len(rows) == len(recs)
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file of the atomic write was left behind"


def test_ops_and_mode_selection(tmp_path):
    out = tmp_path / "b.json"
    threads = torch.get_num_threads()
    res = invoke(*TINY, "--ops", "surgery", "--mode", "topk", "--no-compiled", "--device", "cpu", "--dtype", "float64",
                 "--json", str(out))
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == threads, "--threads leaked out of the run"
    assert "%|" not in res.stderr, "progress bar drawn although stderr is not a terminal"
    recs = json.loads(out.read_text())["records"]
    assert {(r["op"], r["mode"], r["impl"]) for r in recs} == {
        ("copy", None, "copy"), ("pixel_surgery", "topk", "fused"), ("pixel_surgery", "topk", "eager")}
    assert all(r["dtype"] == "float64" for r in recs)
    check_consistent(recs)


def test_compiled_reference_is_timed(tmp_path):
    """One compile only (tens of seconds on a busy CPU): pixel_surgery/mean on a tiny shape."""
    out = tmp_path / "b.json"
    res = invoke(*TINY, "--ops", "surgery", "--mode", "mean", "--device", "cpu", "--json", str(out), "-q")
    assert res.exit_code == 0, res.output
    recs = json.loads(out.read_text())["records"]
    assert [r["impl"] for r in recs] == ["copy", "fused", "eager", "compiled"]
    fused = recs[1]
    assert fused["speedup_vs_compiled"] is not None and fused["speedup_vs_compiled"] > 0
    check_consistent(recs)


@pytest.mark.parametrize("shape", ["4x1x8", "4x1x8x8x2", "axbxcxd", "0x1x8x8", "4*1*8*8", ""])
def test_bad_shape_is_a_one_line_error(shape):
    res = invoke("--shape", shape, "--no-compiled")
    assert res.exit_code == 2
    assert "Traceback" not in res.output and not isinstance(res.exception, ValueError)
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--shape" in errors[0]


@pytest.mark.parametrize("args", [["--ops", "surgery,blur"], ["--mode", "median"], ["--min-run-time", "0"],
                                  ["--threads", "0"], ["--dtype", "int8"]])
def test_bad_options_are_usage_errors(args):
    res = invoke(*args)
    assert res.exit_code == 2 and "Traceback" not in res.output and "Error" in res.output


def test_unwritable_json_fails_before_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "time_copy", lambda *a: pytest.fail("timed before checking --json"))
    res = invoke(*TINY, "--no-compiled", "--json", str(tmp_path / "missing" / "b.json"))
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().count("\n") == 0 and "--json" in res.output


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")
def test_cuda_without_gpu_fails_cleanly():
    res = invoke(*TINY, "--device", "cuda", "--no-compiled")
    assert res.exit_code == 1
    assert res.output.strip().startswith("Error:") and "CUDA" in res.output
    assert res.output.strip().count("\n") == 0 and "Traceback" not in res.output


def test_help_explains_options_and_numbers():
    res = invoke("--help")
    assert res.exit_code == 0
    for word in ["--shape", "--mode", "--dtype", "--device", "--ops", "--min-run-time", "--seed", "--threads",
                 "--no-compiled", "--json", "--quiet", "GB/s", "vs eager", "vs compiled", "of copy"]:
        assert word in res.output
    assert "bench-kernels" in CliRunner().invoke(cli, ["--help"]).output


def test_wrong_mask_refuses_to_time(monkeypatch):
    """A fused op that disagrees with the reference must stop the run, not be timed."""
    real = ops.pixel_surgery

    def broken(x, grad, **kw):
        x_s, mask = real(x, grad, **kw)
        mask = mask.clone()
        mask.view(-1)[0] ^= True
        return x_s, mask

    monkeypatch.setattr(ops, "pixel_surgery", broken)
    res = invoke(*TINY, "--ops", "surgery", "--mode", "mean", "--no-compiled", "--device", "cpu")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "mask is not bit-identical" in res.output and "1 of 256" in res.output


def test_fallback_is_marked(monkeypatch):
    """When pssr.ops runs the reference (no native kernel), the fused row says so."""
    monkeypatch.setattr(bench, "has_kernel", lambda op, device: False)
    result = bench.run(bench.Config(shapes=((2, 1, 4, 4),), ops=("score",), min_run_time=0.01, device="cpu",
                                    compiled=False), quiet=True)
    fused = [r for r in result.records if r.impl == "fused"]
    assert fused and all(r.native is False for r in fused)
    assert "fused*" in bench.format_report(result)


def test_parse_helpers():
    assert bench.parse_shape(" 256X1x28x28 ") == (256, 1, 28, 28)
    assert bench.parse_ops("score, pixel_surgery,score") == ("score", "surgery")
    with pytest.raises(ValueError):
        bench.parse_shape("٣x1x2x2")  # non-ASCII digits are not a shape
    with pytest.raises(bench.BenchError):
        bench.run(bench.Config(shapes=((1, 1, 0, 1),), device="cpu"), quiet=True)
