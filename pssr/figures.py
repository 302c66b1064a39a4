"""Figures for evaluation reports: what PSSR does to attacked images, and robust accuracy against ε.

Pure functions over plain data (numpy arrays or tensors with values in [0, 1]), drawn on
matplotlib's Agg canvas (no pyplot, no display) and written atomically, like `pssr.report`'s files:

* :func:`example_grid` — per attack one row; per example image four panels: clean, adversarial,
  surgered (removed pixels in red) and regenerated, each titled with the classifier's prediction
  and the true label (green when they agree, red when not). Every panel is PANEL_PX pixels, so
  the PNG is ``4 k · 140`` by ``rows · 180`` pixels for ``k`` images per row.
* :func:`eps_curve` — robust accuracy (%) against ε, one line per defense; EPS_PX pixels.

:func:`example_row` computes one row from a purifier and a batch; :func:`curves_from_result` reads
the curves from an evaluation's JSON document (``pssr eval`` run with PGD at several ε).
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from .attacks import _fmt_eps, parse_attack
from .checkpoint import atomic_write
from .purifier import PssrDefense, Purifier

Array = Union[np.ndarray, torch.Tensor]
STAGES = ("clean", "adversarial", "surgered", "regenerated")
DPI = 80
PANEL_IN = (1.75, 2.25)  # one example panel with its title: 140 x 180 px at DPI
EPS_IN, EPS_DPI = (6.0, 4.0), 100  # eps_curve: 600 x 400 px
PANEL_PX = (round(PANEL_IN[0] * DPI), round(PANEL_IN[1] * DPI))
EPS_PX = (round(EPS_IN[0] * EPS_DPI), round(EPS_IN[1] * EPS_DPI))
REMOVED_RGB = (0.9, 0.1, 0.1)  # removed pixels on the surgered panels


@dataclass
class Stage:
    """k images at one stage of the defense, and the classifier's prediction on each."""

    images: Array  # (k, C, H, W) or (k, H, W), values in [0, 1]
    preds: Sequence[int]


@dataclass
class ExampleRow:
    """One attack's examples: k images through the four stages, with their true labels."""

    attack: str  # the row's label, e.g. AttackSpec.label()
    labels: Sequence[int]
    clean: Stage
    adversarial: Stage
    surgered: Stage
    regenerated: Stage
    mask: Array | None = None  # (k, 1, H, W) or (k, H, W), True = removed: drawn in red when given

    def stages(self) -> list[Stage]:
        return [self.clean, self.adversarial, self.surgered, self.regenerated]


@dataclass
class Curve:
    """One defense's robust accuracy (in [0, 1]) at each ε."""

    defense: str
    eps: Sequence[float]
    accuracy: Sequence[float]


# --------------------------------------------------------------------------------------------
# Computing the panels


def example_row(model: Purifier | PssrDefense, attack: str, x: torch.Tensor, x_adv: torch.Tensor,
                y: Sequence[int]) -> ExampleRow:
    """Purify ``x_adv`` and classify each stage with the purifier's own classifier.

    ``model`` is a Purifier or a bound PssrDefense; ``x``, ``x_adv`` are (k, C, H, W) in [0, 1].
    """
    p = model.purifier if isinstance(model, PssrDefense) else model
    if p is None:
        raise ValueError("figures: the pssr defense has no purifier yet (call bind first)")
    with torch.no_grad():
        res = p.purify(x_adv)
        images = (x, x_adv, res.x_s, res.x_hat)
        preds = p.classifier(torch.cat(images)).argmax(1).view(len(images), -1).tolist()
    clean, adversarial, surgered, regenerated = (Stage(a.detach().cpu(), q) for a, q in zip(images, preds))
    return ExampleRow(attack, [int(v) for v in y], clean, adversarial, surgered, regenerated, res.mask.detach().cpu())


