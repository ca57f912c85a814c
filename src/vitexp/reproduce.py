"""`make reproduce` / `python -m vitexp.reproduce [--out DIR] [--jobs N] [--seeds N]`: every
experiment of the paper, on real data (Fashion-MNIST) and on the embedded data, then one
self-contained report.html. The claims are judged on the real data.

    quickstart/     pretrain (shapes, with the four figures), finetune (digits), scratch
    real_table8/    fashion_table8 x 3 seeds: Table 8 on Fashion-MNIST (6 classes -> 4)
    real_scaling/   fashion_scaling x 2 seeds: Figure 4 on Fashion-MNIST, ViT vs BiT
    real_transfer/  fashion_finetune from real_table8's 1-D stem runs vs fashion_scratch
    real_resolution/ fashion_posemb_modern x 3 seeds: the paper's encodings beside RoPE,
                    the 2-D bias and CPVT's, each scored at test resolutions 14-56 px
                    (`vitexp.evaluate`) -> resolution.csv, resolution.png
    table8/         opt-in: the ablation_posemb preset x 3 seeds (Table 8 on shapes/digits)
    data_scaling/   opt-in: the data_scaling preset x 2 seeds (Figure 4 on shapes/digits)
    recipes/        opt-in: AugReg levels and EMA (vitexp.analysis.recipes)
    report.html     tables, plots, figures, the claims' numbers, configs and timings

Each job is one `python -m vitexp.train` run in its own fixed directory, so the command is
resumable: a job whose directory holds results.json is skipped, one that holds
checkpoints/last.ckpt continues from it (`ckpt_path=last`), a failed one is run again.
`--jobs` runs that many at once (each on cpu_count / jobs threads: tiny models use two
processes of one thread better than one process of two). Every job's config is composed
and validated before the first one starts; the paper's N/A cells are recorded, not run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from vitexp.analysis.report_html import REAL_FIGURES
from vitexp.data.files import write_atomic
from vitexp.errors import ConfigError, Interrupted
from vitexp.training.cli import run_cli

# study -> (preset, seeds): 3 seeds for Table 8, 2 for the data-size study (its BiT runs
# cost twice the ViT's)
SWEEPS = {
    "real_table8": ("fashion_table8", 3),
    "real_scaling": ("fashion_scaling", 2),
    "real_resolution": ("fashion_posemb_modern", 3),
    "table8": ("ablation_posemb", 3),
    "data_scaling": ("data_scaling", 2),
}
TRANSFER_SEEDS = 3
TRANSFER_FROM = "real_table8/kind=learned_1d,placement=stem"  # + ,seed=N: fashion_pretrain
RESULTS = "results.json"


@dataclass
class Job:
    study: str
    name: str
    overrides: list[str]  # for `python -m vitexp.train`, without the run directory
    after: str | None = None  # a job (study/name) that must finish first
    status: str = "pending"  # pending | skipped | n/a | done | failed | stopped
    reason: str = ""
    wall_s: float = 0.0
    extra: list[str] = field(default_factory=list)  # added when it runs: ckpt_path=last

    @property
    def key(self) -> str:
        return f"{self.study}/{self.name}"


def sweep_values(key: str, value: str) -> list[str]:
    """The values of one sweeper param, as Hydra's parser reads `key=a,b,range(...)`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"{key}={value}")
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.get_value_element_as_str()]


def compose(overrides: list[str], hydra: bool = False):
    """The composed train config for these overrides (Hydra's compose API), inside
    `config_dir()`: setting Hydra up costs ~1.3 s, a composition ~0.2 s."""
    from hydra import compose as hydra_compose

    return hydra_compose("train", overrides=overrides, return_hydra_config=hydra)


@contextlib.contextmanager
def config_dir():
    """Hydra set up once on vitexp's configs, for every `compose` of a plan."""
    from hydra import initialize_config_dir

    from vitexp.config import CONFIG_DIR, register_configs

    register_configs()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        yield


def short(key: str) -> str:
    """`model.pos_embed.kind` -> `kind`: the job directory names stay readable."""
    return key.rsplit(".", 1)[-1].rsplit("/", 1)[-1]


def sweep_jobs(study: str, preset: str, seeds: int) -> list[Job]:
    """One job per combination of the preset's sweeper params, times `seeds` seeds."""
    params = dict(compose([f"+experiment={preset}"], hydra=True).hydra.sweeper.params or {})
    params.setdefault("seed", ",".join(str(s) for s in range(seeds)))
    axes = [[(k, v) for v in sweep_values(k, str(values))] for k, values in params.items()]
    jobs = []
    for combo in itertools.product(*axes):
        name = ",".join(f"{short(k)}={v}" for k, v in combo)
        jobs.append(Job(study, name, [f"+experiment={preset}", *(f"{k}={v}" for k, v in combo)]))
    return jobs


