"""The attacks `pssr eval` runs: torchattacks attacks behind one small, checked interface.

An attack is an :class:`AttackSpec`: a registry name, the threat model (norm, ε) and the exact
torchattacks keyword arguments, frozen and hashable. :func:`preset` gives the field's settings
for a data set (DESIGN.md §5), :func:`parse_attack` reads ``"pgd:eps=8/255,steps=10"`` from a
command line, :func:`run_attack` runs one on a model that takes images in [0, 1] (every pssr
model does: normalisation is its first layer, so no normalisation is passed to torchattacks),
and :func:`robust_mask` decides which examples survived.

The attacks are torchattacks' own (none is re-implemented here). What this module adds around
them, because the library does not do it (torchattacks 3.5.1):

* Determinism and no side effects: APGD, APGD-T, FAB and Square reseed the *global* torch RNG,
  and every attack switches the whole model to eval mode; here each batch is seeded from
  ``(seed, first index)`` inside :func:`torch.random.fork_rng`, so the caller's RNG state, the
  train/eval flag of every sub-module, the parameters' ``requires_grad`` and the grad mode are
  all as they were afterwards. The parameters are frozen during the attack (CW and DeepFool call
  ``backward()``, which would otherwise fill the model's ``.grad``).
* Output checks: x_adv is float, in [0, 1], finite (an example whose attack produced NaN/Inf,
  as DeepFool can on a flat logit, is returned unperturbed), and for norm-bounded attacks inside
  the ε-ball (projected, with a logged warning, if an attack ever overshoots).
* torchattacks' ``print`` calls go to the debug log instead of stdout.
* CW-L2: torchattacks maps pixels at exactly 0 or 1 to w = ±inf in tanh space, where they can
  never move (80% of an MNIST image); the subclass here uses the original's 1 - 1e-6 margin.
* DeepFool: torchattacks clamps every iterate to [0, 1] and stalls short of the boundary when
  the step points out of the box (MNIST's black background); here the clamp is moved into the
  model and the perturbation accumulates unclamped, as in Foolbox (see :class:`_BoxInModel`).
* AutoAttack: torchattacks' ``AutoAttack(version="standard")`` builds APGD-CE, APGD-T and FAB-T
  with 10 iterations and ``n_classes - 1`` target classes, where the original standard
  AutoAttack (Croce & Hein 2020) uses 100 iterations and 9 target classes. The preset sets the
  original values on the sub-attacks (``steps=100, n_target_classes=9, n_queries=5000``); the
  label says "non-standard" when they are overridden.

Sparse-RS (``sparse-rs``: at most k changed pixels, the L0 threat model; ``sparse-rs-patch``: one
Sparse-RS (``sparse-rs``: at most k changed pixels, the L0 threat model; ``sparse-rs-patch``: one
s×s patch) is not in torchattacks; it is written from its paper in :mod:`pssr.attacks.sparse_rs`, in
the shape of torchattacks' Square. Its ``eps`` is k (pixels) or s (the patch side). Its output is
never projected: one over its budget is a bug, and :func:`run_attack` raises.

The libraries' sparse attacks (issue 17): torchattacks' OnePixel (``onepixel``: exactly k = ``eps``
pixels by its own parameter, checked like Sparse-RS), Pixle, JSMA and SparseFool (``pixle``, ``jsma``,
``sparsefool``: no pixel budget of their own, they stop once the label flips, so minimal-norm in L0),
and ART's AdversarialPatchPyTorch as one universal patch per batch (``adversarial-patch``,
:mod:`.art_patch`). OnePixel's differential evolution and Pixle draw from numpy's global RNG: run_attack
seeds it per batch and restores it, as it does torch's. JSMA and SparseFool draw nothing.

Minimal-norm attacks (CW-L2, DeepFool; in L0 Pixle, JSMA, SparseFool) are not bounded: they look for
a small perturbation that flips the label. Their x_adv is returned as found (never clipped to ε),
and an example counts as robust if the attack fails or needs ‖δ‖ > ε in the attack's norm (L2; L0:
changed pixels), the preset's robustness radius (DESIGN.md §9).

The package: :mod:`.spec` (AttackSpec, labels, the norms table and the measures of x_adv − x),
:mod:`.registry` (the rows, their factories and presets, parse_attack), :mod:`.run` (run_attack,
robust_mask), :mod:`.fixes` (the CW and DeepFool quirk fixes), :mod:`.sparse_rs` (Sparse-RS),
:mod:`.art_patch` (ART's universal patch). Only torch and numpy are imported here; torchattacks and
ART on an attack's first run.
"""

from __future__ import annotations

from .registry import (
    ATTACKS,
    EXPENSIVE_ATTACKS,
    SPARSE_RS_QUERIES,
    SQUARE_QUERIES,
    TRAINABLE_ATTACKS,
    default_attacks,
    library_sparse_attacks,
    parse_attack,
    preset,
    sparse_attacks,
)
from .run import _batch_seed, robust_mask, run_attack  # _batch_seed: tests/test_adapters.py
from .spec import CHANGED, NORMS, SPARSE_NORMS, AttackError, AttackSpec, Norms, budget_norm, patch_side, perturbation_norms
from .spec import _fmt_eps  # pssr.figures

__all__ = [
    "ATTACKS",
    "CHANGED",
    "EXPENSIVE_ATTACKS",
    "NORMS",
    "SPARSE_NORMS",
    "SPARSE_RS_QUERIES",
    "SQUARE_QUERIES",
    "TRAINABLE_ATTACKS",
    "AttackError",
    "AttackSpec",
    "Norms",
    "budget_norm",
    "default_attacks",
    "library_sparse_attacks",
    "parse_attack",
    "patch_side",
    "perturbation_norms",
    "preset",
    "robust_mask",
    "run_attack",
    "sparse_attacks",
]

