"""Speed and memory benchmark: vitexp's ViT against timm's, in one process.

    python -m vitexp.bench [--suite cpu|gpu|all] [--repeats 3] [--seconds 1.5] [--out bench.json]

For each case both models are built for the same architecture and precision: where timm
has the variant, vitexp's model is converted from timm's (`from_timm`), so both compute the
same logits (checked, the difference is in `bench.json`); where it has not (2-D, relative,
every-layer embeddings, sin-cos), timm's 1-D model of the same size is the reference and the
ratio is the variant's cost. The two are timed alternately (ABAB..., the first one
alternating) and repeatedly; the table gives medians, `bench.json` every repeat.

Measured per case: a training step (forward, loss, backward, optimizer step; images/s),
inference (images/s) and the peak memory of a training step above the resting model
(CUDA: allocator peak; CPU: peak resident set, measured with /proc/self/clear_refs).
vitexp's side is what `vitexp.train` runs: its optimizer (fused AdamW) and, on GPU, bf16
autocast and torch.compile; timm's side is a plain loop with the same precision and
compile switches and PyTorch's default AdamW. `lightning` times the full
`vitexp.train` training step (the LightningModule inside Lightning's loop, callbacks and
logging included) for the headline case, `grad_checkpointing` the peak memory of vitexp's
step without and with activation checkpointing (`model.grad_checkpointing`) for the S/16
case, and `data` the loader formats (image folder, streamed parquet, litdata pack) with
the decode on the loader worker or on the device, per worker (vitexp.training.bottleneck).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitexp.config import OptimConfig
from vitexp.models import VisionTransformer, model_config
from vitexp.models.convert import from_timm
from vitexp.training.module import build_optimizer
from vitexp.training.step_timer import quiet_lightning, synchronize
from vitexp.training.throughput import (
    BENCH_SIZES,
    Case,
    Setup,
    lightning_step,
    peak_flops,
    size_of,
    train_flops_per_image,
)


@dataclass
class Result:
    case: str
    reference: str
    train_ips: dict[str, list[float]] = field(default_factory=dict)  # impl -> per repeat
    infer_ips: dict[str, list[float]] = field(default_factory=dict)
    peak_mem_mb: dict[str, list[float]] = field(default_factory=dict)
    max_abs_logit_diff: float | None = None

    def ratio(self, what: str) -> float:
        values = getattr(self, what)
        return statistics.median(values["vitexp"]) / statistics.median(values["timm"])

    def spread(self, what: str, impl: str) -> float:
        """Relative spread (max - min) / median across repeats."""
        values = getattr(self, what)[impl]
        return (max(values) - min(values)) / statistics.median(values)


def cpu_cases(quick: bool = False) -> list[Case]:
    """fp32 on CPU: the debug model with every variant, ViT-S/16 at 224 with cls and GAP."""
    debug = dict(size="debug", img_size=32, batch=128, num_classes=32)
    cases = [
        Case(**debug),
        Case(**debug, pool="gap"),
        Case(**debug, kind="none"),
        Case(**debug, kind="learned_2d"),
        Case(**debug, kind="relative"),
        Case(**debug, kind="sincos_2d"),
        Case(**debug, placement="every_layer"),
        Case(**debug, placement="every_layer_shared"),
        Case(**debug, kind="learned_2d", placement="every_layer"),
        Case(size="debug", img_size=64, batch=32, num_classes=32, stem="r50"),
        Case(size="S/16", img_size=224, batch=16),
        Case(size="S/16", img_size=224, batch=16, pool="gap"),
    ]
    return cases[:1] + cases[-2:-1] if quick else cases


def gpu_cases() -> list[Case]:
    """bf16 on one GPU: ViT-B/16 at 224 (the paper's size), cls and GAP, and the variants."""
    base = dict(size="B/16", img_size=224, batch=256)
    return [
        Case(**base),
        Case(**base, pool="gap"),
        Case(**base, kind="learned_2d"),
        Case(**base, kind="relative"),
        Case(**base, placement="every_layer"),
        Case(size="S/16", img_size=224, batch=256),
    ]


# --- models ----------------------------------------------------------------------------------
def build_timm(case: Case) -> nn.Module:
    """timm's ViT of the case's size: the same variant where timm has it, else 1-D/stem."""
    from timm.models import vision_transformer as tv

    kwargs = dict(
        size_of(case),
        img_size=case.img_size,
        num_classes=case.num_classes,
        global_pool="token" if case.pool == "cls" else "avg",
        class_token=case.pool == "cls",
        fc_norm=False,
        pos_embed="none" if case.kind == "none" else "learn",
    )
    if case.stem == "r50":
        from timm.models.vision_transformer_hybrid import HybridEmbed, _resnetv2

        backbone = _resnetv2((3, 4, 9))
        kwargs["embed_layer"] = lambda **kw: HybridEmbed(backbone=backbone, **kw)
        kwargs["patch_size"] = 1
    return tv.VisionTransformer(**kwargs)


def build_vitexp(case: Case, timm_model: nn.Module) -> VisionTransformer:
    """vitexp's model: timm's weights converted where timm has the variant."""
    if case.timm_has_it:
        return from_timm(timm_model)
    return vitexp_model(case)


def vitexp_model(case: Case, grad_checkpointing: bool = False) -> VisionTransformer:
    cfg = model_config(
        BENCH_SIZES[case.size],
        img_size=case.img_size,
        pool=case.pool,
        pos_embed={"kind": case.kind, "placement": case.placement},
        stem=case.stem,
        grad_checkpointing=grad_checkpointing,
        **({"patch_size": 1} if case.stem == "r50" else {}),
    )
    return VisionTransformer(cfg, num_classes=case.num_classes)


def default_adamw(params) -> torch.optim.Optimizer:
    """What a plain training loop over timm's model uses: PyTorch's AdamW, default kernel."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


# --- timing and memory -----------------------------------------------------------------------
@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory (MB) above the level at entry: the CUDA allocator's peak, or on CPU the
    resident set's high-water mark (reset through /proc/self/clear_refs after returning
    freed heap to the OS, so that both implementations start from the same floor)."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        synchronize(device)
        out["mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _proc_status_kb("VmRSS")
    except OSError:
        base = None
    yield out
    if base is not None:
        out["mb"] = (_proc_status_kb("VmHWM") - base) / 1024


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


class Runner:
    """One implementation of a case: its model, optimizer and the two timed functions."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        case: Case,
        setup: Setup,
    ) -> None:
        self.device = torch.device(setup.device)
        self.model = model
        self.optimizer = optimizer
        self.autocast = torch.autocast(
            self.device.type,
            dtype=getattr(torch, setup.dtype),
            enabled=setup.dtype != "float32",
        )
        self.forward = torch.compile(model) if setup.compile else model
        g = torch.Generator().manual_seed(0)
        shape = (case.batch, 3, case.img_size, case.img_size)
        self.images = torch.randn(shape, generator=g).to(self.device)
        self.labels = torch.randint(0, case.num_classes, (case.batch,), generator=g).to(self.device)

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = F.cross_entropy(self.forward(self.images), self.labels)
        loss.backward()
        self.optimizer.step()

    @torch.inference_mode()
    def infer_step(self) -> None:
        self.model.eval()
        with self.autocast:
            self.forward(self.images)

    def images_per_s(self, step: Callable[[], None], steps: int, min_seconds: float) -> float:
        """Throughput over at least `steps` steps and `min_seconds` seconds."""
        synchronize(self.device)
        start, done = time.perf_counter(), 0
        while done == 0 or time.perf_counter() - start < min_seconds:
            for _ in range(steps):  # no synchronisation inside a chunk: the GPU runs ahead
                step()
            done += steps
            synchronize(self.device)
        return done * len(self.images) / (time.perf_counter() - start)

    def peak_train_mb(self) -> float | None:
        with peak_memory(self.device) as mem:
            self.train_step()
        return mem.get("mb")


