"""Reports of `pssr eval`: the terminal table, markdown, JSON and a PNG bar chart.

Every function takes the evaluation as its JSON document (``Result.to_json()``, or the same
document read back from a ``--json`` file), so a report can be redrawn without rerunning anything.
Files are written atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import io
import json
import math
import textwrap

from pssr.checkpoint import atomic_write

THREAT_NOTES = {
    "oblivious": "adversarial examples made on the undefended classifier (made once per attack), then "
                 "purified and classified (transfer); for 'none' this is the white-box attack",
    "bpda": "attack on classifier(defense(x)): the real defense forward, straight-through (BPDA) backward "
            "for non-differentiable defenses; gradient-free attacks query the defended model",
    "mask-fixed": "PSSR: the surgery's own gradient (1 - mask, the mask held fixed), through the regenerator and f",
    "soft-mask": "PSSR: the surgery threshold relaxed to a sigmoid and differentiated through the saliency "
                 "gradient itself (full adaptive attack)",
    "eot": "randomized defenses only: gradients averaged over {eot} draws of the defense (EOT), with BPDA",
}


def _doc(result) -> dict:
    return result if isinstance(result, dict) else result.to_json()


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _num(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


# The expensive sparse attacks, named in the header when they ran (on the first M images).
_SPARSE_NAMES = (("sparse-rs", "Sparse-RS"), ("onepixel", "OnePixel"), ("one-pixel", "OnePixel"), ("pixle", "Pixle"),
                 ("jsma", "JSMA"), ("sparsefool", "SparseFool"), ("sparse-fool", "SparseFool"),
                 ("adversarial-patch", "AdversarialPatch"), ("art-patch", "AdversarialPatch"),
                 ("universal-patch", "AdversarialPatch"))


def _header(doc: dict) -> list[str]:
    c, k = doc["config"], doc["classifier"]
    n, m = c.get("n"), c.get("n_expensive")
    threats = {"eot": "EOT", "soft-mask": "soft-mask"}
    sparse = list(dict.fromkeys(label for prefix, label in _SPARSE_NAMES
                                if any(str(a).lower().startswith(prefix) for a in c.get("attacks", []))))
    expensive = ", ".join(["AutoAttack", "Square", *sparse, *(threats[t] for t in c.get("expensive_threats", ["eot"])),
                           *c.get("expensive_defenses", [])])
    return [
        f"pssr eval · {k.get('arch')} classifier {k.get('path')} (weights sha256 {str(k.get('sha256'))[:12]})",
        f"classifier: {training_label(k.get('extra') or {})}" + (
            f"; randomized-ablation base classifier (trained on {k['ablation'].get('keep')} kept pixels per image)"
            if isinstance(k.get("ablation"), dict) and k["ablation"] else ""),
        f"data: {c.get('dataset')} test, first {n} images ({expensive}: first {m}) · seed {doc['seed']} · "
        f"torch {c.get('torch')}, {c.get('threads')} thread(s)",
    ]


def training_label(extra: dict) -> str:
    """How the classifier was trained and its clean test accuracy, from its checkpoint's record."""
    t = extra.get("training") if isinstance(extra.get("training"), dict) else {}
    method = t.get("method", "standard")
    if method == "standard":
        what = "standard training" if t else "standard training (its checkpoint records no adversarial training)"
    else:
        eps = t.get("eps")
        eps_text = f"{eps * 255:.3g}/255" if isinstance(eps, (int, float)) and eps < 0.1 else f"{eps}"
        steps = t.get("steps")
        what = (f"robust: adversarially trained ({method}, {str(t.get('norm', 'linf')).replace('linf', 'L∞')} "
                f"ε = {eps_text}" + (f", {steps} step(s)" if steps else "") + ")")
    acc = extra.get("test_accuracy")
    if isinstance(acc, (int, float)):
        what += f"; clean test accuracy {acc:.2%} on {extra.get('test_images', '?')} images (its checkpoint)"
    return what


def _run_rows(doc: dict) -> list[tuple]:
    rows = []
    for r in doc["records"]:
        rows.append((r["defense"], r["attack_label"], r["threat"], str(r["n"]), _pct(r["robust_accuracy"]),
                     _num(r["mean_linf"]), _num(r["mean_l2"]), _num(r.get("mean_l0")), f"{r['seconds']:.1f}"))
    return rows


def _defense_rows(doc: dict) -> list[tuple]:
    worst = {w["defense"]: w for w in doc["worst_case"]}
    rows = []
    for c in doc["clean"]:
        w = worst.get(c["defense"])
        rows.append((
            c["defense"], str(c["n"]), _pct(c["accuracy"]),
            *((str(w["n"]), _pct(w["robust_accuracy"]), str(w.get("runs", "-"))) if w else ("-", "-", "-")),
        ))
    return rows


