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
6. pretraining transfers: fine-tuned from dataset A minus trained from scratch, dataset B
   test accuracy at equal budget, paired by seed; holds when the gain is more than two
   standard errors over at least 3 seeds.

A claim whose runs are missing is "not run"; numbers are never invented for it.

The few-shot probe must first show that it measures what pretraining taught: every
pretraining run also scores its own random initialisation with the same probe (the control,
`fewshot_init` in results.json). A table's probe is informative when every trained cell
beats its control by more than two standard errors of the paired gain (trained - control,
per seed) over at least 3 seeds (`probe_tells`); claims 1, 2 and 5 rest on the probe, and
where it cannot tell, their verdict is "probe cannot tell", whatever their numbers say.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

MIN_SEEDS = 3  # paired seeds a cell needs before its gain over the control counts


@dataclass
class Claim:
    claim: str
    paper: str  # what the paper reports
    measured: str  # the numbers here
    held: bool | None  # None: not measured, or not measurable with this probe
    probe: str | None = None  # why the probe cannot tell (then held is None)

    @property
    def verdict(self) -> str:
        if self.probe:
            return "probe cannot tell"
        return {True: "held", False: "did not hold", None: "not run"}[self.held]


def gain(cell: Any) -> tuple[float, float] | None:
    """Mean and standard error of a cell's paired gains over its random initialisation."""
    if len(cell.gains) < 2:
        return None
    return statistics.fmean(cell.gains), statistics.stdev(cell.gains) / math.sqrt(len(cell.gains))


def probe_tells(cells: dict) -> tuple[bool | None, str]:
    """(informative, one sentence) for a table's trained cells (see the module doc); None
    when no run recorded a control."""
    scored = {k: c for k, c in cells.items() if c.values}
    if not any(c.gains for c in scored.values()):
        return None, "no random-init control recorded, so the probe is unchecked"

    def name(key: Any) -> str:
        return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)

    failing = []
    for key, cell in scored.items():
        g = gain(cell)
        if len(cell.gains) < MIN_SEEDS or g is None or g[0] <= 2 * g[1]:
            shown = f"{g[0]:+.4f} (2 SE {2 * g[1]:.4f})" if g else "no paired seeds"
            failing.append(f"{name(key)} {shown}, n={len(cell.gains)}")
    if failing:
        return False, (
            f"the probe cannot tell: {len(failing)} of {len(scored)} trained cells do not beat "
            f"their random initialisation by 2 standard errors over >= {MIN_SEEDS} seeds "
            f"({'; '.join(failing[:4])}{'; ...' if len(failing) > 4 else ''})"
        )
    smallest = min((gain(c) for c in scored.values()), key=lambda g: g[0] - 2 * g[1])
    return True, (
        f"the probe tells: all {len(scored)} trained cells beat their random initialisation "
        f"by more than 2 standard errors over >= {MIN_SEEDS} seeds (closest: gain "
        f"{smallest[0]:+.4f}, 2 SE {2 * smallest[1]:.4f})"
    )


def _unless_blind(claim: Claim, cells: dict) -> Claim:
    """The claim as judged, or "probe cannot tell" when the table's probe is not informative."""
    tells, why = probe_tells(cells)
    if claim.held is not None and tells is False:
        return Claim(claim.claim, claim.paper, f"{claim.measured}. {why}", None, probe=why)
    return claim


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


def pretraining_transfers(pairs: dict[int, tuple[float, float]] | None) -> Claim:
    """pairs: seed -> (dataset B test accuracy fine-tuned from A, from scratch)."""
    paper = "pre-training on a larger related dataset, then fine-tuning, beats the target alone"
    if not pairs or len(pairs) < 2:
        return Claim("Pretraining transfers", paper, "not run", None)
    gains = [tuned - scratch for tuned, scratch in pairs.values()]
    mean = statistics.fmean(gains)
    se = statistics.stdev(gains) / math.sqrt(len(gains))
    tuned = statistics.fmean(t for t, _ in pairs.values())
    scratch = statistics.fmean(s for _, s in pairs.values())
    measured = (
        f"dataset B test accuracy over seeds {sorted(pairs)}: fine-tuned {tuned:.4f}, from "
        f"scratch {scratch:.4f}; paired gain {mean:+.4f} (2 SE = {2 * se:.4f})"
    )
    return Claim(
        "Pretraining transfers", paper, measured, len(gains) >= MIN_SEEDS and mean > 2 * se
    )


def judge(
    table8: dict | None,
    scaling: dict | None,
    figures: dict | None,
    metric: str,
    transfer: dict[int, tuple[float, float]] | None = None,
) -> list:
    """Every claim, in the README's order."""
    table8, scaling = table8 or {}, scaling or {}
    return [
        _unless_blind(position_helps(table8, metric), table8),
        _unless_blind(kind_matters_little(table8, metric), table8),
        distance_grows(figures),
        position_structure(figures),
        _unless_blind(vit_needs_more_data(scaling, metric), scaling),
        pretraining_transfers(transfer),
    ]
