"""`make reproduce`: the plan (every preset's sweep x seeds, N/A cells recorded, finished
jobs skipped, interrupted ones resumed), the claims' rules, report.html (self-contained,
numbers only in its data cells), and a small real run that a second call skips whole."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vitexp.analysis.claims import judge
from vitexp.analysis.tables import Cell
from vitexp.errors import ConfigError
from vitexp.reproduce import STUDIES, plan


# --- the plan ------------------------------------------------------------------------------
def test_plan_expands_the_presets_and_records_na_cells(tmp_path: Path):
    jobs = plan(tmp_path, studies=(*STUDIES, "table8", "data_scaling"))
    studies = [j.study for j in jobs]
    assert studies.count("quickstart") == 3
    assert studies.count("table8") == 12 * 3  # 4 kinds x 3 placements x 3 seeds
    assert studies.count("data_scaling") == 2 * 4 * 2  # models x subsets x seeds
    assert studies.count("real_table8") == 12 * 3
    assert studies.count("real_scaling") == 2 * 5 * 2
    assert studies.count("real_transfer") == 2 * 3  # pretrained and scratch x seeds
    assert studies.count("real_resolution") == 7 * 3  # kinds x seeds, all at the stem
    na = [j for j in jobs if j.status == "n/a"]
    assert len(na) == 2 * 4 * 3 and {j.study for j in na} == {"table8", "real_table8"}
    record = json.loads((tmp_path / na[0].study / na[0].name / "results.json").read_text())
    assert record["status"] == "n/a" and "N/A cell" in record["reason"]
    finetune = next(j for j in jobs if j.name == "finetune")
    assert finetune.after == "quickstart/pretrain"
    assert f"pretrained={tmp_path / 'quickstart' / 'pretrain'}" in finetune.overrides
    scaling = next(j for j in jobs if j.study == "data_scaling")
    assert scaling.name == "model=vit_tiny_p8,subset=2000,seed=0"
    # the transfer fine-tunes real_table8's 1-D stem run of its seed; scratch needs nothing
    source = "real_table8/kind=learned_1d,placement=stem,seed=2"
    transfer = {j.name: j for j in jobs if j.study == "real_transfer"}
    assert transfer["init=pretrained,seed=2"].after == source
    assert f"pretrained='{tmp_path / source}'" in transfer["init=pretrained,seed=2"].overrides
    assert transfer["init=scratch,seed=2"].after is None
    # the default: the quickstart and the real-data studies only
    assert {j.study for j in plan(tmp_path / "default")} == {"quickstart", *STUDIES}
    with pytest.raises(ConfigError, match="real_transfer fine-tunes real_table8's"):
        plan(tmp_path, studies=("real_transfer",))


def test_the_modern_ablation_is_the_papers_cells_plus_the_new_kinds_at_the_stem():
    from vitexp.config import validate
    from vitexp.models import NotApplicableCell
    from vitexp.reproduce import compose, config_dir, sweep_jobs

    trained, na = [], []
    with config_dir():
        for job in sweep_jobs("x", "ablation_posemb_modern", 1):
            try:
                validate(compose(job.overrides))
                trained.append(job.name)
            except NotApplicableCell:
                na.append(job.name)
    assert len(trained) + len(na) == 10 * 3  # kinds x placements
    assert len(na) == (2 + 6) * 2  # none, relative and the 6 new kinds off the stem
    assert "kind=rope_mixed,placement=stem,seed=0" in trained
    assert "kind=rope_mixed,placement=every_layer,seed=0" in na


def test_resolution_curves_score_each_finished_run_once_rope_twice(tmp_path, monkeypatch):
    from vitexp import reproduce

    jobs = [
        reproduce.Job("real_resolution", f"kind={kind},seed=0", [f"model.pos_embed.kind={kind}"])
        for kind in ("rope_mixed", "learned_1d", "conditional")
    ]
    for job in jobs[:2]:  # the conditional run has not finished
        (tmp_path / job.study / job.name).mkdir(parents=True)
        (tmp_path / job.study / job.name / "results.json").write_text("{}")
    (tmp_path / "real_resolution" / "kind=learned_1d,seed=0" / "resolutions.json").write_text("{}")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    said = []
    reproduce.resolution_curves(tmp_path, jobs, 2, said.append)
    assert len(calls) == 2 and all("vitexp.evaluate" in c for c in calls)
    policies = sorted(next((a for a in c if a.startswith("rope_positions")), "") for c in calls)
    assert policies == ["rope_positions=extrapolate", "rope_positions=interpolate"]  # 1-D: done
    assert all(f"resolutions={reproduce.TEST_RESOLUTIONS}" in c for c in calls)
    assert any("resolutions_interpolate.json" in " ".join(c) for c in calls)
    assert len(said) == 2 and all(line.startswith("done") for line in said)


def test_plan_skips_finished_jobs_and_resumes_interrupted_ones(tmp_path: Path):
    done = tmp_path / "quickstart" / "scratch"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    ckpt = tmp_path / "quickstart" / "pretrain" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    jobs = {j.name: j for j in plan(tmp_path, seeds=1, studies=("quickstart",))}
    assert jobs["scratch"].status == "skipped"
    assert jobs["pretrain"].status == "pending" and jobs["pretrain"].extra == ["ckpt_path=last"]
    assert jobs["finetune"].status == "pending" and jobs["finetune"].extra == []


def test_a_bad_override_stops_the_plan_naming_the_job(tmp_path: Path):
    from vitexp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"quickstart/pretrain: .*optim\.lr"):
        plan(tmp_path, 1, ("quickstart",), ("optim.lr=-1",))
    assert not (tmp_path / "quickstart").exists()


# --- the claims ----------------------------------------------------------------------------
def cell(*values: float, images: int | None = None, test=()) -> Cell:
    c = Cell(values=list(values), seeds=list(range(len(values))), test_accs=list(test))
    c.train_images = [images] * len(values) if images else []
    return c


FIGURES = {
    "attention_distance": {"mean_per_layer": [3.0, 4.0, 6.0], "last_minus_first_layer": 3.0},
    "pos_embed_similarity": {
        "tables": [{"neighbours_minus_far": 0.4, "same_row_col_minus_other": 0.2}]
    },
}


def test_claims_follow_their_rules():
    table8 = {
        ("none", "stem"): cell(0.50, 0.52, 0.51),
        ("learned_1d", "stem"): cell(0.60, 0.61, 0.62),
        ("learned_2d", "stem"): cell(0.59, 0.60, 0.61),
        ("none", "every_layer"): Cell(),  # an N/A cell: no values
    }
    scaling = {
        ("bit_tiny_debug", "2000"): cell(0.7, 0.72, images=2000),
        ("bit_tiny_debug", "60000"): cell(0.75, 0.75, images=60000),
        ("vit_tiny_p8", "2000"): cell(0.5, 0.52, images=2000),
        ("vit_tiny_p8", "60000"): cell(0.74, 0.76, images=60000),
    }
    claims = judge(table8, scaling, FIGURES, "digits/10shot")
    assert [c.held for c in claims] == [True, True, True, True, True, None, None]
    assert "gap +0.1000" in claims[0].measured
    assert "+0.2000 at 2000 images, +0.0000 at 60000" in claims[4].measured

    # each rule can fail: overlapping seeds, a spread as large as the lead, flat distance,
    # no structure, a gap that grows with data
    table8[("none", "stem")] = cell(0.55, 0.65, 0.60)
    table8[("learned_2d", "stem")] = cell(0.50, 0.50, 0.50)
    flat = {
        "attention_distance": {"mean_per_layer": [4.0, 4.0], "last_minus_first_layer": 0.0},
        "pos_embed_similarity": {
            "tables": [{"neighbours_minus_far": 0.1, "same_row_col_minus_other": -0.01}]
        },
    }
    scaling[("vit_tiny_p8", "60000")] = cell(0.4, 0.4, images=60000)
    assert [c.held for c in judge(table8, scaling, flat, "m")] == [False] * 5 + [None] * 2
    # and a claim without its runs is "not run", never a verdict
    assert [c.verdict for c in judge({}, {}, None, "m")] == ["not run"] * 7


def test_rope_mixed_claim_reads_the_resolution_study_above_the_training_resolution(tmp_path):
    from vitexp.analysis.claims import rope_mixed_extrapolates
    from vitexp.analysis.resolution import rope_mixed_pairs

    def write(kind: str, seed: int, accs: dict[int, float]) -> None:
        run = tmp_path / f"kind={kind},seed={seed}"
        run.mkdir()
        results = [
            {"resolution": r, "patch_size": 7, "accuracy": a, "correct": 0, "n": 1}
            for r, a in accs.items()
        ]
        record = {"train_resolution": [28, 28], "train_patch_size": 7, "results": results}
        (run / "resolutions.json").write_text(json.dumps(record))

    for seed, lift in enumerate((0.10, 0.12, 0.11)):
        # below and at the training resolution the 1-D table wins: they must not count
        write("learned_1d", seed, {14: 0.9, 28: 0.9, 35: 0.5, 56: 0.3})
        write("rope_mixed", seed, {14: 0.1, 28: 0.8, 35: 0.5 + lift, 56: 0.3 + lift})
    write("rope_mixed", 3, {35: 0.9})  # no 1-D run of that seed: not a pair
    pairs = rope_mixed_pairs(tmp_path)
    assert sorted(pairs) == [0, 1, 2]
    assert pairs[1] == pytest.approx((0.52, 0.40))
    claim = rope_mixed_extrapolates(pairs)
    assert claim.held is True and "paired gain +0.1100" in claim.measured
    pairs[2] = (0.30, 0.40)  # one seed the other way: within 2 standard errors
    assert rope_mixed_extrapolates(pairs).held is False
    assert rope_mixed_extrapolates({}).verdict == "not run"


def test_pretraining_transfers_when_the_paired_gain_beats_two_standard_errors():
    from vitexp.analysis.claims import pretraining_transfers

    held = pretraining_transfers({0: (0.90, 0.85), 1: (0.91, 0.86), 2: (0.89, 0.85)})
    assert held.held is True and "paired gain +0.0467" in held.measured
    noisy = pretraining_transfers({0: (0.90, 0.85), 1: (0.86, 0.88), 2: (0.89, 0.85)})
    assert noisy.held is False
    assert pretraining_transfers({0: (0.90, 0.80), 1: (0.91, 0.80)}).held is False  # 2 seeds
    assert pretraining_transfers({0: (0.9, 0.8)}).verdict == "not run"


def controlled(cell_: Cell, *controls: float) -> Cell:
    """The cell with a random-init control per seed (paired with its values in order)."""
    cell_.controls = list(controls)
    cell_.gains = [v - c for v, c in zip(cell_.values, controls, strict=True)]
    return cell_


def test_a_probe_that_does_not_beat_random_weights_decides_nothing():
    from vitexp.analysis.claims import probe_tells

    table8 = {
        ("none", "stem"): controlled(cell(0.50, 0.52, 0.51), 0.40, 0.41, 0.40),
        ("learned_1d", "stem"): controlled(cell(0.60, 0.61, 0.62), 0.40, 0.42, 0.41),
        ("learned_2d", "stem"): controlled(cell(0.59, 0.60, 0.61), 0.41, 0.40, 0.42),
    }
    assert probe_tells(table8)[0] is True
    assert [c.verdict for c in judge(table8, {}, FIGURES, "m")[:2]] == ["held", "held"]
    # the case: random weights score as high as trained ones in one cell
    table8[("none", "stem")] = controlled(cell(0.50, 0.52, 0.51), 0.63, 0.67, 0.75)
    tells, why = probe_tells(table8)
    assert tells is False and "1 of 3 trained cells" in why and "none/stem -0.1733" in why
    claims = judge(table8, {}, FIGURES, "m")
    assert [c.verdict for c in claims[:2]] == ["probe cannot tell"] * 2
    assert claims[0].held is None and "the probe cannot tell" in claims[0].measured
    assert [c.verdict for c in claims[2:4]] == ["held", "held"]  # not probe-based
    # a gain within 2 standard errors, or fewer than 3 seeds, does not count either
    table8[("none", "stem")] = controlled(cell(0.50, 0.52), 0.49, 0.50)
    assert probe_tells(table8)[0] is False and "n=2" in probe_tells(table8)[1]
    table8[("none", "stem")] = controlled(cell(0.50, 0.60, 0.55), 0.49, 0.45, 0.56)
    assert probe_tells(table8)[0] is False
    # no control recorded (older runs): the verdict stands, the probe is said unchecked
    plain = {k: cell(*c.values) for k, c in table8.items()}
    assert probe_tells(plain) == (
        None,
        "no random-init control recorded, so the probe is unchecked",
    )


# --- report.html ---------------------------------------------------------------------------
class Page(HTMLParser):
    """The <img> sources and the text of every <td> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_td = tag == "td"
        if self._in_td:
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.cells[-1] += data