RUN_HEAD = ("defense", "attack", "threat", "n", "robust acc", "mean L∞", "mean L2", "mean L0", "seconds")
DEFENSE_HEAD = ("defense", "n", "clean acc", "n", "worst case", "runs")


def _notes(doc: dict) -> list[str]:
    threats = doc["config"].get("threats", list(THREAT_NOTES))
    eot = doc["config"].get("eot", "N")
    lines = [f"{t}: {THREAT_NOTES[t].format(eot=eot)}" for t in threats if t in THREAT_NOTES]
    return lines + [
        "robust acc: correct on the clean image and on its adversarial example (CW, DeepFool: or the attack "
        "needed a perturbation larger than the preset's eps); seconds: attack + classification (oblivious rows "
        "include the one shared attack run); mean L0: changed pixels (a pixel counts once whatever its channels; "
        "'-' for runs resumed from a --state file older than L0).",
        "worst case: an image counts only if it is correct clean and survives every attack under every threat "
        "model that ran on it; over the first n images, which all of that defense's runs saw.",
    ] + certificate_notes(doc) + chance_warnings(doc) + eps_warnings(doc)


CERTIFIED_AT = (1, 5, 10, 20)  # radii (changed pixels) at which the notes give certified accuracy


def certificate_notes(result) -> list[str]:
    """Per certifying defense (randomized ablation), its certified L0 radius beside the accuracies."""
    doc = _doc(result)
    out = []
    for c in doc["clean"]:
        radii = c.get("certified_l0")
        if not radii:
            continue
        at = ", ".join(f"ρ ≥ {r}: {_pct(sum(v >= r for v in radii) / len(radii))}" for r in CERTIFIED_AT)
        out.append(f"{c['defense']}: certified L0 radius (Levine and Feizi 2020: changed pixels, any channels, that "
                   f"provably cannot change its vote at confidence 1 - alpha; -1 = a wrong vote; its attacks differentiate "
                   f"or query the soft vote over attack_n draws) median "
                   f"{c.get('certified_l0_median')} on {len(radii)} images; certified accuracy at {at}")
    return out


NEAR_CHANCE = 1.5  # clean accuracy at most this many times chance (1 / classes) gets a warning


def chance_warnings(result) -> list[str]:
    """A classifier near chance on clean images (untrained, the wrong data set, a defense that destroys
    the image) makes every robust number meaningless: an image counts as robust only if it is right
    clean, so they are all bounded by a near-chance one, and a few lucky images look like robustness.
    Where a defense's clean accuracy is at most NEAR_CHANCE / classes, the report says so."""
    doc = _doc(result)
    classes = doc["classifier"].get("num_classes")
    if not isinstance(classes, int) or classes < 2:
        return []
    chance = 1 / classes
    out = []
    for c in doc["clean"]:
        if c["accuracy"] > NEAR_CHANCE * chance + 1e-9:
            continue
        near = f"near chance (1/{classes} = {_pct(chance)}) on {c['n']} images"
        if c["defense"] == "none":
            out.append(f"warning: the classifier's own clean accuracy is {_pct(c['accuracy'])}, {near}: every robust "
                       f"accuracy in this report means nothing. Is it trained, and for this data set?")
        else:
            out.append(f"warning: {c['defense']}: clean accuracy {_pct(c['accuracy'])} behind this defense, {near}: "
                       f"its robust accuracies mean nothing")
    return out


def eps_warnings(result) -> list[str]:
    """A check from the attack-evaluation checklist: robust accuracy must not rise with ε, since every
    smaller-ε perturbation is also a larger-ε one. Where it does (same defense, threat model, attack
    and norm, same images; by at least 2 images and 1 point) the attack is too weak at the larger ε,
    and the report says so: that run overestimates the defense, and the smaller value bounds it."""
    from pssr.attacks import parse_attack

    doc = _doc(result)
    dataset = doc["config"].get("preset_dataset") or doc["config"]["dataset"]
    groups: dict = {}
    for r in doc["records"]:
        spec = parse_attack(r["attack"], dataset)
        groups.setdefault((r["defense"], r["threat"], spec.name, spec.norm, r["n"]), []).append((spec.eps, r))
    out = []
    for (defense, threat, _, _, n), runs in groups.items():
        runs.sort(key=lambda e: e[0])
        for i, (eps_hi, hi) in enumerate(runs):
            lower = [lo for eps_lo, lo in runs[:i] if eps_lo < eps_hi]
            if not lower:
                continue
            lo = min(lower, key=lambda r: r["robust_accuracy"])
            rise = hi["robust_accuracy"] - lo["robust_accuracy"]
            if rise >= 0.01 and rise * n >= 2 - 1e-9:
                out.append(f"warning: {defense}, {threat}: {hi['attack_label']} leaves {_pct(hi['robust_accuracy'])} "
                           f"but {lo['attack_label']} only {_pct(lo['robust_accuracy'])}; robust accuracy rose with "
                           f"eps, so the attack is too weak at the larger eps and overestimates the defense there "
                           f"(the smaller number bounds it; the worst case counts both)")
    return out


