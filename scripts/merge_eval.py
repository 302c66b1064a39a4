"""Merge `pssr eval --json` reports of the same classifier, data and seed into one report.

Long evaluations run one defense at a time (each run is then short enough to finish inside a
session, and a defense's worst case only ever involves its own runs); this puts them back
together as one table, markdown file and plot:

    python scripts/merge_eval.py results/mnist-*.json --markdown results/mnist.md --plot results/mnist.png
"""

import argparse
import json
import sys

from pssr import report


def merge(docs: list[dict]) -> dict:
    first = docs[0]
    keys = ("dataset", "seed", "limit", "limit_expensive")
    for d in docs[1:]:
        if d["classifier"]["sha256"] != first["classifier"]["sha256"] or any(
                d["config"].get(k) != first["config"].get(k) for k in keys):
            sys.exit("merge_eval: the reports differ in classifier, data set, seed or limits")
    seen, clean, worst, by_norm, records = set(), [], [], [], []
    for d in docs:
        for c in d["clean"]:
            if c["defense"] in seen:
                continue
            clean.append(c)
            worst += [w for w in d["worst_case"] if w["defense"] == c["defense"]]
            by_norm += [w for w in d.get("worst_case_by_norm", []) if w["defense"] == c["defense"]]
            records += [r for r in d["records"] if r["defense"] == c["defense"]]
            seen.add(c["defense"])
    config = dict(first["config"])
    config["defenses"] = [c["defense"] for c in clean]
    config["threats"] = list(dict.fromkeys(t for d in docs for t in d["config"]["threats"]))
    config["attacks"] = list(dict.fromkeys(a for d in docs for a in d["config"]["attacks"]))
    return {**first, "config": config, "clean": clean, "worst_case": worst, "worst_case_by_norm": by_norm,
            "records": records, "seconds": sum(d["seconds"] for d in docs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--plot")
    args = ap.parse_args()
    doc = merge([json.load(open(p)) for p in args.reports])
    print(report.format_table(doc))
    if args.json:
        report.write_json(args.json, doc)
    if args.markdown:
        report.write_markdown(args.markdown, doc)
    if args.plot:
        report.write_plot(args.plot, doc)


if __name__ == "__main__":
    main()
