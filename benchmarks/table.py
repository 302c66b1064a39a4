"""Markdown table of the fused rows of a `pssr bench-kernels --json` file (for docs/kernels.md, "Kernel numbers (CPU)").

    python benchmarks/table.py benchmarks/cpu-2core.json
"""

import json
import sys


def main(path: str) -> None:
    with open(path) as fh:
        result = json.load(fh)
    print("| op | shape | mode | fused ms | eager ms | compiled ms | vs eager | vs compiled | of copy |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows = result["records"]
    for r in rows:
        if r["impl"] != "fused":
            continue
        key = (r["op"], r["device"], r["shape"], r["mode"])
        peer = {p["impl"]: p for p in rows if (p["op"], p["device"], p["shape"], p["mode"]) == key}
        compiled = peer.get("compiled", {}).get("median_ms")
        vs_compiled = r["speedup_vs_compiled"]
        print(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['mode'] or '-'} | {r['median_ms']:.3g} "
            f"| {peer['eager']['median_ms']:.3g} | {'-' if compiled is None else f'{compiled:.3g}'} "
            f"| {r['speedup_vs_eager']:.1f}× | {'-' if vs_compiled is None else f'{vs_compiled:.1f}×'} "
            f"| {r['fraction_of_copy_bandwidth']:.0%} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