def quickstart_jobs(out: Path) -> list[Job]:
    """`make finetune`'s two runs and `make scratch`, with the quickstart's figures."""
    pretrain = out / "quickstart" / "pretrain"
    return [
        Job("quickstart", "pretrain", ["+experiment=quickstart_pretrain"]),
        Job("quickstart", "scratch", ["+experiment=quickstart_scratch"]),
        Job(
            "quickstart",
            "finetune",
            ["+experiment=quickstart_finetune", f"pretrained={pretrain}"],
            after="quickstart/pretrain",
        ),
    ]


STUDIES = ("quickstart", "real_table8", "real_scaling", "real_transfer", "real_resolution")
# opt-in: the embedded data's Table 8 and data size (the fast path of earlier versions), and
# AugReg levels x seeds, each pretraining fine-tuned (vitexp.analysis.recipes)
OPTIONAL_STUDIES = ("table8", "data_scaling", "recipes")


def seed_of(job: Job) -> str:
    """The job's `seed=N` override."""
    return next(o for o in job.overrides if o.startswith("seed="))


def recipe_jobs(out: Path, seeds: int | None) -> list[Job]:
    """The augreg_sweep preset's pretrainings, then each one fine-tuned on digits."""
    from vitexp.analysis import recipes

    pretrain = sweep_jobs("recipes", recipes.PRESET, seeds or recipes.SEEDS)
    finetune = [
        Job(
            "recipes_finetune",
            job.name,
            [*recipes.FINETUNE, f"pretrained='{out / job.study / job.name}'", seed_of(job)],
            after=job.key,
        )
        for job in pretrain
    ]
    return pretrain + finetune


def transfer_jobs(out: Path, seeds: int | None) -> list[Job]:
    """Per seed: fine-tune real_table8's 1-D stem run of that seed (= fashion_pretrain) on
    dataset B, and the same run from random initialisation."""
    jobs = []
    for seed in range(seeds or TRANSFER_SEEDS):
        source = f"{TRANSFER_FROM},seed={seed}"
        jobs += [
            Job(
                "real_transfer",
                f"init=pretrained,seed={seed}",
                ["+experiment=fashion_finetune", f"pretrained='{out / source}'", f"seed={seed}"],
                after=source,
            ),
            Job(
                "real_transfer",
                f"init=scratch,seed={seed}",
                ["+experiment=fashion_scratch", f"seed={seed}"],
            ),
        ]
    return jobs


def plan(
    out: Path, seeds: int | None = None, studies=STUDIES, extra: tuple[str, ...] = ()
) -> list[Job]:
    """Every job, checked: a config error stops here, before anything runs; N/A cells and
    finished jobs are marked; a job with a checkpoint resumes. `seeds` replaces each
    study's own number of seeds; `extra` overrides go to every job (e.g. trainer=gpu)."""
    from vitexp.config import validate
    from vitexp.models import NotApplicableCell
    from vitexp.training.rundir import write_job_record

    known = (*STUDIES, *OPTIONAL_STUDIES)
    unknown = [s for s in studies if s not in known]
    if unknown:
        raise ConfigError(f"--studies {','.join(unknown)}: choose from {','.join(known)}")
    if "real_transfer" in studies and "real_table8" not in studies:
        raise ConfigError(
            "--studies real_transfer fine-tunes real_table8's 1-D runs; add real_table8"
        )
    with config_dir():
        jobs = quickstart_jobs(out) if "quickstart" in studies else []
        for study, (preset, own_seeds) in SWEEPS.items():
            if study in studies:
                jobs += sweep_jobs(study, preset, seeds or own_seeds)
        if "real_transfer" in studies:
            jobs += transfer_jobs(out, seeds)
        if "recipes" in studies:
            jobs += recipe_jobs(out, seeds)
        for job in jobs:
            job.overrides += list(extra)
            job_dir = out / job.study / job.name
            try:
                cfg = compose(job.overrides)
                validate(cfg)
            except NotApplicableCell as err:
                job.status, job.reason = "n/a", str(err)
                write_job_record(job_dir, cfg, "n/a", str(err), job.overrides)
                continue
            except Exception as err:  # one line naming the job, then the config's message
                from vitexp.training.cli import one_line

                raise ConfigError(f"{job.key}: {one_line(err)}") from err
            if (job_dir / RESULTS).is_file():
                job.status = "skipped"
            elif (job_dir / "checkpoints" / "last.ckpt").exists():
                job.extra = ["ckpt_path=last"]
    return jobs


def command(job: Job, out: Path) -> list[str]:
    run_dir = out / job.study / job.name
    return [
        sys.executable,
        "-m",
        "vitexp.train",
        *job.overrides,
        *job.extra,
        f"hydra.run.dir='{run_dir}'",  # quoted: a job's name holds = and ,
        "hydra.mode=RUN",
        "trainer.progress_bar=false",  # console.log gets the validation lines instead
    ]


