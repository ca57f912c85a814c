"""The benchmark measures what it says: equal models, real memory, honest FLOPs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitexp import bench
from vitexp.training import throughput

pytest.importorskip("timm")

TINY = dict(size="debug", img_size=32, batch=8, num_classes=10)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_equivalent_case_builds_models_with_the_same_logits(pool):
    case = throughput.Case(**TINY, pool=pool)
    runners, diff = bench.make_runners(case, throughput.Setup(repeats=1, steps=1, warmup=1))
    assert diff is not None and diff < 1e-5
    assert set(runners) == {"vitexp", "timm"}
    ours, theirs = (sum(p.numel() for p in r.model.parameters()) for r in runners.values())
    assert ours == theirs


def test_variant_without_timm_equivalent_is_timed_against_timm_1d():
    case = throughput.Case(**TINY, kind="relative")
    assert not case.timm_has_it
    runners, diff = bench.make_runners(case, throughput.Setup())
    assert diff is None
    assert runners["vitexp"].model.cfg.pos_embed.kind == "relative"
    assert runners["timm"].model.pos_embed.shape[1] == 65  # timm's learned 1-D table


def test_hybrid_case_builds_both_hybrids():
    case = throughput.Case(size="debug", img_size=32, batch=2, num_classes=10, stem="r50")
    runners, _ = bench.make_runners(case, throughput.Setup())
    for runner in runners.values():
        out = runner.model(runner.images)
        assert out.shape == (2, 10)
    assert type(runners["timm"].model.patch_embed).__name__ == "HybridEmbed"


def test_bench_case_alternates_and_records_every_repeat():
    case = throughput.Case(**TINY)
    result = bench.bench_case(
        case, throughput.Setup(repeats=3, steps=1, warmup=1, min_seconds=0), log=lambda s: None
    )
    for what in ("train_ips", "infer_ips"):
        assert all(len(v) == 3 and min(v) > 0 for v in getattr(result, what).values())
    assert result.ratio("train_ips") > 0
    assert result.spread("train_ips", "timm") >= 0


def test_cpu_peak_memory_sees_a_100mb_allocation():
    with bench.peak_memory(torch.device("cpu")) as mem:
        x = torch.ones(100 * 2**20 // 4)  # 100 MB of float32, touched
        del x
    assert 90 <= mem["mb"] <= 140


def test_grad_checkpointing_lowers_the_peak_memory_of_a_train_step():
    case = throughput.Case(size="S/16", img_size=96, batch=16)
    out = bench.checkpointing_memory(case, throughput.Setup(repeats=1))
    off, on = out["peak_mem_mb"]["off"][0], out["peak_mem_mb"]["on"][0]
    assert off > 50  # activations of 12 blocks x 16 images x 37 tokens: well above noise
    assert out["ratio"] == pytest.approx(on / off) and out["ratio"] < 0.8


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_analytic_flops_match_torch_flop_counter(pool):
    case = throughput.Case(size="S/16", img_size=224, batch=1, pool=pool)
    model = bench.build_timm(case)  # timm: the standard computation, no pruned last block
    counter = FlopCounterMode(display=False)
    # the math kernel spells attention out as matmuls, which the counter counts
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, 224, 224))
    counted = 3 * counter.get_total_flops()
    assert throughput.train_flops_per_image(case) == pytest.approx(counted, rel=0.01)


LIGHTNING_STEP = f"""
from vitexp.training import throughput
out = throughput.lightning_step(throughput.Case(**{TINY!r}), throughput.Setup(warmup=1), steps=2)
print(out["steps"], out["images_per_s"])
"""


def test_lightning_step_times_vitexp_trains_own_step():
    """In a process of its own: Lightning's console handler writes to the stderr of the
    process that imported it, which pytest's capture does not see."""
    result = subprocess.run(
        [sys.executable, "-c", LIGHTNING_STEP], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    steps, images_per_s = result.stdout.split()
    assert int(steps) == 2 and float(images_per_s) > 0
    for chatter in ("GPU available", "litlogger", "srun", "LeafSpec"):  # off the bench's table
        assert chatter not in result.stderr + result.stdout, result.stderr


def test_the_three_formats_hold_the_same_images_and_are_timed(tmp_path, hf_offline):
    """The folder, the parquet shards and the pack that `make bench` times hold the same
    bytes; each format is timed with both decodes, and the table says them all."""
    from vitexp.data import ImageDataModule
    from vitexp.training.bottleneck import FORMATS, compose, format_rates, write_formats

    formats = write_formats(tmp_path, 40)
    seen = {}
    for name in FORMATS:
        c = compose(["trainer=cpu", "data.num_workers=0", *formats[name]], 1)
        dm = ImageDataModule(c.data, (32, 32), [0.0] * 3, [1.0] * 3)
        dm.setup("fit")
        seen[name] = dm.train_images
    assert seen["imagefolder"] == 40 and seen["parquet"] == 40 - 2 * 4  # val, test: the head
    assert seen["litdata"] == 40 - 8 - 3  # the pack holds out test (20 %), then val (10 %)
    data = format_rates(num_images=48, img_size=64, batch=4, batches=2)
    assert set(data["rates"]) == {f"{n}/{d}" for n in FORMATS for d in ("cpu", "gpu")}
    for r in data["rates"].values():
        assert r["per_worker_images_per_s"] > 0
        need = r["workers_needed"]
        assert list(need) == ["1000", "3000", "10000"] and need["1000"] <= need["10000"]
        assert (r["device_stage_images_per_s"] is None) == (r["decode"] == "cpu")
    table = "\n".join(bench.data_table(data, step_images_per_s=500.0))
    for name in FORMATS:
        assert name in table
    assert "the training step above (500 img/s) needs decode=cpu workers" in table


def test_cli_quick_suite_writes_bench_json(tmp_path, monkeypatch):
    small = [throughput.Case(**TINY), throughput.Case(size="S/16", img_size=32, batch=2)]
    monkeypatch.setattr(bench, "cpu_cases", lambda quick: small)
    out = tmp_path / "bench.json"
    report = bench.main(
        [
            "--suite",
            "all",
            "--repeats",
            "2",
            "--steps",
            "1",
            "--data-images",
            "24",
            "--data-batch",
            "8",
            "--workers",
            "0",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["machine"]["torch"] == torch.__version__
    assert [c["case"] for c in saved["cpu"]["cases"]] == [c.name for c in small]
    assert saved["cpu"]["lightning"]["case"] == small[1].name
    memory = saved["cpu"]["grad_checkpointing"]
    assert memory["case"] == small[1].name
    assert len(memory["peak_mem_mb"]["off"]) == len(memory["peak_mem_mb"]["on"]) == 2
    assert memory["ratio"] > 0
    if not torch.cuda.is_available():
        assert "no CUDA device" in saved["gpu"]["skipped"]
    assert len(report["data"]["rates"]) == 6 and report["data"]["workers"] == 0


def test_without_timm_the_bench_says_how_to_install_it(tmp_path):
    """timm is the bench's optional dependency (vitexp[bench]): without it, one line."""
    import subprocess
    import sys

    hide_timm = "import sys; sys.modules['timm'] = None; import importlib.util as u; "
    hide_timm += (
        "find = u.find_spec; u.find_spec = lambda n, *a: None if n == 'timm' else find(n, *a); "
    )
    hide_timm += "import runpy; runpy.run_module('vitexp.bench', run_name='__main__')"
    proc = subprocess.run(
        [sys.executable, "-c", hide_timm, "--quick"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "error: vitexp.bench compares against timm, which is not installed; "
        "pip install 'vitexp[bench]' (make install has it)"
    )
    import vitexp.models  # noqa: F401  the models need no timm

    assert "timm" not in {m.split(".")[0] for m in _modules_loaded_by("vitexp.train")}


def _modules_loaded_by(module: str) -> list[str]:
    import subprocess
    import sys

    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    ).stdout.split()
