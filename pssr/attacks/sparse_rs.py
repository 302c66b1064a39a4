"""Sparse-RS: score-based sparse and patch attacks by random search.

Croce, Singh, Andriushchenko, Flammarion and Hein, "Sparse-RS: a versatile framework for
query-efficient sparse black-box adversarial attacks", AAAI 2022 (github.com/fra31/sparse-rs,
``rs_attacks.py``), untargeted, written here in the shape of torchattacks' ``Square``: an
``Attack`` whose ``forward(images, labels)`` returns the adversarial images.

Two threat models (``eps`` is a whole number):

* ``norm="L0"``: at most ``eps`` = k pixels change; a pixel counts once whatever its channels,
  and its new values may be anything in [0, 1] (the search draws each channel from {0, 1}, as
  the paper does). The search holds k perturbed pixels and, per query, swaps a fraction of them
  (the schedule of :meth:`SparseRS._fraction`) for unperturbed ones with new colours.
* ``norm="patch"``: one ``eps`` × ``eps`` square, anywhere in the image, content searched. Per
  query either its content changes (a sub-square recoloured, later single channels flipped) or,
  every 4th query, its position moves by a shift that shrinks over the run.

Both keep a candidate only if it lowers the loss (the margin ``logit_y − max_other`` by
default), so the loss of the kept images never rises. Only images the model classifies correctly
are attacked; an image stops being queried once its margin is below ``−1e-5`` (misclassified),
each restart begins afresh on the images still unbroken, and every image comes back as the best
candidate found for it (images misclassified clean: unchanged). ``self.queries`` holds, per image,
the forward passes spent on it (the clean one included). The model is only queried (no gradient),
so a defended model needs no gradient rule. All randomness comes from one ``torch.Generator`` on
the images' device, seeded from ``seed``; the global RNGs are never touched.
"""

from __future__ import annotations

import bisect
import math

import torch
from torchattacks.attack import Attack
from torch.nn import functional as F

__all__ = ["SparseRS"]

