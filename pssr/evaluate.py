"""The evaluation pipeline behind `pssr eval`: clean and robust accuracy of defended classifiers.

Recipe (DESIGN.md §2.3, §5, §6, §8, §9 "Evaluation"):

1. Load the frozen classifier and the first ``limit`` test images of its data set (the first N,
   as papers report; the expensive runs use the first ``limit_expensive`` of those N).
2. For every defense, its clean accuracy: ``classifier(defense.purify(x))``.
3. For every attack and threat model, the adversarial examples and which of them the defended
   classifier still gets right, tagged with the threat model:

   ``oblivious``  (transfer) the attack sees the undefended classifier only. Its adversarial
                  examples are made once per attack and reused for every defense, then purified
                  and classified. For the defense ``none`` this *is* the white-box attack.
   ``bpda``       the attack sees ``DefendedModel(classifier, defense)``: the real defense in the
                  forward pass, the straight-through (BPDA) backward for a non-differentiable one.
                  Gradient-free attacks query the defended model directly. Not run for ``none``
                  (it would repeat ``oblivious``).
   ``mask-fixed`` for defenses that offer it (PSSR), gradient-based attacks only: the surgery's
                  own gradient, ∂x_s/∂x = 1 − mask (mask held fixed), through G and f.
   ``soft-mask``  likewise: the hard surgery threshold replaced by a sigmoid and differentiated
                  through the saliency gradient itself (the full adaptive attack). Expensive.
   ``eot``        for randomized defenses only, and gradient-based attacks only: the gradient of
                  the logits averaged over ``eot`` draws of the defense (plus BPDA).

4. Per defense, the per-example worst case: an image counts as robust only if it is classified
   correctly clean and survives every attack under every threat model that ran on it.

Randomized ablation (``ablation:keep=K,n=N``, pssr/ablation.py) classifies by its vote
(``Defense.classify``; the attacker differentiates its soft vote, ``Defense.attack_logits``), and its
clean pass also certifies each image: the certified L0 radius (-1 for a wrong vote) is kept with the
clean scoring and reported beside the accuracies. A classifier trained for it (its checkpoint's
``ablation`` record) is evaluated behind that defense only.

An image counts as robust in a row when the defended classifier gets it right clean *and*
``attacks.robust_mask`` says it survived (for minimal-norm attacks, CW and DeepFool, that rule also
accepts a perturbation larger than the preset's ε). So every row's robust accuracy is at most the
clean accuracy of its defense on the same images.

Sizes: ``limit`` images (default 1000) for clean accuracy and the cheap attacks; the first
``limit_expensive`` of them (default 200) for AutoAttack, Square, Sparse-RS, every EOT run and every run of the
TV-minimisation defense (DESIGN.md §9). Every record states its n; a defense's worst case is taken
over the first n images that all of its runs saw.

Determinism: every run — an attack on one (defense, threat), or the classification of one defense —
is seeded from (seed, its names) with ``torch.manual_seed`` (and numpy's generator, which ART's
random defenses use), so results on the CPU are identical for a given ``seed`` whatever else runs.
A random defense classifies with one draw from its own fixed seed.

Resuming (``state_path``, ``pssr eval --state FILE``): after every finished unit — one clean pass,
or one attack run with its scorings — the state file gets what the report needs from it: per
scoring, which examples survived and their perturbation norms, and its seconds. A rerun with the
same file replays the finished units and runs the rest, so its report equals an uninterrupted
run's (apart from the total ``seconds``: a rerun counts only its own time). The file is written
atomically, so an interruption leaves the units finished so far; it also holds the options that
change a number, and a rerun with other options is refused rather than mixed in.

The pipeline returns plain records; ``pssr.report`` formats and writes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import pssr
from pssr import attacks, checkpoint, classifiers, figures, report
from pssr.checkpoint import weights_sha256
from pssr.data import dataset_key, load_dataset
from pssr.errors import first_line
from pssr.defenses import DefendedModel, Defense, DefenseError, parse_defense
from pssr.purifier import PssrDefense

THREATS: tuple[str, ...] = ("oblivious", "bpda", "mask-fixed", "soft-mask", "eot")
# Threat models that are a way of differentiating the defense: threat -> Defense.attack_gradients entry.
GRADIENT_THREATS: dict[str, str] = {"bpda": "bpda", "mask-fixed": "mask-fixed", "soft-mask": "soft"}
EXPENSIVE_THREATS = frozenset({"eot", "soft-mask"})
DEFAULT_DEFENSES: tuple[str, ...] = ("none", "jpeg", "bit-depth:bits=4", "bit-depth:bits=1", "median", "tvm", "pssr")
# Runs on only the first `limit_expensive` images (DESIGN.md §9): these attacks, these defenses, EOT.
EXPENSIVE_ATTACKS = attacks.EXPENSIVE_ATTACKS  # the registry rows marked expensive: AutoAttack, Square, Sparse-RS
# The expensive attacks before Sparse-RS: a state file records the others only when they run (see defining_options).
_FIRST_EXPENSIVE = frozenset({"autoattack", "square"})
EXPENSIVE_DEFENSES = frozenset({"tvm"})
SUBSET_RULE = "first N test images (expensive runs: the first M of them)"


class EvalError(Exception):
    """A bad configuration or a failed run, as one line for the user."""


@dataclass
class Config:
    """What to evaluate. Empty ``attacks`` means ``attacks.default_attacks(dataset)``."""

    classifier: str
    dataset: str | None = None  # default: the one named in the classifier checkpoint
    data_root: str | None = None  # default: $PSSR_DATA_ROOT
    defenses: tuple[str, ...] = DEFAULT_DEFENSES
    attacks: tuple[str, ...] = ()
    threats: tuple[str, ...] = THREATS
    limit: int = 1000
    limit_expensive: int = 200
    eot: int = 8
    seed: int = 0
    batch_size: int = 256
    # Run the classifier (and PSSR's saliency step) with each BatchNorm folded into its convolution,
    # channels-last: the same function up to float rounding, ~1.6x faster on the CPU
    # (benchmarks/fold_batchnorm.py: LeNet and ResNet-9, forward+backward).
    fold_batchnorm: bool = False


@dataclass
class Record:
    """One (defense, attack, threat) run."""

    defense: str
    attack: str  # as given (e.g. "pgd" or "pgd:steps=10")
    attack_label: str  # attacks.AttackSpec.label(): the full settings
    threat: str
    n: int
    robust_accuracy: float
    mean_linf: float
    mean_l2: float
    mean_l0: float | None  # changed pixels (any channel); None for a --state run stored before pssr kept L0
    seconds: float  # oblivious: includes the shared attack run on the undefended classifier


@dataclass
class Clean:
    defense: str
    n: int
    accuracy: float
    # a certifying defense (randomized ablation): per example its certified L0 radius (-1: a wrong
    # prediction), and their (lower) median; None for the others
    certified_l0: list[int] | None = None
    certified_l0_median: int | None = None


@dataclass
class WorstCase:
    defense: str
    n: int
    robust_accuracy: float
    runs: int  # how many (attack, threat) runs the worst case is taken over


@dataclass
class NormWorstCase(WorstCase):
    """The per-example worst case over the runs of one threat model's attacks."""

    norm: str = ""  # attacks.AttackSpec.norm: Linf, L2, L0 or patch