def curves_from_result(result, attack: str = "pgd") -> list[Curve]:
    """Per defense, robust accuracy against ε from an evaluation (``Result`` or its JSON document).

    Every run of ``attack`` counts (``pgd:eps=…`` given several times); at each ε the strongest
    threat model (the lowest accuracy) is kept, as in the report's bar chart. ε = 0 is the
    defense's clean accuracy; defenses that no run of ``attack`` saw are left out.
    """
    doc = result if isinstance(result, dict) else result.to_json()
    dataset = doc["config"].get("preset_dataset") or doc["config"]["dataset"]
    points: dict[str, dict[float, float]] = {c["defense"]: {0.0: c["accuracy"]} for c in doc["clean"]}
    for r in doc["records"]:
        spec = parse_attack(r["attack"], dataset)
        if spec.name == attack:
            at = points.setdefault(r["defense"], {})
            at[spec.eps] = min(at.get(spec.eps, math.inf), r["robust_accuracy"])
    return [Curve(d, sorted(at), [at[e] for e in sorted(at)]) for d, at in points.items() if len(at) > 1]


# --------------------------------------------------------------------------------------------
# Drawing


def _figure(size_in: tuple[float, float], dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_in, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _rgb(image: Array, mask: Array | None) -> np.ndarray:
    """(H, W, 3) floats for imshow: grey repeated to RGB, removed pixels painted REMOVED_RGB."""
    a = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    a = a[None] if a.ndim == 2 else a
    a = np.repeat(a, 3, 0) if a.shape[0] == 1 else a
    a = np.clip(a.transpose(1, 2, 0), 0, 1)
    if mask is not None:
        m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask).reshape(a.shape[:2])
        a[m.astype(bool)] = REMOVED_RGB
    return a


def _name(index: int, classes: Sequence[str]) -> str:
    return classes[index] if 0 <= index < len(classes) else str(index)


def example_figure(rows: Sequence[ExampleRow], classes: Sequence[str] = ()):
    """The example grid as a matplotlib Figure: len(rows) rows of 4 · k panels (k images per row)."""
    k = max((len(r.labels) for r in rows), default=0)
    if k == 0:
        raise ValueError("figures: no example images to draw")
    fig = _figure((4 * k * PANEL_IN[0], len(rows) * PANEL_IN[1]), DPI)
    axes = fig.subplots(len(rows), 4 * k, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(k):
            for s, (stage, name) in enumerate(zip(row.stages(), STAGES)):
                ax = axes[i, 4 * j + s]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(row.labels):
                    ax.set_axis_off()
                    continue
                mask = row.mask[j] if row.mask is not None and name == "surgered" else None
                ax.imshow(_rgb(stage.images[j], mask), interpolation="nearest", vmin=0, vmax=1)
                pred, label = int(stage.preds[j]), int(row.labels[j])
                ax.set_title(f"{name}\npred {_name(pred, classes)} (true {_name(label, classes)})", fontsize=7,
                             color="tab:green" if pred == label else "tab:red")
        axes[i, 0].set_ylabel("\n".join(textwrap.wrap(row.attack, 24)), fontsize=8)
    return fig


def eps_figure(curves: Sequence[Curve], title: str = ""):
    """Robust accuracy (%) against ε as a matplotlib Figure, one line per defense."""
    fig = _figure(EPS_IN, EPS_DPI)
    ax = fig.add_subplot()
    for c in curves:
        ax.plot(c.eps, [100 * a for a in c.accuracy], marker="o", label=c.defense)
    ticks = sorted({float(e) for c in curves for e in c.eps})
    ax.set_xticks(ticks, [_fmt_eps(e) if e else "0" for e in ticks], fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_xlabel("ε (0: clean accuracy)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(title or "robust accuracy against ε", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    return fig


def save(fig, path) -> None:
    """Write the figure as a PNG atomically, at its own size (no tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")

    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(buf.getvalue())

    atomic_write(path, write)


def example_grid(rows: Sequence[ExampleRow], path, classes: Sequence[str] = ()) -> None:
    """Write :func:`example_figure` to ``path`` (PNG, 4 · k · 140 by len(rows) · 180 pixels)."""
    save(example_figure(rows, classes), path)


def eps_curve(curves: Sequence[Curve], path, title: str = "") -> None:
    """Write :func:`eps_figure` to ``path`` (PNG, 600 by 400 pixels)."""
    save(eps_figure(curves, title), path)
