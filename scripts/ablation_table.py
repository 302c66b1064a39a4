"""The ablation table (markdown) from runs/ablation-<preset>/<arm>/eval.json files."""

import json
import sys
from pathlib import Path

ARMS = ["full", "no-pixel", "no-semantic", "no-feature", "no-rdrop", "no-clean-path"]


def main(root: str) -> None:
    rows = []
    for arm in ARMS:
        path = Path(root) / arm / "eval.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        clean = doc["clean"][0]
        by_threat = {r["threat"]: r["robust_accuracy"] for r in doc["records"]}
        worst = doc["worst_case"][0]
        rows.append(f"| {arm} | {clean['accuracy']:.1%} | {by_threat.get('oblivious', float('nan')):.1%} | "
                    f"{by_threat.get('bpda', float('nan')):.1%} | {by_threat.get('mask-fixed', float('nan')):.1%} | "
                    f"{worst['robust_accuracy']:.1%} | {clean['n']} |")
    print("| arm | clean | PGD transfer | PGD BPDA | PGD mask-fixed | worst of these | n |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/ablation-mnist")
