"""report.html of `make reproduce`: one self-contained page (every image inlined as a data
URI, no script, no network) that a browser opens offline.

Its tables hold, in each data cell (<td>), a number or N/A; names are header cells (<th>).
Sections: the claims and their verdicts (vitexp.analysis.claims), the quickstart against the pixel
baselines and training from scratch, Table 8, the data-size experiment, the four figures,
the timings, and the configs.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import time
from pathlib import Path
from typing import Any

from vitexp.analysis import resolution
from vitexp.analysis.claims import judge
from vitexp.data.files import write_atomic

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222 }
table { border-collapse: collapse; margin: 0.6em 0 1.4em }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right }
th { background: #f3f3f3 } th.name { text-align: left; font-weight: normal }
tr:first-child th { font-weight: bold }
.held { background: #e3f4e3 } .not { background: #fbe4e4 }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0 }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 12px }
.note { color: #555 }
"""


def esc(text: object) -> str:
    return html.escape(str(text))


def num(value: float | int | None, digits: int = 4) -> str:
    """A table cell: the number, or N/A when there is none."""
    if value is None:
        return "N/A"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def img(path: Path, alt: str) -> str:
    """An <img> with the PNG inlined; a note when the file is missing."""
    if not path.is_file():
        return f'<p class="note">({esc(alt)}: {esc(path.name)} was not written)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(head: list[str], rows: list[tuple[str, list[str]]], name_head: str = "") -> str:
    """rows: (header cell, data cells already formatted by `num`)."""
    out = ["<table><tr>", f'<th class="name">{esc(name_head)}</th>']
    out += [f"<th>{esc(h)}</th>" for h in head] + ["</tr>"]
    for name, cells in rows:
        out.append(f'<tr><th class="name">{esc(name)}</th>')
        out += [f"<td>{esc(c)}</td>" for c in cells] + ["</tr>"]
    return "".join(out) + "</table>"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def claims_section(claims: list, where: str) -> str:
    rows = ["<table><tr><th class='name'>claim</th><th class='name'>verdict</th>"]
    rows.append("<th class='name'>in a sentence</th><th class='name'>paper</th>")
    rows.append("<th class='name'>measured here</th></tr>")
    for c in claims:
        css = {True: "held", False: "not"}.get(c.held, "")
        rows.append(
            f"<tr><th class='name'>{esc(c.claim)}</th><th class='name {css}'>{c.verdict}</th>"
            f"<th class='name'>{esc(c.summary)}</th><th class='name'>{esc(c.paper)}</th>"
            f"<th class='name'>{esc(c.measured)}</th></tr>"
        )
    return f"<h2>The paper's claims, judged on {where}</h2>" + "".join(rows) + "</table>"


def published_section() -> str:
    """Fashion-MNIST's published test accuracies: what `+experiment=fashion_mnist` (not
    one of reproduce's studies) is placed among."""
    from vitexp.analysis.baselines import PUBLISHED

    rows = [(name, [num(acc)]) for name, acc in PUBLISHED["fashion_mnist"].items()]
    return (
        "<h2>Fashion-MNIST: published test accuracies (10 classes)</h2><p>From the dataset's "
        "README and benchmark (Xiao, Rasul, Vollgraf 2017). The studies above use 6 and 4 of "
        "the classes, so they are not comparable to these; `python -m vitexp.train "
        "+experiment=fashion_mnist` trains a ViT on all 10 and places it among them.</p>"
        + table(["test accuracy"], rows, "model")
    )


def quickstart_section(out: Path) -> str:
    runs = {
        "pretrain": "pretrain on shapes (dataset A)",
        "finetune": "fine-tune on digits (dataset B)",
        "scratch": "digits from scratch, same model and steps",
    }
    rows = []
    for name, title in runs.items():
        r = read_json(out / "quickstart" / name / "results.json")
        if r is None:
            continue
        acc, steps, secs = r["metrics"].get("test/acc"), r["steps"], r["wall_time_s"]
        rows.append((title, [num(acc), num(steps), num(secs, 0)]))
        for baseline, value in (r.get("baselines") or {}).items() if name == "finetune" else ():
            title = f"{baseline.replace('_', ' ')} on raw pixels (train+val)"
            rows.append((title, [num(value), "N/A", "N/A"]))
    body = table(["test accuracy", "steps", "seconds"], rows, "run") if rows else "<p>not run</p>"
    return "<h2>Quickstart: pretrain, fine-tune, baselines</h2>" + body


