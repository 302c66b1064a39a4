"""The training attack's examples and surgery masks, made once and stored (DESIGN.md §9).

f is frozen while the purifier trains, so PGD against it and the masks of both the adversarial and
the clean images are the same at every epoch up to PGD's random start. Made once, they halve the
cost of a training step (measured on MNIST: 3.7 s of PGD-10 per batch of 128 against ~2 s for
the rest of the step). What is stored is exactly what the on-the-fly path computes: chunk c of
the training images is attacked with the seed (seed, c), whatever the number of processes, and
the masks come from the same fused op.

The file (safetensors, atomic) holds its key: the classifier's sha256, the attack, the surgery,
the data set and image count and the seed; a cache with another key is refused and remade.

Making it takes a while (30 min for MNIST's 60k images on 2 cores), so it survives a stop: every
few chunks a process writes what it made since as a *part* file (atomic, with the key and the
chunk numbers) into ``<cache>.parts/``; a new start with the same key uses every part there, from
any process count, since a chunk's content depends on its number only. The parts are deleted once
the whole cache is stored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import attacks, checkpoint
from .training import seeded_generator

KIND = "purifier-attack-cache"
PART_KIND = "purifier-attack-cache-part"
CHUNK = 256  # images per attack call; part of the key (PGD's random start is drawn per chunk)
PART_CHUNKS = 8  # chunks per part file


@dataclass
class Cached:
    x_adv: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    mask_adv: torch.Tensor  # (N, 1, H, W) bool, the surgery mask of x_adv
    mask_clean: torch.Tensor  # (N, 1, H, W) bool, the surgery mask of the clean image


def key(classifier_sha: str, attack_label: str, surgery, dataset: str, n: int, seed: int) -> dict:
    return {"classifier_sha256": classifier_sha, "attack": attack_label, "surgery": asdict(surgery),
            "dataset": dataset, "images": n, "seed": seed, "chunk": CHUNK}


def chunk_seed(seed: int, chunk: int) -> int:
    return int(seeded_generator(seed, chunk, 11).initial_seed())


def load(path: Path, want: dict) -> Cached | None:
    """The cache at ``path`` if it was made for ``want``; None if absent or made for another key."""
    if not path.is_file():
        return None
    try:
        tensors, info = checkpoint.load(path, kind=KIND)
    except checkpoint.CheckpointError:
        return None
    if json.dumps(info.get("key"), sort_keys=True) != json.dumps(want, sort_keys=True):
        return None
    return Cached(tensors["x_adv"], tensors["mask_adv"], tensors["mask_clean"])


def _rows(c: int, n: int) -> slice:
    return slice(c * CHUNK, min(n, (c + 1) * CHUNK))


def _load_parts(parts: Path, want: dict) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """The part files made for ``want`` (others, and unreadable ones, are ignored)."""
    found = []
    for file in sorted(parts.glob("*.safetensors")) if parts.is_dir() else []:
        try:
            tensors, info = checkpoint.load(file, kind=PART_KIND)
        except checkpoint.CheckpointError:
            continue
        if json.dumps(info.get("key"), sort_keys=True) == json.dumps(want, sort_keys=True):
            found.append(([int(c) for c in info["chunks"]], tensors))
    return found


def make(images: torch.Tensor, labels: torch.Tensor, f, surgery, attack, seed: int, *, rank: int = 0,
         world: int = 1, device=torch.device("cpu"), progress=None, parts: Path | None = None,
         want: dict | None = None) -> Cached:
    """Attack and cut every training image; each process takes every world-th chunk, then all share.

    ``images`` is the uint8 training set (N, C, H, W). Under torchrun the parts are summed with an
    all-reduce (every other process holds zeros there, so the sum is exact). With ``parts`` (a
    folder) and ``want`` (the cache's key), finished chunks are written there as they come and
    chunks already there are not made again.
    """
    n = len(images)
    x_adv = torch.zeros(images.shape, dtype=torch.float32, device=device)
    m_adv = torch.zeros((n, 1, *images.shape[-2:]), dtype=torch.uint8, device=device)
    m_clean = torch.zeros_like(m_adv)
    done: set[int] = set()
    if parts is not None:
        for chunks, tensors in _load_parts(parts, want):
            offset = 0
            for c in chunks:
                rows = _rows(c, n)
                k = rows.stop - rows.start
                if c % world == rank:  # the other processes hold zeros there, as the all-reduce needs
                    x_adv[rows] = tensors["x_adv"][offset : offset + k].to(device)
                    m_adv[rows] = tensors["mask_adv"][offset : offset + k].to(device)
                    m_clean[rows] = tensors["mask_clean"][offset : offset + k].to(device)
                done.add(c)
                offset += k
    pending: list[int] = []
    for c in range(rank, (n + CHUNK - 1) // CHUNK, world):
        rows = _rows(c, n)
        if c not in done:
            x = images[rows].to(device).float().div_(255)
            y = labels[rows].to(device)
            adv = attacks.run_attack(attack, f, x, y, seed=chunk_seed(seed, c), batch_size=CHUNK)
            x_adv[rows] = adv
            m_adv[rows] = surgery(adv)[1].to(torch.uint8)
            m_clean[rows] = surgery(x)[1].to(torch.uint8)
            pending.append(c)
            if parts is not None and len(pending) == PART_CHUNKS:
                _save_part(parts, pending, x_adv, m_adv, m_clean, want)
                pending = []
        if progress is not None:
            progress(rows.stop - rows.start)
    if parts is not None and pending:
        _save_part(parts, pending, x_adv, m_adv, m_clean, want)
    if world > 1:
        for t in (x_adv, m_adv, m_clean):
            dist.all_reduce(t)
    return Cached(x_adv, m_adv.bool(), m_clean.bool())


def _save_part(parts: Path, chunks: list[int], x_adv, m_adv, m_clean, want: dict) -> None:
    n = len(x_adv)
    rows = [_rows(c, n) for c in chunks]
    parts.mkdir(parents=True, exist_ok=True)
    tensors = {name: torch.cat([t[r] for r in rows]).cpu().contiguous()
               for name, t in (("x_adv", x_adv), ("mask_adv", m_adv), ("mask_clean", m_clean))}
    checkpoint.save(parts / f"chunks-{chunks[0]:06d}-{chunks[-1]:06d}.safetensors", tensors,
                    {"kind": PART_KIND, "key": want, "chunks": chunks})


def remove_parts(parts: Path) -> None:
    """Deletes the part files once the whole cache is stored."""
    if parts.is_dir():
        for file in parts.glob("*.safetensors"):
            file.unlink()
        try:
            parts.rmdir()
        except OSError:  # something else is in there: leave it
            pass


def save(path: Path, cached: Cached, want: dict) -> None:
    checkpoint.save(path, {"x_adv": cached.x_adv.cpu().contiguous(), "mask_adv": cached.mask_adv.cpu().contiguous(),
                           "mask_clean": cached.mask_clean.cpu().contiguous()}, {"kind": KIND, "key": want})