def make_runners(case: Case, setup: Setup) -> tuple[dict[str, Runner], float | None]:
    """Both implementations, on the device, with the logits difference when equivalent."""
    device = torch.device(setup.device)
    torch.manual_seed(0)
    timm_model = build_timm(case)
    ours = build_vitexp(case, timm_model)
    diff = None
    if case.timm_has_it:
        x = torch.randn(2, 3, case.img_size, case.img_size)
        with torch.no_grad():
            nn.init.normal_(timm_model.head.weight, std=0.02)  # zero heads prove nothing
            ours.head.weight.copy_(timm_model.head.weight)
            diff = (ours.eval()(x) - timm_model.eval()(x)).abs().max().item()
    timm_model, ours = timm_model.to(device), ours.to(device)
    ours_optim = build_optimizer(
        [{"params": list(ours.parameters())}], OptimConfig(lr=1e-3, weight_decay=0.05)
    )
    runners = {
        "vitexp": Runner(ours, ours_optim, case, setup),
        "timm": Runner(timm_model, default_adamw(timm_model.parameters()), case, setup),
    }
    return runners, diff


def bench_case(case: Case, setup: Setup, log: Callable[[str], None] = print) -> Result:
    runners, diff = make_runners(case, setup)
    reference = "timm (same variant)" if case.timm_has_it else "timm 1-D/stem (no equivalent)"
    result = Result(case.name, reference, max_abs_logit_diff=diff)
    for runner in runners.values():  # compile, allocate optimizer state, warm caches
        for _ in range(setup.warmup):
            runner.train_step()
            runner.infer_step()
    for r in range(setup.repeats):  # speed first: measuring memory disturbs the allocator
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for impl in order:
            runner = runners[impl]
            for what, step in (("train_ips", runner.train_step), ("infer_ips", runner.infer_step)):
                ips = runner.images_per_s(step, setup.steps, setup.min_seconds)
                getattr(result, what).setdefault(impl, []).append(ips)
    for r in range(setup.repeats):
        for impl in list(runners) if r % 2 == 0 else list(runners)[::-1]:
            mem = runners[impl].peak_train_mb()
            if mem is not None:
                result.peak_mem_mb.setdefault(impl, []).append(mem)
    log(row(result))
    return result


