"""Randomized ablation (Levine and Feizi, "Robustness Certificates for Sparse Adversarial Attacks by
Randomized Ablation", AAAI 2020): the sparse-threat (L0) baseline defense, with its certificate.

The base classifier sees images of which only ``keep`` pixels, chosen uniformly at random, survive
(a pixel is kept or ablated with all its channels). An ablated pixel must differ from every real
value, so the image is encoded as the paper does: each channel value v of a kept pixel becomes the
pair (v, 1 − v), an ablated pixel (0, 0). A real value's pair sums to 1 and an ablated one to 0, so
no value v (in [0, 1] or outside it) is mistaken for "ablated". The C-channel image becomes 2C
channels; the zoo network behind them is built with 2C input channels and, as every pssr
classifier, its normalisation first (of the encoding, with the statistics the data's mean and std
imply under ablation: `encoded_stats`).

- **Training** (`pssr train-classifier`, the ``ablation:`` block, off by default: ``keep: 45``):
  each training image is ablated with a generator of its own seed stream (per image patterns; the
  authors' code shares one pattern per batch), so a resumed run draws the same pixels.
- **Checkpoints** say what they are: the classifier spec's ``ablation`` record
  (``{"keep": K, "encoding": "complement-pair"}``). Loading one builds `AblationClassifier`, which
  takes encoded images (2C channels) or plain C-channel images in [0, 1], which it ablates itself
  with one draw from a fixed seed (a deterministic function: the trainer's test accuracy is the
  base classifier's on one ablation per image). `pssr eval` evaluates such a classifier behind the
  ablation defense only.
- **The defense** ``--defense ablation:keep=K,n=N`` (`AblationDefense`) predicts by majority vote over
  ``n`` random ablations of each image (``score=all``: right only if all n draws are, DESIGN.md §10);
  ``keep`` defaults to the checkpoint's. It is random: `pssr eval` seeds it per batch like the other
  random defenses, attacks it with EOT, and counts its vote as its prediction. The attacker
  differentiates the *soft* vote, log of the mean softmax over ``attack_n`` draws (SmoothAdv's
  surrogate, Salman et al. 2019): the vote itself is piecewise constant. Gradient-free attacks
  query that same soft vote.
- **The certificate** (`certify`, the paper's Theorem and the authors' certify code): with the
  predicted class c chosen by the vote, ``cert`` fresh draws count how often the base classifier
  says c; ``p_lower`` is the one-sided Clopper-Pearson lower bound of that frequency at confidence
  1 − α. With d = H·W pixels and Δ(ρ) = 1 − C(d − ρ, k) / C(d, k) (the chance that an ablation keeps
  one of ρ changed pixels), the vote is certified against every change of at most ρ pixels while
  p_lower − Δ(ρ) > 1/2; the radius is the largest such ρ (0 when there is none: a weak vote).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from .classifiers import ARCHITECTURES, Classifier, ClassifierSpec, Normalize
from .defenses import Defense, DefenseError

ENCODING = "complement-pair"  # each channel value v of a kept pixel -> (v, 1 - v); an ablated pixel -> (0, 0)
FIXED_SEED = 0  # the draw with which an AblationClassifier ablates plain images itself
MAX_IMAGES = 2048  # encoded images per base-classifier pass of a vote (memory bound)


# --------------------------------------------------------------------------------------------
# Ablate and encode


def keep_masks(count: int, height: int, width: int, keep: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(count, 1, H, W) bool: exactly ``keep`` pixels of each, chosen uniformly at random.

    Drawn on the CPU from ``generator`` (torch's global generator when None), then moved to
    ``device``: the same pixels on every device."""
    pixels = height * width
    if not 1 <= keep <= pixels:
        raise ValueError(f"keep must be from 1 to the {pixels} pixels of a {height}x{width} image, got {keep}")
    scores = torch.rand(count, pixels, generator=generator)
    idx = scores.topk(keep, dim=1).indices
    mask = torch.zeros(count, pixels, dtype=torch.bool).scatter_(1, idx, True)
    return mask.view(count, 1, height, width).to(device)


