"""`make gpu-check` / `python -m vitexp.gpu_check`: the first thing to run on a new machine.

A few minutes of real `vitexp.train` runs with the GPU presets' switches, each checked:

    1. pretrain: bf16 autocast, torch.compile, fused AdamW, gradient clipping, gradient
       accumulation, periodic checkpoints, few-shot evaluation and the paper's figures
    2. resume from `last` (compiled, bf16) and continue to the exact step
    3. fine-tune from that checkpoint at a new resolution (a recompile), fused SGD
    4. DDP: two processes (NCCL on 2+ GPUs; without GPUs, gloo on the CPU)
    5. throughput of `vitexp.train`'s own training step (img/s; MFU on a known GPU)
    6. loader or step: which one is the bottleneck of the run that the given overrides
       describe (`python -m vitexp.gpu_check data=imagenet1k data.root=...`; without any,
       JPEGs it writes), decode=cpu and on a GPU decode=gpu (vitexp.training.bottleneck)

On a machine without a GPU it runs the same checks on the CPU (its "CPU half": bf16 and
compile exist there too), which is what CI runs. Prints one line per check and writes
`gpu_check.json`; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float
    facts: dict[str, Any] = field(default_factory=dict)


def _tiny(gpu: bool) -> list[str]:
    """The quickstart model on `shapes`, with the switches trainer=gpu turns on."""
    switches = (
        ["trainer=gpu"]
        if gpu
        else ["trainer=cpu", "trainer.precision=bf16-mixed", "trainer.compile=true"]
    )
    return [
        *switches,
        "data=shapes",
        "data.num_classes=8",
        "data.shapes.num_train=1024",
        "data.shapes.num_val=64",
        "data.shapes.num_test=64",
        "data.num_workers=2",
        "data.batch_size=32",
        "data.global_batch_size=64",  # accumulation of 2 batches, as the presets do
        "model=vit_tiny_debug",
        "optim.fused=true",
        "trainer.gradient_clip_val=1.0",
        "trainer.max_epochs=null",
        "trainer.val_check_interval=8",
        "trainer.check_val_every_n_epoch=null",
        "trainer.checkpoint_every_n_steps=4",
        "trainer.log_every_n_steps=4",
        "trainer.progress_bar=false",
        "schedule.warmup_steps=2",
        "fewshot.shots=[1,5]",
        "fewshot.report_shot=5",
        "fewshot.max_test=200",
    ]


def _train(work: Path, run_dir: Path, *overrides: str, timeout: int = 600) -> dict[str, Any]:
    """Run `python -m vitexp.train` and return its results.json (raises with its error)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vitexp.train", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        last = errors[-1] if errors else (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {last}")
    return json.loads((run_dir / "results.json").read_text())


def _finite(results: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in results["metrics"].values())


def check_pretrain(work: Path, gpu: bool) -> dict[str, Any]:
    run_dir = work / "pretrain"
    r = _train(work, run_dir, *_tiny(gpu), "trainer.max_steps=16")
    if r["steps"] != 16 or r["global_batch_size"] != 64 or not _finite(r):
        raise RuntimeError(f"unexpected results: steps {r['steps']}, metrics {r['metrics']}")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    if any("_orig_mod" in k for k in ckpt["state_dict"]):
        raise RuntimeError("the compiled model's checkpoint has _orig_mod. keys")
    figures = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    if len(figures) != 4:
        raise RuntimeError(f"expected the 4 figures, found {figures}")
    if not r.get("fewshot"):
        raise RuntimeError("no few-shot result")
    return {"test_acc": r["metrics"]["test/acc"], "figures": figures, "fewshot": r["fewshot"]}


def check_resume(work: Path, gpu: bool) -> dict[str, Any]:
    run_dir = work / "pretrain"
    r = _train(work, run_dir, *_tiny(gpu), "trainer.max_steps=20", "ckpt_path=last")
    if r["resumed_at_step"] != 16 or r["steps"] != 20:
        raise RuntimeError(f"resumed at {r['resumed_at_step']}, ended at {r['steps']}")
    return {"resumed_at_step": 16, "steps": 20}


def check_finetune(work: Path, gpu: bool) -> dict[str, Any]:
    r = _train(
        work,
        work / "finetune",
        *_tiny(gpu),
        "stage=finetune",
        "data=digits",
        "data.num_classes=10",
        "data.global_batch_size=null",
        "model.img_size=48",
        "optim=sgd",
        "trainer.max_steps=8",
        f"pretrained={work / 'pretrain' / 'checkpoints' / 'last.ckpt'}",
    )
    if r["steps"] != 8 or not _finite(r):
        raise RuntimeError(f"unexpected results: {r['steps']} steps, {r['metrics']}")
    return {"test_acc": r["metrics"]["test/acc"], "img_size": 48}


def check_ddp(work: Path, gpu: bool) -> dict[str, Any]:
    base = _tiny(gpu) if gpu else _tiny(False)[3:]  # DDP on CPU: gloo, fp32 eager
    device = ["trainer.accelerator=gpu"] if gpu else ["trainer=cpu"]
    r = _train(
        work,
        work / "ddp",
        *base,
        *device,
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=4",
        "figures=false",
        "fewshot.enabled=false",
    )
    if r["world_size"] != 2 or r["steps"] != 4 or not _finite(r):
        raise RuntimeError(f"world size {r['world_size']}, {r['steps']} steps")
    return {"world_size": 2, "backend": "nccl" if gpu else "gloo"}