def checkpointing_memory(case: Case, setup: Setup) -> dict[str, Any]:
    """Peak memory of vitexp's training step without and with `model.grad_checkpointing`
    (same weights, batch and optimizer; eager, so that only the switch differs), each
    measured `setup.repeats` times after a step that allocated the optimizer state."""
    out: dict[str, Any] = {"case": case.name, "batch": case.batch, "peak_mem_mb": {}}
    for name, flag in (("off", False), ("on", True)):
        torch.manual_seed(0)
        model = vitexp_model(case, grad_checkpointing=flag).to(setup.device)
        optimizer = build_optimizer([{"params": list(model.parameters())}], OptimConfig())
        runner = Runner(model, optimizer, case, replace(setup, compile=False))
        runner.train_step()
        peaks = [runner.peak_train_mb() for _ in range(setup.repeats)]
        out["peak_mem_mb"][name] = [p for p in peaks if p is not None]
        del runner, model, optimizer
    off, on = (out["peak_mem_mb"][k] for k in ("off", "on"))
    out["ratio"] = statistics.median(on) / statistics.median(off) if off and on else None
    return out


# --- data loaders ----------------------------------------------------------------------------
def data_table(data: dict[str, Any], step_images_per_s: float | None) -> list[str]:
    """The loader formats' lines: img/s per worker with the decode on the worker (cpu) or on
    the device (gpu: the worker reads bytes and draws), and the workers a GPU needs."""
    from vitexp.training.bottleneck import FORMATS, TRAINING_SPEEDS

    speeds = "/".join(f"{s // 1000}k" for s in TRAINING_SPEEDS)
    lines = [
        f"\n## data: 500x375 JPEGs -> {data['img_size']} px (Inception crop, flip), batch "
        f"{data['batch']}, {data['workers']} loader worker: img/s per worker",
        f"{'format':<12} {'decode=cpu':>10} {'decode=gpu':>10} {'device stage':>12}   "
        f"workers for {speeds} img/s (cpu | gpu)",
    ]
    rates = data["rates"]
    for name in FORMATS:
        cpu, gpu = rates[f"{name}/cpu"], rates[f"{name}/gpu"]
        need = ["/".join(map(str, r["workers_needed"].values())) for r in (cpu, gpu)]
        lines.append(
            f"{name:<12} {cpu['per_worker_images_per_s']:>10.0f} "
            f"{gpu['per_worker_images_per_s']:>10.0f} {gpu['device_stage_images_per_s']:>12.0f}"
            f"   {need[0]} | {need[1]}"
        )
    lines.append(
        "(device stage: decode + crop + normalise of decode=gpu, timed on the CPU here; "
        "workers needed: training img/s / the worker's img/s, rounded up)"
    )
    if step_images_per_s:
        cpu = {n: rates[f"{n}/cpu"]["per_worker_images_per_s"] for n in FORMATS}
        shown = ", ".join(f"{n} {math.ceil(step_images_per_s / r)}" for n, r in cpu.items())
        lines.append(
            f"the training step above ({step_images_per_s:.0f} img/s) needs decode=cpu "
            f"workers: {shown}"
        )
    return lines