@dataclass
class Result:
    config: dict
    classifier: dict
    seed: int
    records: list[Record] = field(default_factory=list)
    clean: list[Clean] = field(default_factory=list)
    worst_case: list[WorstCase] = field(default_factory=list)
    worst_case_by_norm: list[NormWorstCase] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "config": self.config,
            "classifier": self.classifier,
            "records": [dataclasses.asdict(r) for r in self.records],
            "clean": [dataclasses.asdict(c) for c in self.clean],
            "worst_case": [dataclasses.asdict(w) for w in self.worst_case],
            "worst_case_by_norm": [dataclasses.asdict(w) for w in self.worst_case_by_norm],
            "seed": self.seed,
            "seconds": self.seconds,
        }


@dataclass
class Scored:
    """One scoring as the state file keeps it: enough to rebuild its Record and worst-case share.

    ``robust`` is per example (for a clean pass: classified correctly); the norms are None for a
    clean pass."""

    defense: str
    threat: str  # or "clean"
    robust: torch.Tensor  # bool, (n,)
    linf: torch.Tensor | None = None  # float64, (n,)
    l2: torch.Tensor | None = None
    seconds: float = 0.0
    l0: torch.Tensor | None = None  # float64 changed pixels; None for a clean pass or a unit of state version 1
    radius: torch.Tensor | None = None  # int64 certified L0 radius (clean pass of a certifying defense)


# --------------------------------------------------------------------------------------------
# Seeds


def run_seed(seed: int, *names: str) -> int:
    """A seed for one run, from the global seed and the run's names (stable across processes)."""
    digest = hashlib.sha256("\x1f".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@contextlib.contextmanager
def seeded(seed: int):
    """torch's CPU generator and numpy's global one seeded inside, restored afterwards."""
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)


# --------------------------------------------------------------------------------------------
# Plan


@dataclass
class _Attack:
    text: str
    spec: attacks.AttackSpec
    expensive: bool


@dataclass
class _Defense:
    name: str
    defense: Defense
    expensive: bool
    identity: bool


