"""Attack-in-the-loop training: the adversarial examples a trainer learns from, the loss it
minimises on them, and the robust-accuracy watch that keeps the best state and stops a collapse.

Shared by the trainers (today `train-classifier`; the purifier trainer can call `make` through
the defense). The best-state watch and the collapse rule are `pssr.training.Watch`. Every random draw comes from a generator the caller seeds from (seed, epoch, step,
rank), so a resumed run makes the same examples. The attacks are written here, not taken from
torchattacks, because training needs those seeded generators, an ε that ramps up, and N-FGSM,
which no library ships.

Methods (L∞ only):
- ``pgd``: Madry et al. 2018. Random start in the ε-ball, ``steps`` signed steps of ``step_size``,
  each projected back to the ball; train on CE of the result.
- ``n-fgsm``: de Jorge et al. 2022. Noise U(-k·ε, k·ε) (k = ``noise``), one signed step of
  ``step_size`` (default ε) from the noisy point, and *no* projection back to the ε-ball (the
  perturbation can reach (k+1)·ε): one extra pass, and no catastrophic overfitting.
- ``trades``: Zhang et al. 2019. Start at x + 0.001·N(0, 1), ``steps`` signed steps on
  KL(f(x) ‖ f(x')), projected; train on CE(f(x), y) + ``beta`` · KL(f(x) ‖ f(x_adv)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from . import losses

METHODS = ("none", "pgd", "n-fgsm", "trades")


@dataclass
class AdversarialConfig:
    method: Literal["none", "pgd", "n-fgsm", "trades"] = "none"
    eps: float = 0.3  # L∞ radius in [0, 1] pixel units (8/255 = 0.03137 for CIFAR-10)
    norm: Literal["linf"] = "linf"
    steps: int = 10  # pgd, trades
    step_size: float | None = None  # at full ε; default 2.5·ε/steps (pgd, trades), ε (n-fgsm)
    noise: float = 2.0  # n-fgsm: k of the U(-k·ε, k·ε) noise
    attack_mode: Literal["train", "eval"] | None = None  # the model's mode while attacking; default: each paper's
    beta: float = 6.0  # trades: weight of the robustness (KL) term
    warmup_epochs: float = 0.0  # ε (and step size) ramp linearly from ~0 to full over this many epochs
    watch_every: int = 200  # steps between robust-accuracy checks (and at every epoch's end)
    watch_n: int = 500  # training images held back for the watch (not trained on)
    watch_steps: int = 10  # PGD steps of the watch (step 2.5·ε/steps, random start)
    collapse_points: float = 20.0  # robust accuracy this far (points) below the best ends the run

    def __post_init__(self):
        for name in ("eps", "noise", "beta", "warmup_epochs", "collapse_points"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"adversarial.{name} must be a finite number >= 0, got {value}")
        if self.step_size is not None and (not math.isfinite(self.step_size) or self.step_size <= 0):
            raise ValueError(f"adversarial.step_size must be a finite number > 0, got {self.step_size}")
        if not 0 < self.eps <= 1 and self.method != "none":
            raise ValueError(f"adversarial.eps must be in (0, 1] (pixel units), got {self.eps}")
        if self.steps < 1 or self.watch_steps < 1 or self.watch_every < 1:
            raise ValueError("adversarial.steps, watch_steps and watch_every must be >= 1")
        if self.watch_n < 0:
            raise ValueError("adversarial.watch_n must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def mode(self) -> str:
        """train for pgd and n-fgsm (their code attacks in train mode), eval for trades (its code does)."""
        return self.attack_mode or ("eval" if self.method == "trades" else "train")

    def step_size_at(self, eps: float) -> float:
        """The step for the current ε (the configured step scales with a ramping ε)."""
        if self.step_size is not None:
            return self.step_size * eps / self.eps
        if self.method in ("pgd", "trades"):
            return 2.5 * eps / self.steps
        return eps  # n-fgsm

    def record(self) -> dict:
        """How a classifier was trained, for its checkpoint and the reports."""
        if not self.enabled:
            return {"method": "standard"}
        out = {"method": self.method, "norm": self.norm, "eps": self.eps, "step_size": self.step_size_at(self.eps),
               "warmup_epochs": self.warmup_epochs, "attack_mode": self.mode}
        if self.method in ("pgd", "trades"):
            out["steps"] = self.steps
        if self.method == "n-fgsm":
            out.update(steps=1, noise=self.noise)
        if self.method == "trades":
            out["beta"] = self.beta
        return out


def eps_at(cfg: AdversarialConfig, step: int, steps_per_epoch: int) -> float:
    """ε at ``step``: a linear ramp over ``warmup_epochs`` (reaching full ε at its end), then ε."""
    ramp = cfg.warmup_epochs * steps_per_epoch
    if ramp <= 0:
        return cfg.eps
    return cfg.eps * min(1.0, (step + 1) / ramp)


def _uniform(shape, low: float, high: float, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * (high - low) + low).to(like.device, like.dtype)


def _input_grad(model, x: torch.Tensor, loss_fn) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x))
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def pgd(model, x, y, eps: float, step_size: float, steps: int, gen: torch.Generator) -> torch.Tensor:
    """L∞ PGD with a uniform random start, on the summed cross-entropy; stays in the ball and in [0, 1]."""
    x_adv = (x + _uniform(x.shape, -eps, eps, gen, x)).clamp_(0, 1)
    for _ in range(steps):
        grad = _input_grad(model, x_adv, lambda z: F.cross_entropy(z, y, reduction="sum"))
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def n_fgsm(model, x, y, eps: float, step_size: float, noise: float, gen: torch.Generator) -> torch.Tensor:
    """N-FGSM: x + η + step·sign(∇), η ~ U(-k·ε, k·ε); clipped to [0, 1] only, never to the ε-ball."""
    x_noisy = (x + _uniform(x.shape, -noise * eps, noise * eps, gen, x)).clamp_(0, 1)
    grad = _input_grad(model, x_noisy, lambda z: F.cross_entropy(z, y, reduction="sum"))
    return (x_noisy + step_size * grad.sign()).clamp_(0, 1).detach()


def trades_attack(model, x, eps: float, step_size: float, steps: int, gen: torch.Generator) -> torch.Tensor:
    """TRADES' inner maximisation of KL(f(x) ‖ f(x')) in the ε-ball, from x + 0.001·N(0, 1)."""
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)).clamp_(0, 1)
    for _ in range(steps):
        grad = _input_grad(model, x_adv, lambda z: F.kl_div(F.log_softmax(z, 1), p_clean, reduction="sum"))
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def make(model, x: torch.Tensor, y: torch.Tensor, cfg: AdversarialConfig, eps: float,
         gen: torch.Generator) -> torch.Tensor:
    """The training examples of ``cfg``'s method at radius ``eps``, made on ``model`` in ``cfg.mode``.

    ``model`` is the bare module (never a DDP wrapper: the attack's passes must not sync gradients).
    Input gradients only (`torch.autograd.grad`), so no parameter's ``.grad`` is touched.
    """
    step = cfg.step_size_at(eps)
    was = model.training
    model.train(cfg.mode == "train")
    try:
        if cfg.method == "pgd":
            return pgd(model, x, y, eps, step, cfg.steps, gen)
        if cfg.method == "n-fgsm":
            return n_fgsm(model, x, y, eps, step, cfg.noise, gen)
        if cfg.method == "trades":
            return trades_attack(model, x, eps, step, cfg.steps, gen)
        raise ValueError(f"no training attack for method {cfg.method!r}")
    finally:
        model.train(was)


def classifier_loss(model, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None, cfg: AdversarialConfig,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """What the classifier minimises: CE on the clean batch (none), on the examples (pgd, n-fgsm), or
    TRADES' CE(f(x)) + β·KL(f(x) ‖ f(x_adv)) from one forward of both."""
    if cfg.method == "none":
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    if cfg.method == "trades":
        logits = model(torch.cat([x, x_adv]))
        return losses.trades(logits[: len(x)], logits[len(x):], y, cfg.beta, label_smoothing)
    return F.cross_entropy(model(x_adv), y, label_smoothing=label_smoothing)


# --------------------------------------------------------------------------------------------
# The watch


def watch(model, x: torch.Tensor, y: torch.Tensor, cfg: AdversarialConfig, gen: torch.Generator,
          batch_size: int = 500) -> tuple[int, int]:
    """(clean correct, PGD-robust correct) on a held-back slice, in eval mode.

    The PGD start is drawn from ``gen`` (seeded the same at every check), so two checks of the
    same weights agree and a change in the number is a change in the model.
    """
    was = model.training
    model.eval()
    clean = robust = 0
    try:
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            with torch.no_grad():
                clean += int((model(xb).argmax(1) == yb).sum())
            x_adv = pgd(model, xb, yb, cfg.eps, 2.5 * cfg.eps / cfg.watch_steps, cfg.watch_steps, gen)
            with torch.no_grad():
                robust += int((model(x_adv).argmax(1) == yb).sum())
    finally:
        model.train(was)
    return clean, robust
