"""The paper's claims, each judged from a reproduce run's numbers by a rule fixed in advance
(so that the verdict is not chosen after seeing the data):

1. position embeddings help: 1-D (stem) minus none (stem), few-shot on dataset B; holds when
   the gap is more than two standard errors of the difference over seeds.
2. their kind matters little: the spread (max - min) of the trained position-embedding cells
   is smaller than their lead over no position embedding (the worst of them minus none).
3. attention distance grows with depth: the last layer's mean over heads minus the first's
   is positive (quickstart model, figures.json).
4. position embeddings learn 2-D structure: similarity to the 4 neighbours minus to far
   patches, and to the same row/column minus to the others, are both positive.
5. ViT needs more data than a CNN: (CNN - ViT) few-shot accuracy is larger at the smallest
   pretraining subset than at the largest (the gap closes, or turns, as data grows).

A claim whose runs are missing is "not run"; numbers are never invented for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class Claim:
    claim: str
    paper: str  # what the paper reports
    measured: str  # the numbers here
    held: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return {True: "held", False: "did not hold", None: "not run"}[self.held]


def _ms(cell: Any) -> str:
    """`0.6412 ± 0.0100 (n=3)` of a report Cell."""
    std = f" ± {cell.std:.4f}" if cell.std is not None else ""
    return f"{cell.mean:.4f}{std} (n={len(cell.values)})"


def _se(cell: Any) -> float:
    return (cell.std or 0.0) / math.sqrt(len(cell.values))


def position_helps(cells: dict, metric: str) -> Claim:
    paper = "ViT-B/16 few-shot: 0.6138 without, 0.6421 with 1-D (stem)"
    none, one_d = cells.get(("none", "stem")), cells.get(("learned_1d", "stem"))
    if not (none and none.values and one_d and one_d.values):
        return Claim("Position embeddings help", paper, "not run", None)
    gap = one_d.mean - none.mean
    se = math.hypot(_se(one_d), _se(none))
    measured = f"{metric}: none {_ms(none)}, 1-D {_ms(one_d)}; gap {gap:+.4f} (2 SE = {2 * se:.4f})"
    if none.test_accs and one_d.test_accs:
        measured += (
            f"; dataset A test accuracy none {none.test_mean:.4f}, 1-D {one_d.test_mean:.4f}"
        )
    return Claim("Position embeddings help", paper, measured, gap > 2 * se)


def kind_matters_little(cells: dict, metric: str) -> Claim:
    paper = "all 7 position-embedding cells within 0.640-0.643, none at 0.614"
    none = cells.get(("none", "stem"))
    trained = {k: c for k, c in cells.items() if k[0] != "none" and c.values}
    if not (none and none.values and len(trained) >= 2):
        return Claim("Their kind matters little", paper, "not run", None)
    means = {k: c.mean for k, c in trained.items()}
    lo, hi = min(means, key=means.get), max(means, key=means.get)
    spread, lead = means[hi] - means[lo], means[lo] - none.mean
    measured = (
        f"{metric} over {len(trained)} cells: {means[lo]:.4f} ({'/'.join(lo)}) to "
        f"{means[hi]:.4f} ({'/'.join(hi)}), spread {spread:.4f}; worst minus none {lead:+.4f}"
    )
    return Claim("Their kind matters little", paper, measured, spread < lead)


def distance_grows(figures: dict | None) -> Claim:
    paper = "mean attention distance grows with depth (Fig. 7 right)"
    d = (figures or {}).get("attention_distance") or {}
    if "mean_per_layer" not in d:
        return Claim("Attention distance grows with depth", paper, "not run", None)
    per_layer = ", ".join(f"{v:.2f}" for v in d["mean_per_layer"])
    delta = d["last_minus_first_layer"]
    measured = f"mean over heads per layer (px): {per_layer}; last - first {delta:+.2f}"
    boxes = ((figures or {}).get("model") or {}).get("token_boxes_xyxy")
    if boxes:  # what attention spread evenly over every patch would give
        centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in boxes]
        dists = [math.dist(a, b) for a in centres for b in centres]
        measured += f" (uniform attention: {sum(dists) / len(dists):.2f})"
    return Claim("Attention distance grows with depth", paper, measured, delta > 0)


def position_structure(figures: dict | None) -> Claim:
    paper = "similar embeddings for close patches, row/column structure (Fig. 7 centre)"
    tables = ((figures or {}).get("pos_embed_similarity") or {}).get("tables") or []
    if not tables or "neighbours_minus_far" not in tables[0]:
        return Claim("Position embeddings learn 2-D structure", paper, "not run", None)
    t = tables[0]
    measured = (
        f"cosine similarity to the 4 neighbours minus to far patches "
        f"{t['neighbours_minus_far']:+.3f}; same row/column minus other "
        f"{t['same_row_col_minus_other']:+.3f}"
    )
    held = t["neighbours_minus_far"] > 0 and t["same_row_col_minus_other"] > 0
    return Claim("Position embeddings learn 2-D structure", paper, measured, held)


def vit_needs_more_data(cells: dict, metric: str) -> Claim:
    """cells: the data-scaling sweep's, keyed (model, subset)."""
    paper = "BiT beats ViT on small pretraining sets, ViT catches up and passes it on large"
    by_model: dict[str, list] = {}
    for key, cell in cells.items():
        if cell.values and cell.images is not None:
            by_model.setdefault(key[0], []).append((cell.images, cell))
    cnn = [m for m in by_model if m.startswith("bit")]
    vit = [m for m in by_model if m.startswith("vit")]
    if not (cnn and vit):
        return Claim("ViT needs more data than a CNN", paper, "not run", None)
    a, b = dict(by_model[cnn[0]]), dict(by_model[vit[0]])
    sizes = sorted(set(a) & set(b))
    if len(sizes) < 2:
        return Claim("ViT needs more data than a CNN", paper, "not run", None)
    gaps = {n: a[n].mean - b[n].mean for n in sizes}
    rows = "; ".join(f"{n} images: {cnn[0]} {_ms(a[n])}, {vit[0]} {_ms(b[n])}" for n in sizes)
    measured = (
        f"{metric}: {rows}. CNN - ViT gap {gaps[sizes[0]]:+.4f} at {sizes[0]} images, "
        f"{gaps[sizes[-1]]:+.4f} at {sizes[-1]}"
    )
    return Claim(
        "ViT needs more data than a CNN", paper, measured, gaps[sizes[0]] > gaps[sizes[-1]]
    )


def judge(table8: dict | None, scaling: dict | None, figures: dict | None, metric: str) -> list:
    """Every claim, in the README's order."""
    return [
        position_helps(table8 or {}, metric),
        kind_matters_little(table8 or {}, metric),
        distance_grows(figures),
        position_structure(figures),
        vit_needs_more_data(scaling or {}, metric),
    ]
