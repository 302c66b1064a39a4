"""The ablation table (markdown) from training-runs/ablation-<preset>/<arm>/{eval.json,log.jsonl}."""

import json
import sys
from pathlib import Path

ARMS = {
    "full": "nothing (the preset)",
    "no-pixel": "pixel L1 (`loss.pixel=0`)",
    "no-semantic": "CE + feature term (`loss.semantic=0`)",
    "no-feature": "feature term only (`loss.feature_beta=0`)",
    "no-rdrop": "adversarial R-drop (`loss.rdrop=0`)",
    "no-clean-path": "self-augmentation (`loss.clean_path=false`)",
}


def _final(log: Path) -> dict:
    """The run's closing record (steps, seconds), or {} while it is unfinished."""
    if not log.is_file():
        return {}
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return next((r for r in reversed(records) if r.get("final")), {})


def main(root: str) -> None:
    rows = []
    for arm, off in ARMS.items():
        path = Path(root) / arm / "eval.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        clean = doc["clean"][0]
        by_threat = {r["threat"]: r["robust_accuracy"] for r in doc["records"]}
        worst = doc["worst_case"][0]
        final = _final(Path(root) / arm / "log.jsonl")
        steps = final.get("steps", "?")
        seconds = f"{final['seconds']:.0f}" if "seconds" in final else "?"
        rows.append(f"| {arm} | {off} | {clean['accuracy']:.1%} | {by_threat.get('oblivious', float('nan')):.1%} | "
                    f"{by_threat.get('bpda', float('nan')):.1%} | {by_threat.get('mask-fixed', float('nan')):.1%} | "
                    f"{worst['robust_accuracy']:.1%} | {clean['n']} | {steps} | {seconds} |")
    print("| arm | term off | clean | PGD transfer | PGD BPDA | PGD mask-fixed | worst of these | test images "
          "| steps | train s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "training-runs/ablation-mnist")
