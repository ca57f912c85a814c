"""The paper's claims, each judged from a reproduce run's numbers by a rule fixed in advance
(so that the verdict is not chosen after seeing the data):

1. position embeddings help: 1-D (stem) minus none (stem), few-shot on dataset B; holds when
   the gap is more than two standard errors of the difference over seeds.
2. their kind matters little: the spread (max - min) of the trained position-embedding cells
   is smaller than their lead over no position embedding (the worst of them minus none).
3. attention distance grows with depth: the last layer's mean over heads minus the first's
   is positive (figures.json of the real data's 1-D stem model, else of the quickstart's).
4. position embeddings learn 2-D structure: similarity to the 4 neighbours minus to far
   patches, and to the same row/column minus to the others, are both positive.
5. ViT needs more data than a CNN: (CNN - ViT) accuracy is larger at the smallest
   pretraining subset than at the largest (the gap closes, or turns, as data grows); judged
   on dataset A's own test accuracy when every cell has it (in-domain: no probe), else on
   the few-shot probe. Where the ViT passes the CNN (or that it does not) is stated.
6. pretraining transfers: fine-tuned from dataset A minus trained from scratch, dataset B
   test accuracy at equal budget, paired by seed; holds when the gain is more than two
   standard errors over at least 3 seeds.
7. (RoPE-ViT, Heo et al. 2024, not the ViT paper) RoPE-Mixed holds up above the training
   resolution: dataset A test accuracy averaged over the test resolutions above the
   training one, without fine-tuning (RoPE's positions extended to the larger grid, the
   1-D table interpolated), RoPE-Mixed minus the 1-D table, paired by seed; holds when the
   gain is more than two standard errors over at least 3 seeds.

A claim whose runs are missing is "not run"; numbers are never invented for it.

The few-shot probe must first show that it measures what pretraining taught: every
pretraining run also scores its own random initialisation with the same probe (the control,
`fewshot_init` in results.json). A table's probe is informative when every trained cell
beats its control by more than two standard errors of the paired gain (trained - control,
per seed) over at least 3 seeds (`probe_tells`); claims 1 and 2 (and 5 without test
accuracies) rest on the probe, and
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
    summary: str = ""  # the verdict in one plain sentence

    def __post_init__(self) -> None:
        if self.held is None and not self.summary:
            self.summary = (
                "Not run: its runs are missing."
                if not self.probe
                else (
                    "Cannot say: on this table the few-shot probe does not beat random weights "
                    "reliably (see its control)."
                )
            )

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


def _data_claim(claim: Claim, cells: dict) -> Claim:
    """Claim 5: judged on dataset A's test accuracy it needs no probe (the probe's state is
    said beside it); judged on the probe it is guarded like claims 1 and 2."""
    scored = [c for c in cells.values() if c.values]
    if not (scored and all(c.test_accs for c in scored)):
        return _unless_blind(claim, cells)
    tells, why = probe_tells(cells)
    if tells is None:
        return claim
    measured = f"{claim.measured}. Few-shot: {why}"
    return Claim(claim.claim, claim.paper, measured, claim.held, summary=claim.summary)


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
    held = gap > 2 * se
    summary = (
        f"Yes: with a 1-D table the probe scores {gap:+.3f} above no position embedding, more "
        "than 2 standard errors of the seeds."
        if held
        else f"Not shown: 1-D minus none is {gap:+.3f}, within 2 standard errors ({2 * se:.3f})."
    )
    return Claim("Position embeddings help", paper, measured, held, summary=summary)


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
    held = spread < lead
    summary = (
        f"Yes: the {len(trained)} kinds and placements lie within {spread:.3f} of each "
        f"other, less than the worst one's lead over none ({lead:+.3f})."
        if held
        else f"No: the {len(trained)} cells spread over {spread:.3f}, as much as or more "
        f"than the worst one's lead over none ({lead:+.3f})."
    )
    return Claim("Their kind matters little", paper, measured, held, summary=summary)


def distance_grows(figures: dict | None) -> Claim:
    paper = "mean attention distance grows with depth (Fig. 7 right)"
    d = (figures or {}).get("attention_distance") or {}
    if "mean_per_layer" not in d:
        return Claim("Attention distance grows with depth", paper, "not run", None)
    per_layer = ", ".join(f"{v:.2f}" for v in d["mean_per_layer"])
    delta = d["last_minus_first_layer"]
    measured = f"mean over heads per layer (px): {per_layer}; last - first {delta:+.2f}"
    summary = (
        f"Yes: the last layer's heads attend {delta:+.2f} px farther than the first layer's."
        if delta > 0
        else f"No: the last layer's heads attend no farther than the first layer's "
        f"({delta:+.2f} px)."
    )
    boxes = ((figures or {}).get("model") or {}).get("token_boxes_xyxy")
    if boxes:  # what attention spread evenly over every patch would give
        centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in boxes]
        dists = [math.dist(a, b) for a in centres for b in centres]
        uniform = sum(dists) / len(dists)
        measured += f" (uniform attention: {uniform:.2f})"
        summary += f" Uniform attention over the patches would give {uniform:.1f} px."
    return Claim("Attention distance grows with depth", paper, measured, delta > 0, summary=summary)


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
    summary = (
        "Yes: a patch's embedding is most like its neighbours', and more like those of its "
        "own row and column than the others'."
        if held
        else "No: the embeddings show no neighbour and row/column similarity."
    )
    return Claim("Position embeddings learn 2-D structure", paper, measured, held, summary=summary)


def crossover(gaps: dict[int, float]) -> str:
    """Where the lead changes hands as data grows (gaps: images -> CNN - ViT), in words."""
    sizes = sorted(gaps)
    changes = [
        f"the {'ViT' if gaps[large] <= 0 else 'CNN'} passes between {small} and {large} images"
        for small, large in zip(sizes, sizes[1:], strict=False)
        if (gaps[small] > 0) != (gaps[large] > 0)
    ]
    if changes:
        return "crossover: " + ", then ".join(changes)
    return f"no crossover: the {'CNN' if gaps[sizes[0]] > 0 else 'ViT'} is ahead at every size"


def vit_needs_more_data(cells: dict, metric: str) -> Claim:
    """cells: the data-scaling sweep's, keyed (model, subset). Judged on dataset A's own test
    accuracy where every cell has it (in-domain, so no probe stands between the model and
    the number; the paper's Figure 3 measures accuracy, not a probe), else on `metric`."""
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
    on_test = all(c.test_accs for c in cells.values() if c.values)

    def score(c: Any) -> float:
        return c.test_mean if on_test else c.mean

    def shown(c: Any) -> str:
        if not on_test:
            return _ms(c)
        std = f" ± {c.test_std:.4f}" if c.test_std is not None else ""
        return f"{c.test_mean:.4f}{std} (n={len(c.test_accs)}; {metric} {c.mean:.4f})"

    gaps = {n: score(a[n]) - score(b[n]) for n in sizes}
    what = "dataset A test accuracy" if on_test else metric
    rows = "; ".join(f"{n} images: {cnn[0]} {shown(a[n])}, {vit[0]} {shown(b[n])}" for n in sizes)
    measured = (
        f"{what}: {rows}. CNN - ViT gap {gaps[sizes[0]]:+.4f} at {sizes[0]} images, "
        f"{gaps[sizes[-1]]:+.4f} at {sizes[-1]}; {crossover(gaps)}"
    )
    held = gaps[sizes[0]] > gaps[sizes[-1]]
    trend = "shrinks" if held else "grows" if gaps[sizes[-1]] > gaps[sizes[0]] else "stays"
    summary = (
        f"{'Yes' if held else 'No'}: the CNN's lead {trend} from {gaps[sizes[0]]:+.3f} at "
        f"{sizes[0]} images to {gaps[sizes[-1]]:+.3f} at {sizes[-1]} ({what}); "
        f"{crossover(gaps)}."
    )
    return Claim("ViT needs more data than a CNN", paper, measured, held, summary=summary)


@dataclass
class Paired:
    """Two arms measured on the same seeds: their means, the paired gain (first - second)
    and its standard error; `held` is the rule of claims 6 and 7."""

    first: float
    second: float
    gain: float
    se: float
    n: int

    @classmethod
    def of(cls, pairs: dict[int, tuple[float, float]]) -> Paired:
        gains = [a - b for a, b in pairs.values()]
        return cls(
            statistics.fmean(a for a, _ in pairs.values()),
            statistics.fmean(b for _, b in pairs.values()),
            statistics.fmean(gains),
            statistics.stdev(gains) / math.sqrt(len(gains)),
            len(gains),
        )

    @property
    def held(self) -> bool:
        return self.n >= MIN_SEEDS and self.gain > 2 * self.se

    def gain_text(self) -> str:
        return f"paired gain {self.gain:+.4f} (2 SE = {2 * self.se:.4f})"


def pretraining_transfers(pairs: dict[int, tuple[float, float]] | None) -> Claim:
    """pairs: seed -> (dataset B test accuracy fine-tuned from A, from scratch)."""
    paper = "pre-training on a larger related dataset, then fine-tuning, beats the target alone"
    if not pairs or len(pairs) < 2:
        return Claim("Pretraining transfers", paper, "not run", None)
    p = Paired.of(pairs)
    measured = (
        f"dataset B test accuracy over seeds {sorted(pairs)}: fine-tuned {p.first:.4f}, from "
        f"scratch {p.second:.4f}; {p.gain_text()}"
    )
    summary = (
        f"Yes: fine-tuning from dataset A beats training on B from scratch by {p.gain:+.3f} "
        f"over {p.n} seeds, more than 2 standard errors."
        if p.held
        else f"Not shown: the gain {p.gain:+.3f} over {p.n} seeds is within 2 standard "
        f"errors ({2 * p.se:.3f}) or has fewer than {MIN_SEEDS} seeds."
    )
    return Claim("Pretraining transfers", paper, measured, p.held, summary=summary)


def rope_mixed_extrapolates(pairs: dict[int, tuple[float, float]] | None) -> Claim:
    """pairs: seed -> (RoPE-Mixed, 1-D table) mean test accuracy above the training
    resolution."""
    name = "RoPE-Mixed holds up at higher resolution (RoPE-ViT)"
    paper = (
        "RoPE-ViT: ViT-S 224 -> 384 px without fine-tuning, APE 80.4 -> 79.4, "
        "RoPE-Mixed 80.9 -> 81.8"
    )
    if not pairs or len(pairs) < 2:
        return Claim(name, paper, "not run", None)
    p = Paired.of(pairs)
    measured = (
        f"dataset A test accuracy above the training resolution, seeds {sorted(pairs)}: "
        f"RoPE-Mixed {p.first:.4f}, 1-D table {p.second:.4f}; {p.gain_text()}"
    )
    summary = (
        f"Yes: above the training resolution RoPE-Mixed beats the 1-D table by {p.gain:+.3f} "
        f"over {p.n} seeds, more than 2 standard errors."
        if p.held
        else f"Not shown: RoPE-Mixed minus the 1-D table above the training resolution is "
        f"{p.gain:+.3f} over {p.n} seeds (2 standard errors: {2 * p.se:.3f})."
    )
    return Claim(name, paper, measured, p.held, summary=summary)


def judge(
    table8: dict | None,
    scaling: dict | None,
    figures: dict | None,
    metric: str,
    transfer: dict[int, tuple[float, float]] | None = None,
    resolution: dict[int, tuple[float, float]] | None = None,
) -> list:
    """Every claim, in the README's order."""
    table8, scaling = table8 or {}, scaling or {}
    return [
        _unless_blind(position_helps(table8, metric), table8),
        _unless_blind(kind_matters_little(table8, metric), table8),
        distance_grows(figures),
        position_structure(figures),
        _data_claim(vit_needs_more_data(scaling, metric), scaling),
        pretraining_transfers(transfer),
        rope_mixed_extrapolates(resolution),
    ]