# the real data's model whose figures claims 3 and 4 are read from (drawn by reproduce)
REAL_FIGURES = ("real_table8/kind=learned_1d,placement=stem,seed=0", "real_table8/figures")

DATASETS = {  # study -> (what dataset A is, its test accuracy note)
    "real_table8": "Fashion-MNIST's 6 classes of dataset A (chance 0.167)",
    "real_scaling": "Fashion-MNIST's 6 classes of dataset A",
    "table8": "shapes; 32 classes, chance 0.031; without a position embedding at most 0.25: "
    "a quadrant is a class",
    "data_scaling": "shapes",
}


def table8_section(out: Path, study: str, cells: dict, metric: str) -> str:
    from vitexp.analysis.claims import gain, probe_tells
    from vitexp.analysis.tables import COLUMNS, PAPER, ROWS, rows_in, sentence

    head = [f"{p}: {s}" for p in COLUMNS.values() for s in ("mean", "std")]
    rows, control_rows, test_rows, paper_rows = [], [], [], []
    for kind in rows_in(cells):
        few, control, test, paper = [], [], [], []
        for placement in COLUMNS:
            c = cells.get((kind, placement))
            g = gain(c) if c else None
            few += [num(c.mean if c else None), num(c.std if c else None)]
            control += [num(g[0] if g else None), num(g[1] if g else None)]
            test += [num(c.test_mean if c else None), num(c.test_std if c else None)]
            paper.append(num(PAPER.get((kind, placement)), 5))
        rows.append((ROWS[kind], few))
        control_rows.append((ROWS[kind], control))
        test_rows.append((ROWS[kind], test))
        paper_rows.append((ROWS[kind], paper))
    title = "Table 8 on real data" if study.startswith("real") else "Table 8 on the embedded data"
    return (
        f"<h2>{title}: position embeddings</h2>"
        f"<p>Few-shot linear accuracy on dataset B ({esc(metric)}), mean and std over seeds "
        "(N/A: the paper's N/A cells, or no finished run).</p>"
        + table(head, rows, "Pos. Emb.")
        + "<p>The control: each trained run's gain over the same probe on its own random "
        "initialisation (mean, and standard error over seeds). "
        f"{esc(sentence(probe_tells(cells)[1]))}</p>"
        + table([h.replace("std", "SE") for h in head], control_rows, "Pos. Emb.")
        + f"<p>Test accuracy on dataset A ({esc(DATASETS.get(study, study))}).</p>"
        + table(head, test_rows, "Pos. Emb.")
        + "<p>The paper's Table 8 (ViT-B/16 on JFT, 5-shot ImageNet linear).</p>"
        + table(list(COLUMNS.values()), paper_rows, "Pos. Emb.")
        + img(out / study / "table.png", "Table 8 chart")
    )


def scaling_section(out: Path, study: str, cells: dict, metric: str) -> str:
    from vitexp.analysis.claims import gain, probe_tells
    from vitexp.analysis.tables import sentence

    rows = []
    for key, c in cells.items():
        g = gain(c)
        rows.append(
            (
                f"{key[0]}, subset {key[-1]}",
                [
                    num(c.images),
                    num(c.mean),
                    num(c.std),
                    num(g[0] if g else None),
                    num(g[1] if g else None),
                    num(c.test_mean),
                    num(c.test_std),
                    num(len(c.values)),
                ],
            )
        )
    head = [
        "train images",
        f"{metric} mean",
        "std",
        "gain over random init",
        "SE",
        "dataset A test mean",
        "std",
        "seeds",
    ]
    where = "real data" if study.startswith("real") else "the embedded data"
    return (
        f"<h2>Data size on {where}: ViT against the BiT ResNet (Figure 4)</h2>"
        f"<p>Dataset A: {esc(DATASETS.get(study, study))}. "
        f"{esc(sentence(probe_tells(cells)[1]))}</p>"
        + table(head, rows, "model, data.subset")
        + img(out / study / "table.png", "data scaling chart")
    )