def check_page(path: Path) -> Page:
    """Every image the page references exists (inlined PNG, or a file beside it) and every
    data cell is a number or N/A; no script, no network."""
    text = path.read_text()
    page = Page()
    page.feed(text)
    assert page.images and page.cells
    for src in page.images:
        if src.startswith("data:image/png;base64,"):
            assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
        else:
            assert (path.parent / src).is_file(), src
    for value in page.cells:
        assert value.strip() == "N/A" or re.fullmatch(r"-?\d+(\.\d+)?", value.strip()), value
    assert "<script" not in text and not re.search(r"""(src|href)=["']https?:""", text)
    return page


@pytest.mark.slow
def test_reproduce_runs_resumes_and_writes_a_self_contained_report(tmp_path: Path):
    """Quickstart and Table 8 with one seed and a few steps each: every job runs, the
    second call runs nothing, report.html holds the tables, charts and figures."""
    out = tmp_path / "reproduce"
    tiny = [
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "data.batch_size=16",
        "data.global_batch_size=null",
        "data.shapes.num_train=256",
        "data.shapes.num_val=64",
        "data.shapes.num_test=64",
        f"data.shapes.cache_dir={tmp_path / 'cache'}",
        "fewshot.shots=[1,2]",
        "fewshot.draws=1",
        "fewshot.report_shot=2",
    ]
    args = ["--out", str(out), "--seeds", "1", "--studies", "quickstart,table8"]
    args += [f"--set={o}" for o in tiny]
    cmd = [sys.executable, "-m", "vitexp.reproduce", *args]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:] + first.stdout[-2000:]
    assert "11 to run" in first.stdout  # 3 quickstart + 8 trained cells (4 N/A recorded)
    done = sorted(p.parent.name for p in (out / "table8").glob("*/results.json"))
    assert len(done) == 12
    fine = json.loads((out / "quickstart" / "finetune" / "results.json").read_text())
    assert fine["pretrained"].startswith(str(out / "quickstart" / "pretrain"))
    assert set(fine["baselines"]) == {"logistic_regression", "rbf_svm"}

    page = check_page(out / "report.html")
    assert len(page.images) == 1 + 4  # the Table-8 chart and the 4 figures (no scaling run)
    claims = json.loads((out / "claims.json").read_text())
    verdicts = [c["verdict"] for c in claims]
    assert verdicts[4:] == ["not run"] * 3  # no data-size, transfer or resolution study ran
    # one seed: the probe's gain over random init cannot count, so claims 1-2 wait for seeds
    assert verdicts[:2] == ["probe cannot tell"] * 2 and "n=1" in claims[0]["measured"]
    assert all(v in ("held", "did not hold") for v in verdicts[2:4])

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "0 to run" in second.stdout and "start" not in second.stdout