# The paper's piecewise-constant schedule of p (rs_attacks.py, p_selection) on the query index
# rescaled to a 10,000-query run: p = p_init / divisors[i] on the i-th interval, the boundaries
# belonging to the interval below them.
_SCHEDULE = {
    "L0": ((0, 50, 200, 500, 1000, 2000, 4000, 6000, 8000), (1, 2, 4, 5, 6, 8, 10, 12, 15, 20)),
    "patch": ((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000), (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
}
# The paper's untargeted settings: p_init (its alpha_init), and every 4th query moves the patch.
_P_INIT = {"L0": 0.3, "patch": 0.4}
_MOVE_EVERY = 4
_INIT_SQUARES = 1000  # random squares painted into a new patch (rs_attacks.py, 'random_squares')
FOOLED = -1e-5  # an image whose margin is below this is misclassified: its search stops


class SparseRS(Attack):
    r"""Sparse-RS, untargeted: at most ``eps`` changed pixels (``"L0"``) or one ``eps``×``eps``
    patch (``"patch"``), ``n_queries`` per restart, loss ``"margin"`` or ``"ce"``.

    Shape: images (N, C, H, W) in [0, 1], labels (N,); returns (N, C, H, W)."""

    def __init__(self, model, norm="L0", eps=10, n_queries=1000, n_restarts=1, p_init=None, loss="margin", seed=0):
        super().__init__("SparseRS", model)
        if norm not in _SCHEDULE:
            raise ValueError(f"Sparse-RS: norm must be L0 or patch, got {norm!r}")
        if isinstance(eps, bool) or float(eps) != int(eps) or int(eps) < 1:
            raise ValueError(f"Sparse-RS: eps must be a whole number ≥ 1 (pixels or the patch side), got {eps!r}")
        if int(n_queries) < 1 or int(n_restarts) < 1:
            raise ValueError("Sparse-RS: n_queries and n_restarts must be ≥ 1")
        if loss not in ("margin", "ce"):
            raise ValueError(f"Sparse-RS: loss must be margin or ce, got {loss!r}")
        self.norm, self.eps, self.loss = norm, int(eps), loss
        self.n_queries, self.n_restarts = int(n_queries), int(n_restarts)
        self.p_init = _P_INIT[norm] if p_init is None else float(p_init)
        if not 0 < self.p_init <= 1:
            raise ValueError(f"Sparse-RS: p_init must be in (0, 1], got {p_init!r}")
        self.seed = int(seed)
        self.queries = None
        self._flip_from = self._single_channel_start() if norm == "patch" else None

    def forward(self, images, labels):
        """Restarts over the images still classified right; the best candidate per image."""
        x = images.clone().detach().to(self.device or images.device)
        y = labels.clone().detach().to(x.device).long()
        self.queries = torch.zeros(len(x), dtype=torch.long, device=x.device)
        if len(x) == 0:
            return x
        self._check_budget(x)
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        search = self._l0_search if self.norm == "L0" else self._patch_search
        margin, _ = self._margin(x, y)
        self.queries += 1
        adv, best = x.clone(), torch.full_like(margin, math.inf)
        todo = margin > 0  # classified correctly: the only images attacked
        for _ in range(self.n_restarts):
            idx = todo.nonzero().flatten()
            if len(idx) == 0:
                break
            found, margin_r, loss_r, queries = search(x[idx], y[idx], gen)
            self.queries[idx] += queries
            better = (loss_r < best[idx]) | (margin_r < FOOLED)  # a fooled image wins whatever its loss
            adv[idx[better]], best[idx[better]] = found[better], loss_r[better]
            todo[idx[margin_r < FOOLED]] = False
        return adv

    def _check_budget(self, x):
        if x.dim() != 4:
            raise ValueError(f"Sparse-RS needs images (N, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[2:]
        if self.norm == "L0" and self.eps > h * w:
            raise ValueError(f"Sparse-RS: k = {self.eps} pixels, but the images have only {h * w}")
        if self.norm == "patch" and self.eps > min(h, w):
            raise ValueError(f"Sparse-RS: a {self.eps}×{self.eps} patch does not fit {h}×{w} images")

    def _margin(self, x, y):
        """(margin, loss) per image from one batched query of the model's real forward."""
        with torch.no_grad():
            logits = self.get_logits(x)
        true = logits.gather(1, y[:, None]).squeeze(1)
        margin = true - logits.scatter(1, y[:, None], -math.inf).amax(1)
        if self.loss == "ce":
            return margin, -F.cross_entropy(logits, y, reduction="none")
        return margin, margin

    def _fraction(self, it):
        """The paper's p at query `it`: L0, the fraction of the k pixels to resample; patch, the
        area fraction of the sub-square to recolour."""
        bounds, divisors = _SCHEDULE[self.norm]
        scaled = int(it / self.n_queries * 10000)
        return self.p_init / divisors[bisect.bisect_left(bounds, scaled)]

    def _search(self, x, y, gen, state, propose, render):
        """Random search that keeps improvements only. ``state``: per-image tensors (first dim N);
        per query, ``propose`` changes the state of the images not yet fooled and ``render`` makes
        their images. Returns (best images, their margins, their losses, queries per image)."""
        best = render(x, state)
        margin, loss = self._margin(best, y)
        queries = torch.ones(len(x), dtype=torch.long, device=x.device)
        for it in range(1, self.n_queries):
            act = (margin >= FOOLED).nonzero().flatten()
            if len(act) == 0:
                break
            cand = propose({k: v[act] for k, v in state.items()}, x[act], it, gen)
            images = render(x[act], cand)
            new_margin, new_loss = self._margin(images, y[act])
            queries[act] += 1
            keep = (new_loss < loss[act]) | (new_margin < FOOLED)
            idx = act[keep]
            for k, v in state.items():
                v[idx] = cand[k][keep]
            best[idx], margin[idx], loss[idx] = images[keep], new_margin[keep], new_loss[keep]
        return best, margin, loss, queries

    # ---------------------------------------------------------------------------------------
    # L0: k pixels

    def _l0_search(self, x, y, gen):
        """State: ``pixels``, a permutation of the H·W pixel indices per image whose first k are
        the perturbed ones, and ``colors`` (N, C, k), their values."""
        n, c, h, w = x.shape
        state = {"pixels": torch.rand(n, h * w, generator=gen, device=x.device).argsort(1),
                 "colors": self._colors((n, c, self.eps), gen, x)}
        return self._search(x, y, gen, state, self._l0_propose, self._l0_render)

    def _l0_render(self, x, state):
        c, k = x.shape[1], self.eps
        flat = x.flatten(2).clone()
        flat.scatter_(2, state["pixels"][:, None, :k].expand(-1, c, -1), state["colors"])
        return flat.view_as(x)

    def _l0_propose(self, state, x, it, gen):
        """Swap m = p·k of the perturbed pixels for unperturbed ones with new colours (the old
        ones return to their clean values); with m = 1 the new colour differs from the clean one."""
        pixels, colors = state["pixels"].clone(), state["colors"].clone()
        n, c, k, total = len(x), x.shape[1], self.eps, pixels.shape[1]
        m = max(int(self._fraction(it) * k), 1)
        out = self._pick(n, k, m, gen, x.device)
        into = k + self._pick(n, total - k, m, gen, x.device) if total > k else out
        leaving, coming = pixels.gather(1, out), pixels.gather(1, into)
        pixels.scatter_(1, out, coming)
        pixels.scatter_(1, into, leaving)
        new = self._colors((n, c, m), gen, x)
        if m == 1:
            new = self._differ(new, x.flatten(2).gather(2, coming[:, None].expand(-1, c, -1)), gen)
        colors.scatter_(2, out[:, None].expand(-1, c, -1), new)
        return {"pixels": pixels, "colors": colors}

    # ---------------------------------------------------------------------------------------
    # Patches: one s×s square

    def _patch_search(self, x, y, gen):
        """State: ``patch`` (N, C, s, s) and ``loc`` (N, 2), its top-left corner (row, column)."""
        n, c, h, w = x.shape
        s = self.eps
        loc = torch.stack([torch.randint(0, h - s + 1, (n,), generator=gen, device=x.device),
                           torch.randint(0, w - s + 1, (n,), generator=gen, device=x.device)], 1)
        patch = torch.zeros(n, c, s, s, dtype=x.dtype, device=x.device)
        top = max(2, math.ceil(s**0.5))  # squares of side 1 .. ceil(√s) - 1, as rs_attacks.py
        for _ in range(_INIT_SQUARES):
            side = torch.randint(1, top, (n, 1, 1, 1), generator=gen, device=x.device)
            patch = torch.where(self._square(n, s, side, gen, x.device), self._colors((n, c, 1, 1), gen, x), patch)
        return self._search(x, y, gen, {"patch": patch, "loc": loc}, self._patch_propose, self._patch_render)

    def _patch_render(self, x, state):
        n, s = len(x), self.eps
        r = torch.arange(s, device=x.device)
        rows = (state["loc"][:, :1] + r)[:, :, None]
        cols = (state["loc"][:, 1:] + r)[:, None, :]
        out = x.clone()
        out[torch.arange(n, device=x.device)[:, None, None], :, rows, cols] = state["patch"].permute(0, 2, 3, 1)
        return out

    def _patch_propose(self, state, x, it, gen):
        """Every 4th query (while the shift is ≥ 1 pixel) move the patch; otherwise recolour a
        sub-square of side √p·s, or, in the second half after that side reached 1, flip one
        channel of one pixel."""
        patch, loc = state["patch"].clone(), state["loc"].clone()
        (n, c, h, w), s, dev = x.shape, self.eps, x.device
        shift = int(max((1 - it / self.n_queries) * 0.75 * h, 0))  # rs_attacks.py sh_selection
        if it % _MOVE_EVERY == 0 and shift > 0:
            loc += torch.randint(-shift, shift + 1, (n, 2), generator=gen, device=dev)
            loc = torch.minimum(loc.clamp_min(0), torch.tensor([h - s, w - s], device=dev))
        elif it < self._flip_from:
            side = max(int(self._fraction(it) ** 0.5 * s), 1)
            inside = self._square(n, s, side, gen, dev)
            new = self._colors((n, c, 1, 1), gen, x)
            if side == 1:
                new = self._differ(new, (patch * inside).sum((2, 3), keepdim=True), gen)
            patch = torch.where(inside, new, patch)
        else:
            channel = F.one_hot(torch.randint(0, c, (n,), generator=gen, device=dev), c).bool()[:, :, None, None]
            flip = self._square(n, s, 1, gen, dev) & channel
            patch = torch.where(flip, 1 - patch, patch)
        return {"patch": patch, "loc": loc}

    def _single_channel_start(self):
        """rs_attacks.py: single-channel flips start halfway between the first query whose
        sub-square side is 1 and the end."""
        it = 0
        for it in range(self.n_queries):
            if max(int(self._fraction(it) ** 0.5 * self.eps), 1) == 1:
                break
        return it + (self.n_queries - it) // 2

    # ---------------------------------------------------------------------------------------
    # Draws (all from the one generator)

    @staticmethod
    def _colors(shape, gen, like):
        """Values drawn from {0, 1}."""
        return torch.randint(0, 2, shape, generator=gen, device=like.device).to(like.dtype)

    def _differ(self, new, old, gen):
        """Redraw the colours (channels on dim 1) that equal the old ones on every channel."""
        same = (new == old).all(1, keepdim=True)
        while same.any():
            new = torch.where(same, self._colors(new.shape, gen, new), new)
            same = (new == old).all(1, keepdim=True)
        return new

    @staticmethod
    def _pick(n, size, m, gen, device):
        """m distinct indices out of range(size), per row (n, m)."""
        return torch.rand(n, size, generator=gen, device=device).topk(m, dim=1).indices

    @staticmethod
    def _square(n, s, side, gen, device):
        """(n, 1, s, s) masks of a side×side square (side: int or (n, 1, 1, 1)) at a random place."""
        room = s - side + 1
        top = (torch.rand(n, 1, 1, 1, generator=gen, device=device) * room).long()
        left = (torch.rand(n, 1, 1, 1, generator=gen, device=device) * room).long()
        r = torch.arange(s, device=device)
        rows = (r.view(1, 1, s, 1) >= top) & (r.view(1, 1, s, 1) < top + side)
        cols = (r.view(1, 1, 1, s) >= left) & (r.view(1, 1, 1, s) < left + side)
        return rows & cols