class Runner:
    """Runs jobs `jobs` at a time in subprocesses, in order, each after its dependency."""

    def __init__(self, out: Path, jobs: int) -> None:
        self.out, self.slots = out, jobs
        self.env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = False
        self.lock = threading.Lock()  # a job starts, or the runner stops: never both at once

    def run_one(self, job: Job) -> Job:
        run_dir = self.out / job.study / job.name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "failed.json").unlink(missing_ok=True)
        start = time.time()
        with open(run_dir / "console.log", "ab") as console:
            with self.lock:  # a stop that came first must not leave this job running alone
                if self.stopping:
                    job.status, job.reason, job.wall_s = "stopped", "Ctrl-C", 0.0
                    return job
                proc = subprocess.Popen(
                    command(job, self.out),
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,  # a Ctrl-C reaches each job once, from stop()
                )
                self.procs[job.key] = proc
            code = proc.wait()
        self.procs.pop(job.key, None)
        job.wall_s = time.time() - start
        if code == 0 and (run_dir / RESULTS).is_file():
            job.status = "done"
        elif self.stopping:
            job.status, job.reason = "stopped", "Ctrl-C"
        else:
            job.status = "failed"
            job.reason = last_error(run_dir / "console.log") or f"exit code {code}"
            record = {"status": "failed", "reason": job.reason, "overrides": job.overrides}
            write_atomic(run_dir / "failed.json", json.dumps(record, indent=2) + "\n")
        return job

    def run(self, jobs: list[Job], say) -> None:
        pending = [j for j in jobs if j.status == "pending"]
        finished = {j.key for j in jobs if j.status in ("skipped", "n/a")}
        running: dict[Future, Job] = {}
        with ThreadPoolExecutor(self.slots) as pool:
            try:
                while pending or running:
                    for job in list(pending):
                        if len(running) >= self.slots:
                            break
                        if job.after is None or job.after in finished:
                            pending.remove(job)
                            say(f"start  {job.key}" + (" (resuming)" if job.extra else ""))
                            running[pool.submit(self.run_one, job)] = job
                    if not running:  # what is left waits on a job that failed
                        for job in pending:
                            job.status, job.reason = "failed", f"{job.after} did not finish"
                        break
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        job = future.result()
                        del running[future]
                        if job.status == "done":
                            finished.add(job.key)
                        result = outcome(self.out, job)
                        say(f"{job.status:6} {job.key} ({job.wall_s:.0f} s) {result}")
            except KeyboardInterrupt:
                self.stop()
                raise Interrupted(
                    "interrupted: the running jobs saved their checkpoints; run the same "
                    "command again to continue where it stopped",
                    exit_code=130,
                ) from None

    def stop(self) -> None:
        """Ctrl-C or SIGTERM: each running job's main process gets one SIGTERM (it saves
        last.ckpt and exits, as on a preemption; SIGINT may be ignored in a job started in
        background). Not its process group: a loader worker killed first would end the
        job with an error before its checkpoint."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def last_error(console: Path) -> str:
    """The job's one-line error (`error: ...`), else its last line."""
    lines = console.read_text(errors="replace").splitlines() if console.is_file() else []
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1].strip()


def outcome(out: Path, job: Job) -> str:
    if job.status != "done":
        return job.reason
    r = json.loads((out / job.study / job.name / RESULTS).read_text())
    text = f"{r['data']} test {r['metrics'].get('test/acc', float('nan')):.4f}"
    if r.get("fewshot_report"):
        text += f", {r['fewshot_report']} {r['fewshot'][r['fewshot_report']]:.4f}"
    return text


def fashion_test_images(folder: Path, per_class: int = 1) -> Path:
    """Fashion-MNIST test images, `per_class` of each class, as PNGs: the images the real
    model's attention is measured on (the bundled photographs are not its domain)."""
    from PIL import Image

    from vitexp.data import fashion_mnist
    from vitexp.data.config import DataConfig

    x, y = fashion_mnist.load(DataConfig(name="fashion_mnist", source="fashion_mnist"))[0]["test"]
    folder.mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(fashion_mnist.CLASS_NAMES):
        for i in (y == label).nonzero()[0][:per_class]:
            Image.fromarray(x[i]).convert("RGB").save(folder / f"{name.replace('/', '_')}_{i}.png")
    return folder