# --- report ----------------------------------------------------------------------------------
def row(r: Result) -> str:
    med = statistics.median
    mem = (
        f"{r.ratio('peak_mem_mb'):5.2f}x"
        if r.peak_mem_mb.get("timm") and med(r.peak_mem_mb["timm"]) > 0
        else "  n/a"
    )
    return (
        f"| {r.case} | {med(r.train_ips['vitexp']):8.1f} | {med(r.train_ips['timm']):8.1f} "
        f"| **{r.ratio('train_ips'):.2f}x** ±{100 * r.spread('train_ips', 'vitexp'):.0f}% "
        f"| {r.ratio('infer_ips'):.2f}x | {mem} | {r.reference} |"
    )


HEADER = (
    "| case | train img/s vitexp | train img/s timm | train ratio (spread) "
    "| inference ratio | peak-memory ratio | reference |\n|---|---|---|---|---|---|---|"
)


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_suite(name: str, cases: list[Case], setup: Setup, headline: Case | None) -> dict:
    print(f"\n## {name}: {setup.device}, {setup.dtype}, compile={setup.compile}\n\n{HEADER}")
    results = [bench_case(case, setup) for case in cases]
    out: dict[str, Any] = {"setup": asdict(setup), "cases": []}
    for r in results:
        out["cases"].append(
            {
                **asdict(r),
                "train_ratio": r.ratio("train_ips"),
                "infer_ratio": r.ratio("infer_ips"),
                "peak_mem_ratio": r.ratio("peak_mem_mb") if r.peak_mem_mb.get("timm") else None,
                "train_spread": {i: r.spread("train_ips", i) for i in r.train_ips},
            }
        )
    memory_case = next((c for c in cases if c.size == "S/16"), None)
    if headline is not None and memory_case is not None:
        mem = checkpointing_memory(memory_case, setup)
        out["grad_checkpointing"] = mem
        if mem["ratio"] is not None:
            off, on = (statistics.median(mem["peak_mem_mb"][k]) for k in ("off", "on"))
            print(
                f"\ngrad checkpointing ({mem['case']}, batch {mem['batch']}): peak train-step "
                f"memory {off:.0f} MB -> {on:.0f} MB ({mem['ratio']:.2f}x)"
            )
    if headline is not None:
        step = lightning_step(headline, setup, setup.steps * 2)
        bare = next(r for r in results if r.case == headline.name)
        step["vs_bare_vitexp"] = step["images_per_s"] / statistics.median(bare.train_ips["vitexp"])
        step["vs_timm"] = step["images_per_s"] / statistics.median(bare.train_ips["timm"])
        out["lightning"] = {"case": headline.name, **step}
        print(
            f"\nvitexp.train's own step ({headline.name}): {step['images_per_s']:.1f} img/s, "
            f"{step['vs_bare_vitexp']:.2f}x the bare vitexp step, {step['vs_timm']:.2f}x timm"
        )
    device = torch.device(setup.device)
    gpu_name, peak = peak_flops(device)
    if peak is not None:
        for case_out, case in zip(out["cases"], cases, strict=True):
            flops = train_flops_per_image(case)
            for impl, ips in case_out["train_ips"].items():
                mfu = flops * statistics.median(ips) / peak
                case_out.setdefault("mfu", {})[impl] = mfu
        print(f"MFU against {peak / 1e12:.0f} TFLOP/s bf16 ({gpu_name}):")
        for case_out in out["cases"]:
            print(
                f"  {case_out['case']}: "
                + ", ".join(f"{k} {100 * v:.1f}%" for k, v in case_out["mfu"].items())
            )
    return out