def transfer_pairs(out: Path) -> dict[int, tuple[float, float]]:
    """seed -> (dataset B test accuracy fine-tuned from A, from scratch), where both ran."""
    pairs = {}
    for tuned in sorted((out / "real_transfer").glob("init=pretrained,seed=*/results.json")):
        seed = int(tuned.parent.name.rsplit("=", 1)[1])
        scratch = read_json(out / "real_transfer" / f"init=scratch,seed={seed}" / "results.json")
        a = read_json(tuned)
        if a and scratch and a.get("status") == scratch.get("status") == "done":
            pairs[seed] = (a["metrics"]["test/acc"], scratch["metrics"]["test/acc"])
    return pairs


def transfer_section(pairs: dict[int, tuple[float, float]]) -> str:
    if not pairs:
        return ""
    rows = [
        (f"seed {seed}", [num(tuned), num(scratch), num(tuned - scratch)])
        for seed, (tuned, scratch) in sorted(pairs.items())
    ]
    return (
        "<h2>Transfer on real data: fine-tuned from dataset A against from scratch</h2>"
        "<p>Dataset B (Fashion-MNIST's other 4 classes, 2,000 training images), test "
        "accuracy on its 4,000 test images; the same model, steps and schedule.</p>"
        + table(["fine-tuned from A", "from scratch", "gain"], rows, "seed")
    )


def recipes_section(out: Path) -> str:
    """AugReg levels x EMA (`--studies recipes`), when that study ran."""
    from vitexp.analysis import recipes

    found = recipes.table(out) if (out / "recipes").is_dir() else []
    if not found:
        return ""
    head = [h for title, _, _ in recipes.COLUMNS for h in (title, "±")]
    rows = [
        (level, [num(x) for values in columns for x in recipes.mean_std(values)])
        for level, columns in found
    ]
    return (
        "<h2>Recipes: AugReg augmentation levels and a weight average</h2>"
        + table(head, rows, "augment")
        + "<p class='note'>mean and std over seeds; EMA: the weight average "
        "(decay 0.99, warmup) of the same runs; fine-tuned: 300 steps from the trained "
        "pretraining weights.</p>"
    )


def resolution_section(out: Path, study: str) -> str:
    """Accuracy across test resolutions (`python -m vitexp.evaluate`), where the study's
    jobs were scored at several: `vitexp.report` wrote resolution.csv and .png."""
    rows, lines = resolution.read_csv(out / study / "resolution.csv"), {}
    if not rows:
        return ""
    sizes = sorted({r["resolution"] for r in rows}, key=lambda s: [int(v) for v in s.split("x")])
    several = len({r["patch_size"] for r in rows}) > 1
    for r in rows:
        name = r["variant"] + (f", patch {r['patch_size']}" if several else "")
        lines.setdefault(name, {})[r["resolution"]] = r
    body = [
        (
            name,
            [
                num(float(v)) if (v := found.get(size, {}).get(k)) else "N/A"
                for size in sizes
                for k in ("mean", "se")
            ],
        )
        for name, found in lines.items()
    ]
    head = [h for size in sizes for h in (f"{size} px", "s.e.")]
    return (
        f"<h2>Accuracy across test resolutions: {esc(study)}</h2>"
        + img(out / study / "resolution.png", "accuracy against test resolution")
        + table(head, body, "variant")
        + "<p class='note'>top-1 test accuracy without fine-tuning, mean and standard error "
        "over seeds.</p>"
    )


def figures_section(out: Path, d: Path, model: str) -> str:
    if not (d / "figures.json").is_file():
        return ""
    names = {
        "attention_maps.png": "Attention maps in input space (Fig. 6)",
        "embedding_filters.png": "Embedding filters (Fig. 7 left)",
        "pos_embed_similarity.png": "Position-embedding similarity (Fig. 7 centre)",
        "attention_distance.png": "Mean attention distance (Fig. 7 right)",
    }
    parts = [f"<h3>{esc(title)}</h3>" + img(d / name, title) for name, title in names.items()]
    return f"<h2>The figures of {esc(model)}</h2>" + "".join(parts)