def validate(config: Config) -> Config:
    """The CLI's checks, for callers of the pipeline; returns the config normalised."""
    for name in ("limit", "limit_expensive", "eot", "batch_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvalError(f"{name} must be an integer >= 1, got {value!r}")
    threats = tuple(dict.fromkeys(config.threats or THREATS))
    unknown = [t for t in threats if t not in THREATS]
    if unknown:
        raise EvalError(f"unknown threat model {unknown[0]!r}; choose from {', '.join(THREATS)}")
    defenses = tuple(dict.fromkeys(d.strip() for d in (config.defenses or DEFAULT_DEFENSES)))
    return dataclasses.replace(
        config, threats=threats, defenses=defenses, attacks=tuple(dict.fromkeys(a.strip() for a in config.attacks))
    )


def _parse_defenses(texts) -> list[_Defense]:
    out = {}
    for text in texts:
        d = parse_defense(text)
        name = d.describe()
        out.setdefault(name, _Defense(name, d, d.name in EXPENSIVE_DEFENSES or getattr(d, "expensive", False),
                                      type(d) is Defense))
    return list(out.values())


def _parse_attacks(texts, preset_dataset: str) -> list[_Attack]:
    texts = texts or tuple(attacks.default_attacks(preset_dataset))
    out = {}
    for text in texts:
        spec = attacks.parse_attack(text, preset_dataset)
        out.setdefault(spec, _Attack(text, spec, spec.name in EXPENSIVE_ATTACKS))  # the same attack runs once
    return list(out.values())


def _data_root(config: Config) -> str:
    root = config.data_root or os.environ.get("PSSR_DATA_ROOT")
    if not root:
        raise EvalError("no data root: pass --data-root or set PSSR_DATA_ROOT")
    return root


def _check_compatible(spec: classifiers.ClassifierSpec, data, path) -> None:
    want = (spec.in_channels, spec.image_size, spec.image_size)
    if tuple(data.image_shape) != want:
        have = "x".join(map(str, data.image_shape))
        raise EvalError(
            f"{path}: the classifier takes {'x'.join(map(str, want))} images, data set {data.name} has {have}"
        )
    if data.num_classes > spec.num_classes:
        raise EvalError(f"{path}: the classifier has {spec.num_classes} classes, data set {data.name} has "
                        f"{data.num_classes}")


def check_output_path(path: str | None, option: str) -> None:
    """Fail before a long run, not after it, when an output file cannot be written."""
    if not path:
        return
    if os.path.isdir(path):
        raise EvalError(f"{option} {path}: is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    existing = directory
    while not os.path.isdir(existing):  # report.write_* creates missing folders
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.access(existing, os.W_OK):
        raise EvalError(f"{option} {path}: folder {existing} is not writable")


# --------------------------------------------------------------------------------------------
# Resume state (--state)

STATE_KIND = "eval-state"
STATE_VERSION = 2  # 2: adds the L0 vectors; files of version 1 are read (their runs report no L0)
_READABLE_STATES = (1, 2)
# Resolved-config keys that do not change a number (the classifier and data enter by digest).
NOT_DEFINING = frozenset({"classifier", "data_root", "torch", "pssr", "python", "threads", "device"})


def defining_options(resolved: dict, classifier_sha256: str, data, defenses: list[_Defense]) -> dict:
    """What a state file must share with a rerun: every option that changes a number, as JSON.
    The data and the weights a defense holds (PSSR's purifier) enter by digest, so a changed
    data copy or a retrained purifier under the same name is caught."""
    digest = hashlib.sha256(data.images.contiguous().numpy().tobytes())
    digest.update(data.labels.to(torch.int64).contiguous().numpy().tobytes())
    options = {k: v for k, v in resolved.items() if k not in NOT_DEFINING}
    if not options.get("fold_batchnorm"):  # only when on, so that states made before it stay valid
        options.pop("fold_batchnorm", None)
    if "expensive_attacks" in options:  # later expensive attacks only when run, so that states made before stay valid
        ran = {attacks.parse_attack(a, resolved.get("preset_dataset", "")).name for a in resolved.get("attacks", ())}
        options["expensive_attacks"] = [a for a in options["expensive_attacks"] if a in _FIRST_EXPENSIVE or a in ran]
    options.update(classifier_sha256=classifier_sha256, data_sha256=digest.hexdigest(),
                   defense_weights=_defense_weights(defenses))
    revisions = {d.name: d.defense.revision for d in defenses if d.defense.revision != 1}
    if revisions:  # only then, so that states of unrevised defenses stay valid
        options["defense_revisions"] = revisions
    return json.loads(json.dumps(options))  # tuples as lists, as they read back


def _defense_weights(defenses: list[_Defense]) -> dict[str, list[str]]:
    """Per defense that holds modules (after bind), the sha256 of each one's weights."""
    out = {}
    for d in defenses:
        modules = [v for v in vars(d.defense).values() if isinstance(v, torch.nn.Module)]
        if modules:
            out[d.name] = [weights_sha256(m.state_dict()) for m in modules]
    return out


def _brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class State:
    """The finished units of one evaluation, in a safetensors file rewritten after each unit.

    Tensors ``{unit}.{entry}.robust`` (bool) and ``.linf``/``.l2``/``.l0`` (float64); the metadata
    (``pssr`` key, JSON) holds the defining options and, per unit, its key and per entry the
    defense, threat and seconds. Units are keyed (attack, defense, threat), a clean pass
    ("clean", defense)."""

    def __init__(self, path: str, options: dict):
        self.path, self.options = path, options
        self.units: dict[tuple[str, ...], list[Scored]] = {}

    @classmethod
    def open(cls, path: str, options: dict) -> "State":
        """The state in ``path`` (none yet: empty); refuses a file made with other options."""
        state = cls(path, options)
        if os.path.exists(path):
            state._load()
        return state

    def put(self, key: tuple[str, ...], scored: list[Scored]) -> None:
        self.units[key] = scored
        self._save()

    def _save(self) -> None:
        tensors, units = {}, []
        for u, (key, scored) in enumerate(self.units.items()):
            units.append({"key": list(key), "entries": [
                {"defense": s.defense, "threat": s.threat, "seconds": s.seconds} for s in scored]})
            for e, s in enumerate(scored):
                for name in ("robust", "linf", "l2", "l0", "radius"):
                    if getattr(s, name) is not None:
                        tensors[f"{u}.{e}.{name}"] = getattr(s, name)
        info = {"kind": STATE_KIND, "state_version": STATE_VERSION, "options": self.options, "units": units}
        try:
            checkpoint.save(self.path, tensors, info)
        except OSError as exc:
            raise EvalError(f"cannot write --state {self.path}: {exc.strerror or exc}") from exc

    def _load(self) -> None:
        try:
            tensors, info = checkpoint.load(self.path, kind=STATE_KIND)
        except checkpoint.CheckpointError as exc:
            raise EvalError(f"--state: {exc}") from None
        if info.get("state_version") not in _READABLE_STATES:
            raise EvalError(f"--state {self.path}: state version {info.get('state_version')!r}, this pssr reads "
                            f"{' or '.join(map(str, _READABLE_STATES))}; delete it to start over")
        self._check_options(info.get("options"))
        try:
            self.units = {tuple(u["key"]): self._unit(tensors, i, u) for i, u in enumerate(info["units"])}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EvalError(f"--state {self.path}: damaged state file ({first_line(exc)}); delete it to start over") \
                from None

    def _check_options(self, stored) -> None:
        if not isinstance(stored, dict):
            raise EvalError(f"--state {self.path}: damaged state file (no options); delete it to start over")
        keys = [*self.options, *(k for k in stored if k not in self.options)]  # the options given first, digests last
        differ = [k for k in keys if stored.get(k) != self.options.get(k)]
        if differ:
            k = differ[0]
            more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
            raise EvalError(f"--state {self.path} is from another evaluation: {k} {_brief(stored.get(k))} there, "
                            f"{_brief(self.options.get(k))} here{more}; rerun with its options or use another file")

    def _unit(self, tensors: dict, u: int, unit: dict) -> list[Scored]:
        """One stored unit, checked: a clean pass holds exactly one clean entry, a run none."""
        scored = [self._entry(tensors, u, e, entry) for e, entry in enumerate(unit["entries"])]
        clean = unit["key"][0] == "clean"
        if not scored or any((s.threat == "clean") != clean for s in scored) or (clean and len(scored) > 1):
            raise ValueError(f"unit {u}: entries do not fit its key")
        return scored

    def _entry(self, tensors: dict, u: int, e: int, entry: dict) -> Scored:
        """One stored scoring, checked: known defense and threat, vectors of one length <= n."""
        if f"{u}.{e}.robust" not in tensors:
            raise ValueError(f"tensor {u}.{e}.robust missing")
        robust = tensors[f"{u}.{e}.robust"]
        norms = [tensors.get(f"{u}.{e}.{name}") for name in ("linf", "l2")]
        l0 = tensors.get(f"{u}.{e}.l0")  # absent in version 1
        radius = tensors.get(f"{u}.{e}.radius")  # a certifying defense's clean pass only
        n = len(robust) if robust.dim() == 1 else -1
        if entry["defense"] not in self.options["defenses"] or entry["threat"] not in (*THREATS, "clean"):
            raise ValueError(f"unit {u}: unknown defense or threat")
        if robust.dtype != torch.bool or not 0 < n <= self.options["n"]:
            raise ValueError(f"unit {u}: bad robust vector")
        if (entry["threat"] == "clean") != (norms == [None, None]) or any(
                t is not None and (t.dtype != torch.float64 or t.shape != (n,)) for t in [*norms, l0]) or (
                l0 is not None and norms[0] is None):
            raise ValueError(f"unit {u}: bad norm vectors")
        if radius is not None and (entry["threat"] != "clean" or radius.dtype != torch.int64 or radius.shape != (n,)):
            raise ValueError(f"unit {u}: bad radius vector")
        return Scored(entry["defense"], entry["threat"], robust, *norms, seconds=float(entry["seconds"]), l0=l0,
                      radius=radius)


# --------------------------------------------------------------------------------------------
# Runs


def _predictor(classifier, defense: Defense, seed: int, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The defended classifier's logits as evaluated: batched, no gradient, one seeded draw."""

    def predict(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), seeded(seed):
            return torch.cat([defense.classify(classifier, b) for b in images.split(batch_size)])

    return predict


def _attack(a: _Attack, model, x, y, seed: int, config: Config, what: str, bar) -> tuple[torch.Tensor, float]:
    """One seeded attack run; (x_adv, seconds). Library errors become one-line EvalErrors."""
    start = time.perf_counter()
    n = len(x)
    try:
        with seeded(seed):  # numpy too: ART's random defenses draw from it inside the attack
            x_adv = attacks.run_attack(a.spec, model, x, y, seed=seed, batch_size=config.batch_size,
                                       progress=lambda done: bar.set_postfix_str(f"{done}/{n} images"))
    except attacks.AttackError:
        raise
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        raise EvalError(f"{what} failed: {first_line(exc)}") from exc
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
        raise EvalError(f"{what}: the attack returned {got}, expected a tensor of shape {tuple(x.shape)}")
    return x_adv.detach(), time.perf_counter() - start


class _Evaluation:
    """The state of one evaluation: data, predictors, per-defense clean and worst-case masks."""

    def __init__(self, config: Config, classifier, x, y, defenses: list[_Defense], n: int, m: int, bar,
                 state: State | None = None):
        self.config, self.classifier, self.x, self.y = config, classifier, x, y
        self.defenses, self.n, self.m, self.bar, self.state = defenses, n, m, bar, state
        self.records: list[Record] = []
        self.predict = {
            d.name: _predictor(classifier, d.defense, run_seed(config.seed, d.name, "predict"), config.batch_size)
            for d in defenses
        }
        self.clean_ok: dict[str, torch.Tensor] = {}
        self.alive: dict[str, torch.Tensor] = {}
        self.worst_n: dict[str, int] = {}
        self.runs: dict[str, int] = {}
        self.by_norm: dict[tuple[str, str], NormWorstCase] = {}  # (defense, norm) -> its worst case so far
        self.alive_norm: dict[tuple[str, str], torch.Tensor] = {}

    def size(self, d: _Defense) -> int:
        """Images a defense is evaluated on: the first M for an expensive one, else N."""
        return self.m if d.expensive else self.n

    def _unit(self, key: tuple[str, ...], steps: int, compute: Callable[[], list[Scored]]) -> list[Scored]:
        """A unit's scorings: replayed from the state file when it finished before, else computed
        (compute moves the bar itself) and saved there."""
        stored = self.state.units.get(key) if self.state is not None else None
        if stored is not None:
            self.bar.update(steps)
            return stored
        scored = compute()
        if self.state is not None:
            self.state.put(key, scored)
        return scored

    def clean(self, d: _Defense) -> Clean:
        (s,) = self._unit(("clean", d.name), 1, lambda: [self._clean_pass(d)])
        ok = s.robust
        self.clean_ok[d.name], self.alive[d.name] = ok, ok.clone()
        self.worst_n[d.name], self.runs[d.name] = len(ok), 0
        if s.radius is None:
            return Clean(d.name, len(ok), ok.float().mean().item())
        from pssr.ablation import median_radius

        return Clean(d.name, len(ok), ok.float().mean().item(), s.radius.tolist(), median_radius(s.radius))

    def _clean_pass(self, d: _Defense) -> Scored:
        n = self.size(d)
        self.bar.set_description_str(f"clean {d.name}")
        pred = self.predict[d.name](self.x[:n]).argmax(1)
        ok = pred == self.y[:n]
        radius = None
        if hasattr(d.defense, "certify"):  # randomized ablation: its certified L0 radius, seeded like a run
            with torch.no_grad(), seeded(run_seed(self.config.seed, d.name, "certify")):
                radius = d.defense.certify(self.classifier, self.x[:n], pred, batch_size=self.config.batch_size)
            radius = None if radius is None else torch.where(ok.cpu(), radius, -1)
        self.bar.update()
        return Scored(d.name, "clean", ok, radius=radius)

    def unit(self, a: _Attack, defense: str, threat: str, steps: int, compute: Callable[[], list[Scored]]) -> None:
        """Run (or replay) one attack run with its scorings and record them."""
        for s in self._unit((a.text, defense, threat), steps, compute):
            self.add(a, s)

    def measure(self, d: _Defense, a: _Attack, threat: str, x_adv: torch.Tensor, seconds: float) -> Scored:
        """Classify x_adv (its first n rows) with defense d: which examples survived, and their norms."""
        n = min(len(x_adv), self.size(d))
        x, y, x_adv = self.x[:n], self.y[:n], x_adv[:n]
        start = time.perf_counter()
        try:
            robust = attacks.robust_mask(a.spec, self.predict[d.name], x, x_adv, y, batch_size=self.config.batch_size)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise EvalError(f"scoring {a.text} on {d.name} ({threat}) failed: {first_line(exc)}") from exc
        robust = torch.as_tensor(robust, dtype=torch.bool).reshape(-1)[:n] & self.clean_ok[d.name][:n]
        linf, l2, l0 = (torch.as_tensor(v, dtype=torch.float64) for v in attacks.perturbation_norms(x, x_adv))
        return Scored(d.name, threat, robust, linf, l2, seconds + time.perf_counter() - start, l0=l0)

    def add(self, a: _Attack, s: Scored) -> None:
        """Record one scoring: its row, and its examples' share of the defense's worst case."""
        n = len(s.robust)
        self.alive[s.defense][:n] &= s.robust
        self.worst_n[s.defense] = min(self.worst_n[s.defense], n)
        self.runs[s.defense] += 1
        self.records.append(Record(
            s.defense, a.text, a.spec.label(), s.threat, n, s.robust.float().mean().item(),
            s.linf.mean().item(), s.l2.mean().item(), None if s.l0 is None else s.l0.mean().item(), s.seconds,
        ))
        key = (s.defense, a.spec.norm)  # the same per threat model (L∞, L2, L0, patch)
        alive = self.alive_norm.setdefault(key, self.clean_ok[s.defense].clone())
        alive[:n] &= s.robust
        w = self.by_norm.setdefault(key, NormWorstCase(s.defense, len(alive), 0.0, 0, a.spec.norm))
        w.n, w.runs = min(w.n, n), w.runs + 1
        w.robust_accuracy = alive[:w.n].float().mean().item()

    def shared(self, a: _Attack, tag: str, identity: list[_Defense], transfer: list[_Defense]) -> list[Scored]:
        """The attack on the undefended classifier, scored on the identity defenses (under tag)
        and transferred to the others."""
        x_adv, seconds = self.attack(a, None, tag)
        scored = [self.measure(d, a, tag, x_adv, seconds) for d in identity]
        self.bar.update()
        for d in transfer:
            self.bar.set_description_str(f"{a.text} transferred to {d.name}")
            scored.append(self.measure(d, a, "oblivious", x_adv, seconds))
            self.bar.update()
        return scored

    def defended(self, a: _Attack, d: _Defense, threat: str) -> list[Scored]:
        """The attack on the defended model under one threat model, scored."""
        scored = self.measure(d, a, threat, *self.attack(a, d, threat))
        self.bar.update()
        return [scored]

    def attack(self, a: _Attack, d: _Defense | None, threat: str) -> tuple[torch.Tensor, float]:
        """Attack the undefended classifier (d None) or the defended model under a threat model."""
        name = "none" if d is None else d.name
        n = self.m if a.expensive or threat in EXPENSIVE_THREATS or (d is not None and d.expensive) else self.n
        if d is None:
            model, target = self.classifier, "the undefended classifier"
        else:
            eot = self.config.eot if threat == "eot" else 1
            gradient = GRADIENT_THREATS.get(threat, "bpda")
            model = DefendedModel(self.classifier, d.defense, eot=eot, gradient=gradient)
            target = f"{d.name} ({threat})"
        self.bar.set_description_str(f"{a.text} on {target}")
        seed = run_seed(self.config.seed, name, a.text, threat)
        x_adv, seconds = _attack(a, model, self.x[:n], self.y[:n], seed, self.config, f"{a.text} on {target}", self.bar)
        self.bar.set_postfix_str("")
        return x_adv, seconds

    def worst_case(self, d: _Defense) -> WorstCase:
        n = self.worst_n[d.name]
        return WorstCase(d.name, n, self.alive[d.name][:n].float().mean().item(), self.runs[d.name])


def plan_size(defenses: list[_Defense], atts: list[_Attack], threats: tuple[str, ...]) -> int:
    """Progress-bar steps: one per clean evaluation, attack run, and scoring of shared examples."""
    steps = len(defenses)
    others = [d for d in defenses if not d.identity]
    has_none = len(others) < len(defenses)
    for a in atts:
        if "oblivious" in threats:
            steps += 1 + len(others)  # the shared attack (scored on none with it) + scoring per defense
        elif "bpda" in threats and has_none:
            steps += 1
        for d in others:
            steps += len(_defended_threats(a, d, threats))
    return steps


def _defended_threats(a: _Attack, d: _Defense, threats: tuple[str, ...]) -> list[str]:
    """The threat models under which (attack, defense) attacks the defended model: bpda always; the
    other gradient rules only where the defense offers them and the attack uses gradients (a
    gradient-free attack would only query a relaxed forward pass); EOT for a randomized defense
    and a gradient-based attack."""
    out = []
    for threat, gradient in GRADIENT_THREATS.items():
        if threat in threats and gradient in d.defense.attack_gradients and (threat == "bpda" or not a.spec.gradient_free):
            out.append(threat)
    if "eot" in threats and d.defense.randomized and not a.spec.gradient_free:
        out.append("eot")
    return out


def _classifier_info(path, spec, model) -> dict:
    info = dataclasses.asdict(spec)
    info["mean"], info["std"], info["classes"] = list(spec.mean), list(spec.std), list(spec.classes)
    return {"path": str(path), "sha256": weights_sha256(model.state_dict()), **info}


def run(config: Config, *, json_path: str | None = None, markdown_path: str | None = None,
        plot_path: str | None = None, state_path: str | None = None, examples_path: str | None = None,
        eps_curve_path: str | None = None, quiet: bool = False, trust_arch: bool = False) -> Result:
    """The whole evaluation; writes the JSON, markdown and figures last, when asked to. With
    ``state_path``, resumes from the units finished there and saves each new one there.
    ``trust_arch``: the classifier may name its own architecture's code (imported and run)."""
    started = time.perf_counter()
    config = validate(config)
    outputs = ((json_path, "--json"), (markdown_path, "--markdown"), (plot_path, "--plot"), (state_path, "--state"),
               (examples_path, "--examples"), (eps_curve_path, "--eps-curve"))
    for path, option in outputs:
        check_output_path(path, option)
    classifier, spec = classifiers.load(config.classifier, trust_arch=trust_arch)
    dataset = dataset_key(config.dataset or spec.dataset or "")  # a folder:PATH keeps its case
    if not dataset:
        raise EvalError(f"{config.classifier}: the checkpoint names no data set; pass --dataset")
    preset_dataset = dataset_key(spec.dataset or dataset)
    defenses = _parse_defenses(config.defenses)
    if spec.ablation:  # randomized ablation's base classifier: its vote is its only defense
        if config.defenses == DEFAULT_DEFENSES:
            defenses = _parse_defenses(("ablation",))
        others = [d.name for d in defenses if not getattr(d.defense, "takes_ablation_classifier", False)]
        if others:
            raise EvalError(f"{config.classifier}: a randomized-ablation classifier (keep={spec.ablation['keep']}) "
                            f"is evaluated behind --defense ablation (e.g. ablation:n=100) only, not {others[0]}")
    atts = _parse_attacks(config.attacks, preset_dataset)
    data = load_dataset(dataset, _data_root(config), "test")
    _check_compatible(spec, data, config.classifier)
    for d in list(defenses):
        try:
            d.defense.bind(classifier, spec)
        except DefenseError as exc:
            if config.defenses != DEFAULT_DEFENSES or d.name != "pssr":
                raise
            defenses.remove(d)  # by default, PSSR joins only where a purifier exists for this classifier
            if not quiet:
                print(f"note: {exc}; evaluating without pssr", file=sys.stderr)
    pssr_defense = next((d.defense for d in defenses if isinstance(d.defense, PssrDefense)), None)
    if examples_path and pssr_defense is None:
        raise EvalError("--examples draws PSSR's stages: add --defense pssr (or pssr:path=FILE)")
    data = data.subset(config.limit)  # the first N, in data-set order
    n = len(data)
    m = min(config.limit_expensive, n)
    if n == 0:
        raise EvalError(f"data set {dataset} has no test images")
    x = data.images.to(torch.float32).div_(255)
    y = data.labels

    threats = config.threats
    resolved = {
        **dataclasses.asdict(config),
        "dataset": dataset, "preset_dataset": preset_dataset,
        "defenses": [d.name for d in defenses], "attacks": [a.text for a in atts],
        "attack_labels": [a.spec.label() for a in atts], "threats": list(threats),
        "n": n, "n_expensive": m, "subset": SUBSET_RULE,
        "expensive_attacks": sorted(EXPENSIVE_ATTACKS), "expensive_defenses": sorted(EXPENSIVE_DEFENSES),
        "expensive_threats": sorted(EXPENSIVE_THREATS),
        "torch": torch.__version__, "pssr": pssr.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "device": "cpu",
    }
    result = Result(resolved, _classifier_info(config.classifier, spec, classifier), config.seed)
    state = None
    if state_path:
        state = State.open(state_path, defining_options(resolved, result.classifier["sha256"], data, defenses))
        if state.units and not quiet:
            print(f"note: resuming from {state_path}: {len(state.units)} finished runs", file=sys.stderr)
    show = not quiet and sys.stderr.isatty()
    total = plan_size(defenses, atts, threats)
    if config.fold_batchnorm:  # after the digests, which name the stored weights
        classifier = _folded(classifier, pssr_defense)
    with tqdm(total=total, disable=not show, file=sys.stderr, unit="run", dynamic_ncols=True) as bar:
        ev = _Evaluation(config, classifier, x, y, defenses, n, m, bar, state)
        result.clean = [ev.clean(d) for d in defenses]
        for a in atts:
            _run_attack(ev, a, defenses, threats)
        rows = _example_rows(pssr_defense, classifier, atts, x, y, config, bar) if examples_path else []
        bar.set_description_str("done")
    order_d = {d.name: i for i, d in enumerate(defenses)}
    order_a = {a.text: i for i, a in enumerate(atts)}
    result.records = sorted(ev.records, key=lambda r: (order_d[r.defense], order_a[r.attack], THREATS.index(r.threat)))
    result.worst_case = [ev.worst_case(d) for d in defenses]
    norms = ("Linf", "L2", "L0", "patch")
    result.worst_case_by_norm = sorted(ev.by_norm.values(), key=lambda w: (
        order_d[w.defense], norms.index(w.norm) if w.norm in norms else len(norms), w.norm))
    result.seconds = time.perf_counter() - started
    try:
        if json_path:
            report.write_json(json_path, result)
        if markdown_path:
            report.write_markdown(markdown_path, result)
        if plot_path:
            report.write_plot(plot_path, result)
        if examples_path:
            figures.example_grid(rows, examples_path, spec.classes)
        if eps_curve_path:
            figures.eps_curve(figures.curves_from_result(result), eps_curve_path,
                              title=f"{dataset}: PGD, strongest threat model per ε, n={n}")
    except OSError as exc:
        raise EvalError(f"cannot write {exc.filename or 'an output file'}: {exc.strerror or exc}") from exc
    return result


def _folded(classifier: torch.nn.Module, pssr_defense) -> torch.nn.Module:
    """The classifier with BatchNorm folded, channels-last, also inside PSSR's saliency step."""
    fast = classifiers.ChannelsLast(classifiers.fold_batchnorm(classifier))
    if pssr_defense is not None and pssr_defense.purifier is not None:
        pssr_defense.purifier.surgery.classifier = fast
    return fast


def _example_rows(defense, classifier, atts: list[_Attack], x, y, config: Config, bar, k: int = 3) -> list:
    """Per attack, PSSR's stages on the first k images, attacked by transfer (on f) with their own seed:
    pictures of the defense at work, not the runs behind the table's numbers."""
    rows = []
    for a in atts:
        x_adv, _ = _attack(a, classifier, x[:k], y[:k], run_seed(config.seed, "examples", a.text), config,
                           f"{a.text} examples", bar)
        rows.append(figures.example_row(defense, a.spec.label(), x[:k], x_adv, y[:k].tolist()))
    return rows


def _run_attack(ev: _Evaluation, a: _Attack, defenses: list[_Defense], threats: tuple[str, ...]) -> None:
    """Every threat model of one attack, against every defense."""
    identity = [d for d in defenses if d.identity]
    others = [d for d in defenses if not d.identity]
    # The undefended attack: oblivious for every defense; for 'none' it is also its BPDA attack.
    shared_tag = "oblivious" if "oblivious" in threats else ("bpda" if "bpda" in threats and identity else None)
    if shared_tag:
        transfer = others if shared_tag == "oblivious" else []
        ev.unit(a, "none", shared_tag, 1 + len(transfer), functools.partial(ev.shared, a, shared_tag, identity, transfer))
    for d in others:
        for threat in _defended_threats(a, d, threats):
            ev.unit(a, d.name, threat, 1, functools.partial(ev.defended, a, d, threat))