def require_timm() -> None:
    """The bench measures against timm, an optional dependency: say how to get it."""
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        print(
            "error: vitexp.bench compares against timm, which is not installed; "
            "pip install 'vitexp[bench]' (make install has it)",
            file=sys.stderr,
        )
        sys.exit(2)


def main(argv: list[str] | None = None) -> dict:
    require_timm()
    parser = argparse.ArgumentParser(
        prog="python -m vitexp.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--suite", choices=["cpu", "gpu", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per repeat (CPU)")
    parser.add_argument("--seconds", type=float, default=1.5, help="timed seconds per repeat")
    parser.add_argument("--quick", action="store_true", help="two CPU cases, for smoke runs")
    parser.add_argument("--data-images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1, help="data loader workers")
    parser.add_argument("--data-batch", type=int, default=32)
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {"machine": machine()}
    print(f"machine: {report['machine']}")
    model_ips = None
    if args.suite in ("cpu", "all"):
        setup = Setup("cpu", steps=args.steps, min_seconds=args.seconds, repeats=args.repeats)
        cases = cpu_cases(args.quick)
        headline = next(c for c in cases if c.size == "S/16")
        report["cpu"] = run_suite("CPU", cases, setup, headline)
        model_ips = report["cpu"]["lightning"]["images_per_s"]
        if not args.quick:  # the same switch on both sides: what compile adds on CPU
            compiled = replace(setup, compile=True)
            report["cpu_compiled"] = run_suite("CPU, compiled", [headline], compiled, None)
    if args.suite in ("gpu", "all"):
        if torch.cuda.is_available():
            setup = Setup(
                "cuda",
                "bfloat16",
                True,
                steps=10,
                min_seconds=args.seconds,
                warmup=5,
                repeats=args.repeats,
            )
            cases = gpu_cases()
            report["gpu"] = run_suite("GPU", cases, setup, cases[0])
            model_ips = report["gpu"]["lightning"]["images_per_s"]
        else:
            report["gpu"] = {"skipped": "no CUDA device on this machine: nothing measured"}
            print("\n## GPU: skipped, no CUDA device on this machine (nothing measured)")
    from vitexp.training.bottleneck import format_rates

    with quiet_lightning():
        data = format_rates(args.data_images, 224, args.data_batch, args.workers)
    report["data"] = data
    print("\n".join(data_table(data, model_ips)))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"-> {args.out}")
    return report


if __name__ == "__main__":
    main()