def _table(head: tuple, rows: list[tuple], left: int) -> list[str]:
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = []
    for row in [head, *rows]:
        cells = [v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_table(result) -> str:
    """What `pssr eval` prints: header, one row per run, one per defense, and the notes."""
    doc = _doc(result)
    lines = _header(doc) + [""]
    lines += _table(RUN_HEAD, _run_rows(doc), left=3) if doc["records"] else ["(no attack runs)"]
    lines += [""] + _table(DEFENSE_HEAD, _defense_rows(doc), left=1) + [""] + _notes(doc)
    return "\n".join(lines)


def _md_table(head: tuple, rows: list[tuple], left: int) -> list[str]:
    def esc(v: str) -> str:
        return v.replace("|", "\\|")

    align = ["---" if i < left else "---:" for i in range(len(head))]
    return ["| " + " | ".join(map(esc, row)) + " |" for row in [head, align, *rows]]


NORM_GROUPS = {"Linf": "L∞", "L2": "L2", "L0": "L0", "patch": "patch"}  # the summary's threat-model groups, in order


def attack_norms(result) -> dict[str, str]:
    """Attack label -> its threat model (attacks.AttackSpec.norm; "" for one this pssr cannot read)."""
    from pssr.attacks import AttackError, parse_attack

    doc = _doc(result)
    dataset = doc["config"].get("preset_dataset") or doc["config"].get("dataset") or ""
    out: dict[str, str] = {}
    for r in doc["records"]:
        if r["attack_label"] not in out:
            try:
                out[r["attack_label"]] = parse_attack(r["attack"], dataset).norm
            except AttackError:
                out[r["attack_label"]] = ""
    return out


def _grouped(doc: dict, attacks: list[str]) -> list[tuple[str, list[str]]]:
    """The attacks in threat-model groups (L∞, L2, L0, patch, then any other), each in its order."""
    norms = attack_norms(doc)
    order = [*NORM_GROUPS, *dict.fromkeys(n for n in norms.values() if n not in NORM_GROUPS)]
    groups = [(g, [a for a in attacks if norms.get(a, "") == g]) for g in order]
    return [(g, labels) for g, labels in groups if labels]


def summary_rows(result) -> tuple[tuple, list[tuple]]:
    """(head, rows) of the compact view: one row per attack (plus clean and worst case), one column
    per defense; a cell is "oblivious / strongest other threat model (its name)", so a defense's
    non-adaptive number never stands without its adaptive one. With attacks of more than one threat
    model, they come in groups (L∞, L2, L0, patch), each closed by its per-example worst case."""
    doc = _doc(result)
    defenses = [c["defense"] for c in doc["clean"]]
    attacks = list(dict.fromkeys(r["attack_label"] for r in doc["records"]))
    groups = _grouped(doc, attacks)
    by_norm = {(w["defense"], w["norm"]): w for w in doc.get("worst_case_by_norm", [])}
    cells: dict = {}
    for r in doc["records"]:
        cells.setdefault((r["defense"], r["attack_label"]), []).append(r)
    n = doc["clean"][0]["n"]  # the evaluation's image count; cells on fewer images say so
    rows = [("clean", *(_pct(c["accuracy"]) + (f" (n={c['n']})" if c["n"] != n else "") for c in doc["clean"]))]
    if any(c.get("certified_l0") for c in doc["clean"]):  # randomized ablation: its certificate beside its accuracy
        rows.append(("certified L0 radius, median (pixels)", *(
            str(c["certified_l0_median"]) if c.get("certified_l0") else "–" for c in doc["clean"])))
    closing = {}  # last attack of a group -> the group's worst-case row
    if len(groups) > 1:
        for norm, labels in groups:
            closing[labels[-1]] = (f"*worst case, {NORM_GROUPS.get(norm, norm or 'other')} attacks, per example*", *(
                f"*{_pct(by_norm[(d, norm)]['robust_accuracy'])}* (n={by_norm[(d, norm)]['n']})"
                if (d, norm) in by_norm else "–" for d in defenses))
        attacks = [a for _, labels in groups for a in labels]
    for label in attacks:
        ns = {r["n"] for d in defenses for r in cells.get((d, label), [])}
        row = [label + (f" (n={min(ns)})" if len(ns) == 1 and min(ns) != n else "")]
        for d in defenses:
            runs = cells.get((d, label), [])
            oblivious = [r for r in runs if r["threat"] == "oblivious"]
            others = [r for r in runs if r["threat"] != "oblivious"]
            text = _pct(oblivious[0]["robust_accuracy"]) if oblivious else "–"
            if others:
                worst = min(others, key=lambda r: r["robust_accuracy"])
                n_note = f", n={worst['n']}" if oblivious and worst["n"] != oblivious[0]["n"] else ""
                text += f" / {_pct(worst['robust_accuracy'])} ({worst['threat']}{n_note})"
            row.append(text)
        rows.append(tuple(row))
        if label in closing:
            rows.append(closing[label])
    worst = {w["defense"]: w for w in doc["worst_case"]}
    rows.append(("**worst case, per example**", *(
        f"**{_pct(worst[d]['robust_accuracy'])}** (n={worst[d]['n']})" if d in worst else "–" for d in defenses)))
    return ("attack", *defenses), rows


def format_markdown(result) -> str:
    """The same report as markdown: header, summary, robust-accuracy table, per-defense table, notes."""
    doc = _doc(result)
    lines = ["# pssr eval", ""] + [f"{h}  " for h in _header(doc)] + ["", "## Summary", ""]
    head, rows = summary_rows(doc)
    lines += _md_table(head, rows, left=1) + ["", "Cells: robust accuracy under the oblivious (transfer) attack / "
                                                "under the strongest other threat model that ran (named)."
                                                + (" Attacks are grouped by threat model (L∞, L2, L0 pixels, patch), "
                                                   "each group closed by its per-example worst case."
                                                   if any(r[0].startswith("*worst case,") for r in rows) else "")]
    lines += ["", "## Robust accuracy per attack", ""]
    lines += _md_table(RUN_HEAD, _run_rows(doc), left=3) if doc["records"] else ["(no attack runs)"]
    lines += ["", "## Clean accuracy and per-example worst case", ""]
    lines += _md_table(DEFENSE_HEAD, _defense_rows(doc), left=1)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in _notes(doc)]
    return "\n".join(lines) + "\n"