def check_throughput(gpu: bool) -> dict[str, Any]:
    """img/s of vitexp.train's step: ViT-B/16 at 224 on a GPU, the debug model on CPU."""
    from vitexp.training.throughput import (
        Case,
        Setup,
        lightning_step,
        peak_flops,
        train_flops_per_image,
    )

    if gpu:
        case, setup = Case("B/16", 224, 128), Setup("cuda", "bfloat16", True, warmup=5)
        steps = 20
    else:
        case, setup = Case("debug", 32, 128, num_classes=32), Setup("cpu", "bfloat16", False)
        steps = 5
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # not Lightning's "GPU available" banner again
    try:
        ips = lightning_step(case, setup, steps)["images_per_s"]
    finally:
        quiet.setLevel(level)
    name, peak = peak_flops(torch.device("cuda" if gpu else "cpu"))
    mfu = ips * train_flops_per_image(case) / peak if peak else None
    return {"case": case.name, "device": name, "images_per_s": round(ips, 1), "mfu": mfu}


def check_bottleneck(overrides: list[str], gpu: bool) -> dict[str, Any]:
    """The run's loader against its step (vitexp.training.bottleneck)."""
    from vitexp.training.bottleneck import check

    return check(overrides, gpu)


def run_checks(
    work: Path, gpu: bool, n_gpus: int, log=print, overrides: list[str] | None = None
) -> list[Check]:
    plan = [
        ("pretrain: bf16 + compile + fused AdamW + clipping + accumulation", check_pretrain),
        ("resume from last (compiled, bf16)", check_resume),
        ("fine-tune at 48 px from the compiled checkpoint (recompile), fused SGD", check_finetune),
    ]
    if n_gpus >= 2 or not gpu:
        plan.append(("DDP step on 2 processes", check_ddp))
    checks = []
    for name, fn in plan:
        checks.append(_timed(name, lambda fn=fn: fn(work, gpu), log))
        if not checks[-1].ok and fn is check_pretrain:
            break  # the others start from its checkpoint
    checks.append(_timed("training-step throughput", lambda: check_throughput(gpu), log))
    bottleneck = partial(check_bottleneck, overrides or [], gpu)
    checks.append(_timed("loader or step: the bottleneck", bottleneck, log))
    return checks


def _timed(name: str, fn, log) -> Check:
    start = time.perf_counter()
    try:
        facts = fn()
        check = Check(name, True, _describe(facts), time.perf_counter() - start, facts)
    except Exception as err:  # noqa: BLE001 - every failure is reported, then the next check
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        check = Check(name, False, first, time.perf_counter() - start)
    mark = "ok  " if check.ok else "FAIL"
    log(f"{mark} {check.name} ({check.seconds:.0f} s): {check.detail}", flush=True)
    return check


def _describe(facts: dict[str, Any]) -> str:
    if "line" in facts:
        return facts["line"]
    shown = []
    for key, value in facts.items():
        if isinstance(value, float):
            value = f"{value:.3g}" if key != "mfu" else f"{100 * value:.1f} %"
        elif isinstance(value, (list, dict)):
            continue
        shown.append(f"{key} {value}")
    return ", ".join(shown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitexp.gpu_check", description=__doc__)
    parser.add_argument("--out", default="outputs/gpu_check.json", help="report file")
    parser.add_argument("--keep", help="keep the runs in this directory (default: deleted)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="vitexp.train overrides of the run whose loader and step are compared "
        "(e.g. +experiment=... data.root=...); default: generated JPEGs",
    )
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if gpu else 0
    if gpu:
        names = {torch.cuda.get_device_name(i) for i in range(n_gpus)}
        bf16 = torch.cuda.is_bf16_supported()
        print(f"GPU: {n_gpus} x {', '.join(names)}; bf16 {'yes' if bf16 else 'NO'}", flush=True)
    else:
        print("no CUDA GPU: checking the CPU half (bf16 autocast, torch.compile, fused "
              "optimizers, clipping, DDP over gloo)", flush=True)  # fmt: skip
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        checks = run_checks(Path(args.keep).resolve(), gpu, n_gpus, overrides=args.overrides)
    else:
        with tempfile.TemporaryDirectory(prefix="vitexp-gpu-check-") as tmp:
            checks = run_checks(Path(tmp), gpu, n_gpus, overrides=args.overrides)
    report = {
        "gpu": gpu,
        "gpus": n_gpus,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "torch": torch.__version__,
        "passed": all(c.ok for c in checks),
        "checks": [c.__dict__ for c in checks],
    }
    out = Path(args.out)
    from vitexp.data.files import write_atomic

    write_atomic(out, json.dumps(report, indent=2) + "\n")
    failed = [c.name for c in checks if not c.ok]
    verdict = "all checks passed" if not failed else f"{len(failed)} FAILED: {'; '.join(failed)}"
    print(f"{verdict} -> {out}", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