def real_figures(out: Path, say) -> None:
    """The paper's figures of the real data's 1-D stem model (seed 0), once: claims 3 and 4
    are judged on them (`python -m vitexp.visualize`, as a user would draw them)."""
    run, dest = (out / p for p in REAL_FIGURES)
    if (dest / "figures.json").is_file() or not (run / "results.json").is_file():
        return
    images = fashion_test_images(out / "real_table8" / "figure_images")
    # quoted: a job directory's name holds '=' and ','
    cmd = [sys.executable, "-m", "vitexp.visualize", f"pretrained='{run}'", f"out='{dest}'"]
    cmd.append(f"images='{images}'")
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines() or [""]
    name = REAL_FIGURES[1]
    say(f"failed {name}: {lines[-1]}" if done.returncode else f"done   {name}")


# the resolution study: each real_resolution run scored at these test resolutions (7 px
# patches: 2x2 to 8x8 patches; trained at 28 px = 4x4), RoPE also with interpolated positions
TEST_RESOLUTIONS = "[14,21,28,35,42,56]"


def resolution_curves(out: Path, planned: list[Job], jobs: int, say) -> None:
    """`python -m vitexp.evaluate` on every finished real_resolution run, once, `jobs` at a
    time (as a user would score a checkpoint away from its training resolution); RoPE runs
    twice: positions extrapolated (resolutions.json) and interpolated."""
    from vitexp.analysis.resolution import RESULTS as SCORES
    from vitexp.models.pos_embed import ROPE_KINDS
    from vitexp.models.rope import ROPE_POSITIONS

    commands = []
    for job in planned:
        run = out / job.study / job.name
        if job.study != "real_resolution" or not (run / RESULTS).is_file():
            continue
        kind = next(o.split("=")[1] for o in job.overrides if o.startswith("model.pos_embed.kind"))
        for policy in ROPE_POSITIONS if kind in ROPE_KINDS else [None]:
            name = (
                SCORES.replace(".json", "_interpolate.json") if policy == "interpolate" else SCORES
            )
            if (run / name).is_file():
                continue
            cmd = [sys.executable, "-m", "vitexp.evaluate", f"pretrained='{run}'"]
            cmd += [f"resolutions={TEST_RESOLUTIONS}", f"out='{run / name}'"]
            commands.append(
                (f"{job.key} {name}", cmd + ([f"rope_positions={policy}"] if policy else []))
            )
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))

    def evaluate(label: str, cmd: list[str]) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = (done.stdout + done.stderr).strip().splitlines() or [""]
        say(f"failed {label}: {lines[-1]}" if done.returncode else f"done   {label}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(evaluate, label, cmd) for label, cmd in commands]:
            future.result()


def reproduce(
    out: Path,
    jobs: int = 2,
    seeds: int | None = None,
    studies=STUDIES,
    extra: tuple[str, ...] = (),
) -> Path:
    """Run (or continue) everything, then write the study tables and report.html."""
    from vitexp.analysis import tables
    from vitexp.analysis.report_html import write_report

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    planned = plan(out, seeds, studies, extra)
    todo = sum(j.status == "pending" for j in planned)
    print(f"reproduce: {len(planned)} jobs, {todo} to run, {jobs} at a time -> {out}", flush=True)

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    Runner(out, jobs).run(planned, say)
    if "real_table8" in studies:
        real_figures(out, say)
    if "real_resolution" in studies:
        resolution_curves(out, planned, jobs, say)
    summaries = {s: tables.report(out / s) for s in SWEEPS if s in studies}
    if "recipes" in studies:
        from vitexp.analysis import recipes

        write_atomic(out / "recipes" / "recipes.md", recipes.markdown(out))
        print(recipes.markdown(out), flush=True)
    timing = {"wall_s_this_call": round(time.time() - start, 1), "jobs_in_parallel": jobs}
    html = write_report(out, planned, timing, summaries)
    failed = [j for j in planned if j.status == "failed"]
    if failed:
        names = ", ".join(j.key for j in failed)
        raise RuntimeError(f"{len(failed)} job(s) failed ({names}): see each console.log; {html}")
    say(f"report: {html}")
    return html


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vitexp.reproduce", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"))
    parser.add_argument("--jobs", type=int, default=2, help="jobs run at once (default 2)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per cell (default: Table 8 3, data size 2)"
    )
    parser.add_argument(
        "--studies",
        default=",".join(STUDIES),
        help=f"a subset of {','.join(STUDIES)} (the default), or {','.join(OPTIONAL_STUDIES)}",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every job"
    )
    args = parser.parse_args()

    def stop_on_sigterm(signum, frame) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM (a scheduler, `kill`) stop the jobs cleanly, even where the shell
    # started this command with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_on_sigterm)

    def main_task() -> None:
        if args.jobs < 1 or (args.seeds is not None and args.seeds < 1):
            raise ConfigError(f"--jobs {args.jobs} --seeds {args.seeds}: both must be >= 1")
        studies = tuple(s for s in args.studies.split(",") if s)
        reproduce(args.out, args.jobs, args.seeds, studies, tuple(args.set))

    run_cli(main_task)


if __name__ == "__main__":
    main()