def _write(path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def write_json(path, result) -> None:
    _write(path, (json.dumps(_doc(result), indent=2, allow_nan=False) + "\n").encode())


def write_markdown(path, result) -> None:
    _write(path, format_markdown(result).encode())


def plot_data(result) -> tuple[list[str], list[str], dict]:
    """(defenses, bars, {(defense, bar): robust accuracy}): per attack its strongest threat model
    (the lowest robust accuracy over threats), then the per-example worst case."""
    doc = _doc(result)
    defenses = [c["defense"] for c in doc["clean"]]
    attacks = list(dict.fromkeys(r["attack_label"] for r in doc["records"]))
    values: dict = {}
    for r in doc["records"]:
        key = (r["defense"], r["attack_label"])
        values[key] = min(values.get(key, math.inf), r["robust_accuracy"])
    for c in doc["clean"]:
        values[(c["defense"], "clean")] = c["accuracy"]
    for w in doc["worst_case"]:
        values[(w["defense"], "worst case")] = w["robust_accuracy"]
    return defenses, ["clean", *attacks, "worst case"], values


def _tick(defense: str) -> str:
    """'tvm:prob=0.3,norm=2' -> 'tvm' over its parameters, wrapped."""
    name, _, params = defense.partition(":")
    return name + ("\n" + "\n".join(textwrap.wrap(params.replace(",", ", "), 20)) if params else "")


def render_plot(result) -> bytes:
    """A grouped bar chart (PNG bytes), drawn with matplotlib's Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    doc = _doc(result)
    defenses, bars, values = plot_data(doc)
    width = 0.8 / max(1, len(bars))
    fig = Figure(figsize=(max(6.0, 1.2 + len(defenses) * (0.35 * len(bars) + 0.5)), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for j, bar in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(defenses))]
        ys = [100 * values.get((d, bar), math.nan) for d in defenses]
        style = {}
        if bar == "clean":
            style = dict(color="0.8", edgecolor="0.5")
        elif bar == "worst case":
            style = dict(color="0.15", hatch="//", edgecolor="white")
        ax.bar(xs, ys, width, label=bar, **style)
    ax.set_xticks(range(len(defenses)), [_tick(d) for d in defenses], fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    c = doc["config"]
    ax.set_title(f"{c.get('dataset')}: robust accuracy per attack (its strongest threat model)\n"
                 f"n={c.get('n')} (expensive runs {c.get('n_expensive')}), seed {doc['seed']}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # room for the outside legend and the title
    return buf.getvalue()


def write_plot(path, result) -> None:
    _write(path, render_plot(result))