@pytest.mark.slow
def test_sigterm_stops_jobs_with_a_checkpoint_and_the_next_call_resumes(tmp_path: Path):
    import signal
    import time

    out = tmp_path / "reproduce"
    tiny = [
        "trainer.max_steps=3000",
        "trainer.val_check_interval=1000",
        "data.batch_size=16",
        "data.global_batch_size=null",
        "data.num_workers=1",  # a loader worker, which must not be killed first
        "data.shapes.num_train=256",
        "data.shapes.num_val=32",
        "data.shapes.num_test=32",
        f"data.shapes.cache_dir={tmp_path / 'cache'}",
        "fewshot.enabled=false",
        "figures=false",
    ]
    cmd = [sys.executable, "-m", "vitexp.reproduce", "--out", str(out), "--jobs", "1"]
    cmd += ["--studies", "quickstart", *(f"--set={o}" for o in tiny)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "quickstart" / "pretrain" / "logs" / "version_0" / "metrics.csv"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") > 3):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "run the same command again" in err
    assert (out / "quickstart" / "pretrain" / "checkpoints" / "last.ckpt").is_file()
    assert not (out / "quickstart" / "pretrain" / "failed.json").exists()

    again = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_lines = [again.stdout.readline(), again.stdout.readline()]
    again.send_signal(signal.SIGTERM)  # stops the resumed job again, with a checkpoint
    again.communicate(timeout=180)
    assert "start  quickstart/pretrain (resuming)" in first_lines[1], first_lines
    # the SIGTERM came right after "start": the job must not outlive the command
    deadline = time.time() + 30
    while jobs_running_in(out):
        assert time.time() < deadline, f"a job still runs after the command ended: {out}"
        time.sleep(0.5)


def jobs_running_in(out: Path) -> list[int]:
    """Pids of the processes whose command line names `out` (the jobs of that reproduce)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(out).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            pass
    return pids


def test_data_size_is_judged_on_dataset_a_where_every_cell_has_it_and_names_the_crossover():
    from vitexp.analysis.claims import crossover, vit_needs_more_data

    def scaled(model: str, n: int, fewshot: float, test: float) -> Cell:
        # 2 seeds, each below its control: the probe cannot tell
        return controlled(cell(fewshot, fewshot, images=n, test=(test, test)), 0.9, 0.9)

    scaling = {
        ("bit_tiny_debug", "1000"): scaled("bit", 1000, 0.5, 0.80),
        ("bit_tiny_debug", "33000"): scaled("bit", 33000, 0.6, 0.88),
        ("vit_tiny_p7", "1000"): scaled("vit", 1000, 0.6, 0.70),
        ("vit_tiny_p7", "33000"): scaled("vit", 33000, 0.5, 0.90),
    }
    claim = judge({}, scaling, None, "m")[4]
    # on A's test accuracy the gap closes and turns (+0.10 -> -0.02): held, whatever the
    # probe (whose few-shot gap would have grown) says; the probe's state is reported beside
    assert claim.verdict == "held"
    assert "dataset A test accuracy" in claim.measured and "+0.1000 at 1000" in claim.measured
    assert "crossover: the ViT passes between 1000 and 33000 images" in claim.measured
    assert "Few-shot: the probe cannot tell" in claim.measured
    # without test accuracies the probe decides, and here it cannot tell
    for c in scaling.values():
        c.test_accs = []
    assert judge({}, scaling, None, "m")[4].verdict == "probe cannot tell"
    assert "few-shot" not in vit_needs_more_data(scaling, "m").measured.lower()
    assert crossover({1: 0.1, 2: 0.05}) == "no crossover: the CNN is ahead at every size"
    assert crossover({1: -0.1, 2: -0.05}) == "no crossover: the ViT is ahead at every size"
    assert crossover({1: 0.1, 2: -0.1, 3: 0.1}) == (
        "crossover: the ViT passes between 1 and 2 images, "
        "then the CNN passes between 2 and 3 images"
    )


def test_every_verdict_comes_with_a_plain_sentence():
    table8 = {
        ("none", "stem"): cell(0.50, 0.52, 0.51),
        ("learned_1d", "stem"): cell(0.60, 0.61, 0.62),
        ("learned_2d", "stem"): cell(0.59, 0.60, 0.61),
    }
    claims = judge(table8, {}, FIGURES, "m", {0: (0.9, 0.85), 1: (0.91, 0.86), 2: (0.9, 0.86)})
    assert claims[0].summary.startswith("Yes: with a 1-D table the probe scores +0.100")
    assert claims[1].summary.startswith("Yes: the 2 kinds and placements lie within 0.010")
    assert claims[4].summary == "Not run: its runs are missing."
    assert claims[5].summary.startswith("Yes: fine-tuning from dataset A beats")
    table8[("none", "stem")] = controlled(cell(0.50, 0.52, 0.51), 0.63, 0.67, 0.75)
    blind = judge(table8, {}, FIGURES, "m")[0]
    assert blind.summary.startswith("Cannot say: on this table the few-shot probe")
    assert all(c.summary for c in judge(table8, {}, None, "m"))