def timing_section(out: Path, jobs: list, timing: dict[str, Any]) -> str:
    records = {j.key: read_json(out / j.study / j.name / "results.json") or {} for j in jobs}
    rows = [
        (key, [num(r.get("wall_time_s"), 0), num(r.get("steps"))]) for key, r in records.items()
    ]
    total = sum(r.get("wall_time_s") or 0 for r in records.values())
    head = (
        f"<p>{len(jobs)} jobs, {total / 60:.1f} min of job time in all, "
        f"{timing['jobs_in_parallel']} at a time; the last call of `make reproduce` took "
        f"{timing['wall_s_this_call'] / 60:.1f} min. Machine: {esc(machine())}.</p>"
    )
    return "<h2>Timings</h2>" + head + table(["seconds", "steps"], rows, "job")


def machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def configs_section(out: Path, jobs: list) -> str:
    parts = [
        "<h2>Configs</h2><p>Each study's first job's resolved config.yaml; the other "
        "jobs differ only by their overrides, listed.</p>"
    ]
    seen = set()
    for j in jobs:
        if j.study in seen:
            continue
        seen.add(j.study)
        config = out / j.study / j.name / "config.yaml"
        text = config.read_text() if config.is_file() else "(not run)"
        parts.append(f"<h3>{esc(j.study)}: {esc(j.name)}</h3><pre>{esc(text)}</pre>")
    listing = "\n".join(f"{j.key}: {' '.join(j.overrides)}" for j in jobs)
    return "".join(parts) + f"<h3>Every job's overrides</h3><pre>{esc(listing)}</pre>"


def write_report(out: Path, jobs: list, timing: dict[str, Any], studies: dict) -> Path:
    """Write out/report.html (and claims.json) from the finished studies' summaries
    (`vitexp.analysis.tables.SweepSummary` by study name). The claims are judged on the real-data
    studies where they ran, else on the embedded ones."""
    t8_name = "real_table8" if "real_table8" in studies else "table8"
    sc_name = "real_scaling" if "real_scaling" in studies else "data_scaling"
    t8, sc = studies.get(t8_name), studies.get(sc_name)
    t8_cells, t8_metric = (t8.cells, t8.metric) if t8 else ({}, None)
    sc_cells, sc_metric = (sc.cells, sc.metric) if sc else ({}, None)
    metric = t8_metric or sc_metric or "few-shot"
    quick_figures = out / "quickstart" / "pretrain" / "figures"
    real_figures = out / REAL_FIGURES[1]
    on_real = t8_name.startswith("real") and (real_figures / "figures.json").is_file()
    figures = read_json((real_figures if on_real else quick_figures) / "figures.json")
    pairs = transfer_pairs(out)
    rope_pairs = resolution.rope_mixed_pairs(out / "real_resolution")
    claims = judge(t8_cells, sc_cells, figures, metric, pairs, rope_pairs)
    write_atomic(
        out / "claims.json",
        json.dumps([{**c.__dict__, "verdict": c.verdict} for c in claims], indent=2) + "\n",
    )

    def sweep(name: str) -> str:
        if name not in studies:
            return ""
        section = table8_section if name.endswith("table8") else scaling_section
        return section(out, name, studies[name].cells, studies[name].metric or "few-shot")

    where = "the real data" if t8_name.startswith("real") else "the embedded data"
    body = [
        f"<h1>vitexp: the ViT paper's experiments, on real data and the embedded data</h1>"
        f"<p class='note'>Written {time.strftime('%Y-%m-%d %H:%M')} by `make reproduce` "
        f"({esc(out)}). Real data: Fashion-MNIST, dataset A its classes T-shirt/top, "
        "Trouser, Dress, Sandal, Shirt, Bag; dataset B the other 4. Embedded data: "
        "procedural shapes (A) and scikit-learn digits (B). The claims are judged on "
        f"{where}.</p>",
        claims_section(claims, where),
        sweep("real_table8"),  # the real data's tables first
        sweep("real_scaling"),
        transfer_section(pairs),
        published_section(),
        quickstart_section(out),
        sweep("table8"),
        sweep("data_scaling"),
        recipes_section(out),
        *(resolution_section(out, name) for name in studies),
        figures_section(
            out, real_figures, "the real data's model (Table 8's 1-D stem run, seed 0)"
        ),
        figures_section(out, quick_figures, "the quickstart model (shapes)"),
        timing_section(out, jobs, timing),
        configs_section(out, jobs),
    ]
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>vitexp reproduce</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    write_atomic(out / "report.html", page)
    return out / "report.html"
