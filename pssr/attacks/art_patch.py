"""ART's adversarial patch (Brown et al. 2017, ``AdversarialPatchPyTorch``) as a universal s×s patch.

What it does, per batch that :func:`pssr.attacks.run_attack` hands it (``--batch-size`` images):

1. **Train one patch on these images.** ART's ``AdversarialPatchPyTorch.generate``, untargeted
   (it maximises the cross-entropy of the true labels), Adam on the patch's values in [0, 1],
   ``max_iter`` passes over the batch (one forward and backward of all its images each). The
   patch is square, of side ``eps`` = s, never rotated, distorted or rescaled (``rotation_max=0``,
   ``distortion_scale_max=0``, ``scale_min=scale_max=s/side``), and ART pastes it at a random
   place in every image at every step (its expectation over locations). The patch is made on the
   evaluated images themselves (transductive: the strongest universal patch for them, not one
   carried over from other images), and on the model run_attack is given: the undefended
   classifier for the oblivious threat model, the defended model, with its gradient rule, when
   ``pssr eval`` runs it through a defense.
2. **Apply it.** Each image gets the same patch, pasted pixel for pixel (not ART's resampling
   ``apply_patch``, whose nearest-neighbour affine can spill a row over s) with its top-left
   corner drawn uniformly over the image from a generator seeded by ``seed``. At most an s×s
   square changes, which run_attack checks.

So its robust accuracy answers "does one patch, learned on these images, fool the model wherever
it lands", which is weaker than a per-image patch search (``sparse-rs-patch``). ART's random
placement draws from numpy's and torch's global RNGs: run_attack seeds both per batch and gives
both back as they were. ART is imported on first use only. ``AdversarialPatchPyTorch`` imports
torchvision (its overlay is torchvision's resize, pad, perspective and affine), which pssr does not
install: without a torchvision built for the installed torch (the CPU torch here has none on its
package index: the one there needs CUDA's libraries) the attack stops at once with one line.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torchattacks.attack import Attack

from .spec import AttackError

__all__ = ["UniversalPatch"]


def _patch_attack_class():
    """ART's AdversarialPatchPyTorch, or one line saying why torchvision (which it imports) fails."""
    try:
        import torchvision  # noqa: F401  (a CUDA build beside a CPU torch raises RuntimeError, not ImportError)
    except Exception as exc:
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        raise AttackError(f"adversarial-patch: ART's AdversarialPatchPyTorch needs torchvision built for torch "
                          f"{torch.__version__}, and it does not import ({why}); install the matching torchvision") from None
    from art.attacks.evasion import AdversarialPatchPyTorch

    return AdversarialPatchPyTorch


class UniversalPatch(Attack):
    r"""One universal ``eps``×``eps`` patch per batch, trained by ART's ``AdversarialPatchPyTorch``
    (``max_iter`` Adam steps of ``learning_rate``), pasted at a seeded random place in each image.

    Shape: images (N, C, H, W) in [0, 1], labels (N,); returns (N, C, H, W)."""

    def __init__(self, model, eps=5, max_iter=100, learning_rate=0.1, seed=0):
        super().__init__("UniversalPatch", model)
        if isinstance(eps, bool) or float(eps) != int(eps) or int(eps) < 1:
            raise ValueError(f"adversarial patch: eps must be a whole number ≥ 1 (the patch side), got {eps!r}")
        self.eps, self.max_iter, self.learning_rate, self.seed = int(eps), int(max_iter), float(learning_rate), int(seed)
        self.patch = None  # the last patch trained (C, s, s), for inspection
        self._art_attack = _patch_attack_class()

    def forward(self, images, labels):
        x = images.clone().detach().to(self.device or images.device)
        y = labels.clone().detach().to(x.device)
        n, c, h, w = x.shape
        s = self.eps
        if s > min(h, w):
            raise ValueError(f"adversarial patch: a {s}×{s} patch does not fit {h}×{w} images")
        self.patch = self._train(x, y).to(dtype=x.dtype, device=x.device)
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        rows = torch.randint(0, h - s + 1, (n,), generator=gen, device=x.device).tolist()
        cols = torch.randint(0, w - s + 1, (n,), generator=gen, device=x.device).tolist()
        out = x.clone()
        for i, (r, q) in enumerate(zip(rows, cols)):
            out[i, :, r : r + s, q : q + s] = self.patch
        return out

    def _train(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ART's patch (C, s, s) for these images, untargeted."""
        import numpy as np
        from art.estimators.classification import PyTorchClassifier

        n, c, h, w = x.shape
        with torch.no_grad():
            n_classes = int(self.get_logits(x[:1]).shape[1])
        cuda = x.device.type == "cuda"
        with torch.cuda.device(x.device) if cuda else contextlib.nullcontext():
            classifier = PyTorchClassifier(
                self.model, loss=nn.CrossEntropyLoss(), input_shape=(c, h, w), nb_classes=n_classes,
                clip_values=(0.0, 1.0), device_type="gpu" if cuda else "cpu",
            )  # fmt: skip
            scale = self.eps / min(h, w)
            attack = self._art_attack(
                classifier, rotation_max=0.0, scale_min=scale, scale_max=scale, distortion_scale_max=0.0,
                learning_rate=self.learning_rate, max_iter=self.max_iter, batch_size=n, patch_shape=(c, self.eps, self.eps),
                patch_type="square", optimizer="Adam", targeted=False, verbose=False,
            )  # fmt: skip
            onehot = np.eye(n_classes, dtype=np.float32)[y.cpu().numpy()]
            patch, _ = attack.generate(x.detach().cpu().numpy().astype(np.float32), y=onehot, shuffle=False)
        return torch.from_numpy(np.asarray(patch)).clamp(0, 1)