def encode(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The 2C-channel encoding of ``x`` (N, C, H, W) with ``mask`` (N, 1, H, W) the kept pixels:
    (v, 1 − v) per channel value of a kept pixel, (0, 0) for an ablated one. Differentiable in x."""
    m = mask.to(x.dtype)
    return torch.cat([x * m, (1 - x) * m], dim=1)


def ablate(x: torch.Tensor, keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random ablation of each image of ``x``, encoded (2C channels)."""
    B, _, H, W = x.shape
    return encode(x, keep_masks(B, H, W, keep, generator, x.device))


# --------------------------------------------------------------------------------------------
# The base classifier and its checkpoint record


def check_record(record: dict, arch: str, image_size: int) -> None:
    """ValueError unless ``record`` is a classifier spec's valid ablation record."""
    if not isinstance(record, dict) or set(record) != {"keep", "encoding"}:
        raise ValueError(f"ablation must be {{keep, encoding}}, not {record!r}")
    if record["encoding"] != ENCODING:
        raise ValueError(f"ablation encoding {record['encoding']!r} is unknown to this pssr (it knows {ENCODING!r})")
    keep, pixels = record["keep"], image_size * image_size
    if type(keep) is not int or not 1 <= keep <= pixels:
        raise ValueError(f"ablation keep must be an integer from 1 to {pixels}, not {keep!r}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"an ablation classifier is built from the zoo ({', '.join(ARCHITECTURES)}), not {arch!r}")


def encoded_stats(mean, std, fraction: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the encoding of images with channel statistics (mean, std)
    when a share ``fraction`` of the pixels is kept: channel v·m has mean q·μ and second moment
    q·(σ² + μ²), channel (1 − v)·m mean q·(1 − μ) and second moment q·(σ² + (1 − μ)²)."""
    q = float(fraction)
    means, stds = [], []
    for centre in ([float(m) for m in mean], [1 - float(m) for m in mean]):
        for mu, sigma in zip(centre, std):
            means.append(q * mu)
            stds.append(math.sqrt(q * (sigma * sigma + mu * mu) - (q * mu) ** 2))
    return tuple(means), tuple(stds)


class AblationClassifier(Classifier):
    """A zoo classifier over the 2C-channel encoding (normalisation of the encoding first).

    Takes encoded images (2C channels: `encode`, `ablate`), or plain C-channel images in [0, 1],
    which it ablates itself with one draw from a fixed seed, so that it stays a deterministic
    function (the trainer's test accuracy is the base classifier's on one ablation per image).
    The defense is the vote: `AblationDefense`."""

    def __init__(self, normalize: Normalize, body: nn.Module, head: nn.Module, *, channels: int, keep: int):
        super().__init__(normalize, body, head)
        self.channels, self.keep = int(channels), int(keep)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.channels:
            x = ablate(x, self.keep, torch.Generator().manual_seed(FIXED_SEED))
        elif x.shape[1] != 2 * self.channels:
            raise ValueError(f"an ablation classifier takes {self.channels}-channel images or their "
                             f"{2 * self.channels}-channel encoding, not {x.shape[1]} channels")
        return super().features(x)


def build_classifier(spec: ClassifierSpec) -> AblationClassifier:
    """The untrained base classifier of an ablation spec (``classifiers.build`` calls it)."""
    check_record(spec.ablation, spec.arch, spec.image_size)
    keep = spec.ablation["keep"]
    mean, std = encoded_stats(spec.mean, spec.std, keep / spec.image_size**2)
    body, head = ARCHITECTURES[spec.arch](2 * spec.in_channels, spec.num_classes, spec.image_size, **spec.arch_kwargs)
    return AblationClassifier(Normalize(mean, std), body, head, channels=spec.in_channels, keep=keep)


def record_of(spec) -> dict:
    """A classifier spec's ablation record ({} for an ordinary classifier)."""
    return dict(getattr(spec, "ablation", None) or {})


# --------------------------------------------------------------------------------------------
# Training (the ``ablation:`` block of `pssr train-classifier`)


@dataclass
class AblationConfig:
    """``ablation: {keep: 45}``: train the base classifier of randomized ablation on images of which
    only ``keep`` random pixels survive (0: off). Levine and Feizi: 45 on MNIST, 75 on CIFAR-10."""

    keep: int = 0

    def __post_init__(self):
        if self.keep < 0:
            raise ValueError(f"keep must be >= 0 (0: off), got {self.keep}")


def spec_record(cfg, train) -> dict:
    """The ablation record of the classifier a training config makes ({} when off), checked
    against its images; ``cfg``: the whole ClassifierConfig, ``train``: its training ImageDataset."""
    from .training import TrainError

    keep = cfg.ablation.keep
    if not keep:
        return {}
    _, H, W = train.image_shape
    if keep > H * W:
        raise TrainError(f"ablation.keep={keep}: the images have only {H * W} pixels")
    if cfg.adversarial.enabled:
        raise TrainError("ablation and adversarial training do not combine (the attack would perturb the "
                         "encoding); set adversarial.method=none or ablation.keep=0")
    return {"keep": keep, "encoding": ENCODING}


def train_input(cfg: AblationConfig, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A training batch as the model takes it: ``x`` itself, or with ablation on, one random
    ablation of each image, encoded (channels-last like the trainer's batches)."""
    if not cfg.keep:
        return x
    return ablate(x, cfg.keep, generator).contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# The vote and the certificate


def vote_counts(classifier: nn.Module, x: torch.Tensor, keep: int, n: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, classes) int64: per image, how many of ``n`` random ablations the base classifier
    puts in each class. Runs in chunks of draws (at most MAX_IMAGES encoded images at once)."""
    B, _, H, W = x.shape
    per = max(1, MAX_IMAGES // max(1, B))
    counts, done = None, 0
    with torch.no_grad():
        while done < n:
            c = min(per, n - done)
            masks = keep_masks(B * c, H, W, keep, generator, x.device)
            logits = classifier(encode(x.repeat_interleave(c, 0), masks))
            pred = logits.argmax(1).view(B, c)
            if counts is None:
                counts = torch.zeros(B, logits.shape[1], dtype=torch.int64, device=x.device)
            counts.scatter_add_(1, pred, torch.ones_like(pred))
            done += c
    return counts


def soft_vote(classifier: nn.Module, x: torch.Tensor, keep: int, draws: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """log of the mean softmax of the base classifier over ``draws`` random ablations: the
    differentiable surrogate of the vote that attacks see (gradients through the kept pixels)."""
    B, _, H, W = x.shape
    masks = keep_masks(B * draws, H, W, keep, generator, x.device)
    logp = classifier(encode(x.repeat_interleave(draws, 0), masks)).log_softmax(1)
    return torch.logsumexp(logp.view(B, draws, -1), dim=1) - math.log(draws)


def clopper_pearson_lower(count, n: int, alpha: float) -> torch.Tensor:
    """The one-sided (1 − alpha) Clopper-Pearson lower bound of a binomial proportion after
    ``count`` successes in ``n`` trials: the alpha-quantile of Beta(count, n − count + 1), 0 for
    count = 0 (float64; the authors' code: statsmodels' proportion_confint, method "beta", at 2·alpha)."""
    from scipy.stats import beta

    c = torch.as_tensor(count, dtype=torch.float64).cpu()
    bound = beta.ppf(alpha, c.clamp(min=1).numpy(), (n - c + 1).numpy())
    return torch.where(c > 0, torch.as_tensor(bound, dtype=torch.float64), torch.zeros_like(c))


def kept_fraction_unchanged(pixels: int, keep: int) -> torch.Tensor:
    """float64 (pixels − keep + 2,): entry ρ = C(d − ρ, k) / C(d, k), the chance that an ablation
    keeping k of d pixels keeps none of ρ given ones (so Δ(ρ) = 1 − entry ρ); 0 from ρ = d − k + 1."""
    d, k = int(pixels), int(keep)
    out = torch.empty(d - k + 2, dtype=torch.float64)
    out[0] = 1.0
    for rho in range(1, d - k + 2):  # C(d-ρ, k) / C(d-ρ+1, k) = (d-ρ+1-k) / (d-ρ+1)
        out[rho] = out[rho - 1] * (d - rho + 1 - k) / (d - rho + 1)
    return out


def certified_radius(p_lower, pixels: int, keep: int) -> torch.Tensor:
    """int64 per p_lower: the largest ρ with p_lower − Δ(ρ) > 1/2, Δ(ρ) = 1 − C(d − ρ, k)/C(d, k)
    (Levine and Feizi's certificate for a vote whose top class has probability ≥ p_lower); 0 when
    no ρ qualifies. Found in float64, then settled with exact rationals (the float p_lower taken
    exactly), so a ρ on the boundary (e.g. k = 1, p = 0.75: Δ(196) = 1/4 exactly) is decided right."""
    p = torch.as_tensor(p_lower, dtype=torch.float64).reshape(-1).cpu()
    d, k = int(pixels), int(keep)
    unchanged = kept_fraction_unchanged(d, k)
    approx = (unchanged[None, :] > (1.5 - p)[:, None]).sum(1) - 1  # ρ = 0 .. radius qualify (monotone)
    total = math.comb(d, k)

    def qualifies(value: Fraction, rho: int) -> bool:
        return 0 <= rho <= d - k + 1 and value - 1 + Fraction(math.comb(d - rho, k), total) > Fraction(1, 2)

    exact: dict[float, int] = {}
    for value, rho in zip(p.tolist(), approx.tolist()):
        if value not in exact:
            v = Fraction(value)
            while rho >= 0 and not qualifies(v, rho):
                rho -= 1
            while qualifies(v, rho + 1):
                rho += 1
            exact[value] = max(rho, 0)
    return torch.tensor([exact[value] for value in p.tolist()], dtype=torch.int64)


def certify(classifier: nn.Module, x: torch.Tensor, predicted: torch.Tensor, keep: int, n: int, alpha: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image, the certified L0 radius of the vote for ``predicted`` (the class chosen by the
    vote, from other draws): ``n`` fresh ablations, the Clopper-Pearson lower bound at 1 − alpha
    of the share that says ``predicted``, then `certified_radius`. int64 on the CPU."""
    counts = vote_counts(classifier, x, keep, n, generator)
    top = counts.gather(1, predicted.to(counts.device).view(-1, 1)).view(-1)
    _, _, H, W = x.shape
    return certified_radius(clopper_pearson_lower(top, n, alpha), H * W, keep)


# --------------------------------------------------------------------------------------------
# The defense


class AblationDefense(Defense):
    """``ablation:keep=K,n=N``: the majority vote of the base classifier over ``n`` random
    ablations keeping ``keep`` pixels (default: the checkpoint's). ``attack_n``: draws in each
    forward pass an attacker differentiates or queries (the soft vote; EOT averages --eot of those).
    ``cert``: draws for the certificate in the clean pass (0: none), at confidence 1 − ``alpha``.
    ``score=all``: the prediction counts only where all n draws agree (DESIGN.md §10's "right on
    every one of N draws"); an extra last logit says "not unanimous"."""

    name = "ablation"
    randomized = True
    differentiable = True  # ablation is multiplication by a mask: the soft vote has a true gradient
    takes_ablation_classifier = True  # evaluate: an ablation classifier is defended by this only

    def __init__(self, keep: int | None = None, n: int = 100, attack_n: int = 16, cert: int = 1000,
                 alpha: float = 0.05, score: str = "vote"):
        for key, value, low in (("keep", keep, 1), ("n", n, 1), ("attack_n", attack_n, 1), ("cert", cert, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise DefenseError(f"ablation: {key} must be an integer >= {low}, got {value!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
            raise DefenseError(f"ablation: alpha must be in (0, 0.5), got {alpha!r}")
        if score not in ("vote", "all"):
            raise DefenseError(f"ablation: score must be vote or all, got {score!r}")
        params = {"keep": keep} if keep is not None else {}
        super().__init__(**params, n=n, attack_n=attack_n, cert=cert, alpha=alpha, score=score)
        self.keep, self.n, self.attack_n, self.cert, self.alpha, self.score = keep, n, attack_n, cert, alpha, score
        self.pixels: int | None = None

    def bind(self, classifier: nn.Module, spec) -> None:
        record = record_of(spec)
        if not record:
            raise DefenseError("ablation: the classifier was not trained on ablated images (train one with "
                               "pssr train-classifier mnist-ablation or cifar10-ablation)")
        if record.get("encoding") != ENCODING:
            raise DefenseError(f"ablation: the classifier's encoding {record.get('encoding')!r} is not {ENCODING!r}")
        self.pixels = spec.image_size * spec.image_size
        self.keep = self.params.get("keep", record["keep"])
        if self.keep > self.pixels:
            raise DefenseError(f"ablation: keep={self.keep} but the images have only {self.pixels} pixels")

    def _ready(self) -> int:
        if self.keep is None:
            raise DefenseError("ablation: the defense needs its classifier (call bind first)")
        return self.keep

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        raise DefenseError("ablation is no preprocessor: it classifies by a vote (Defense.classify)")

    def classify(self, classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The vote as scores: each class's share of the n draws (argmax: the majority, ties to the
        lower class); with score=all, one-hot on the unanimous class or on the extra last column."""
        counts = vote_counts(classifier, x, self._ready(), self.n)
        if self.score == "vote":
            return counts.to(torch.float32) / self.n
        top = counts.max(1)
        out = torch.zeros(len(x), counts.shape[1] + 1)
        unanimous = top.values == self.n
        out[torch.arange(len(x)), torch.where(unanimous, top.indices.cpu(), counts.shape[1])] = 1
        return out.to(x.device)

    def attack_logits(self, classifier: nn.Module, x: torch.Tensor, gradient: str = "bpda") -> torch.Tensor:
        if gradient not in self.attack_gradients:
            raise DefenseError(f"defense {self.describe()} has no {gradient!r} gradient")
        return soft_vote(classifier, x, self._ready(), min(self.attack_n, self.n))

    def certify(self, classifier: nn.Module, x: torch.Tensor, predicted: torch.Tensor, batch_size: int = 256):
        """Per image, the certified L0 radius of the vote ``predicted`` (None with cert=0 or score=all)."""
        if not self.cert or self.score != "vote":
            return None
        keep = self._ready()
        return torch.cat([certify(classifier, xb, pb, keep, self.cert, self.alpha)
                          for xb, pb in zip(x.split(batch_size), predicted.split(batch_size))])


def median_radius(radius: torch.Tensor) -> int:
    """The paper's "median certified robustness": the (lower) median of the per-image radii, a wrong
    vote counting -1."""
    values = radius.to(torch.int64).sort().values
    return int(values[(len(values) - 1) // 2]) if len(values) else -1


__all__ = ["ENCODING", "AblationClassifier", "AblationConfig", "AblationDefense", "ablate", "certified_radius",
           "certify", "clopper_pearson_lower", "encode", "keep_masks", "soft_vote", "vote_counts"]
