"""Weight averaging (`ema.decay`): what is averaged, what each stage evaluates, what the
checkpoint holds and what fine-tuning starts from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_train import FINETUNE, train
from vitexp.analysis.fewshot import FewShotEvaluator
from vitexp.errors import ConfigError
from vitexp.models import build_model
from vitexp.models.factory import config_from_record
from vitexp.training.averaging import ema_update
from vitexp.training.checkpoint import RAW_WEIGHTS_KEY, load_pretrained

EMA = ["ema.decay=0.8", "ema.warmup=false", "trainer.max_steps=6"]


def test_the_update_is_a_moving_average_with_an_optional_warmup():
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    ema_update(0.9, warmup=False)(avg, cur, torch.tensor(5))
    torch.testing.assert_close(avg[0], torch.full((3,), 0.1))
    avg = [torch.zeros(3)]
    ema_update(0.9, warmup=True)(avg, cur, torch.tensor(1))  # d = min(0.9, 2 / 11)
    torch.testing.assert_close(avg[0], torch.full((3,), 1 - 2 / 11))
    index = [torch.tensor([0, 1])]
    ema_update(0.9, warmup=False)(index, [torch.tensor([3, 4])], torch.tensor(5))
    assert index[0].tolist() == [3, 4]  # integer buffers (relative-position indices) follow


def states(ckpt: Path) -> tuple[dict, dict]:
    content = torch.load(ckpt, weights_only=True)
    return content["state_dict"], content[RAW_WEIGHTS_KEY]


def net_of(ckpt: Path, key: str = "state_dict") -> torch.nn.Module:
    content = torch.load(ckpt, weights_only=True)
    net = build_model(*config_from_record(content["vitexp"]))
    net.load_state_dict({k[4:]: v for k, v in content[key].items() if k.startswith("net.")})
    return net.eval()


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory) -> tuple[Path, dict, list]:
    """A tiny pretraining with an average of decay 0.8; records the weights the few-shot
    evaluation saw at each validation."""
    seen = []
    evaluate = FewShotEvaluator.evaluate

    def recording(self, net):
        seen.append({k: v.clone() for k, v in net.state_dict().items()})
        return evaluate(self, net)

    run_dir = tmp_path_factory.mktemp("ema") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FewShotEvaluator, "evaluate", recording)
        result = train(run_dir, *EMA, "fewshot.shots=[1]", "fewshot.report_shot=1")
    return run_dir, result, seen


def test_the_checkpoint_holds_the_average_and_the_trained_weights(averaged_run):
    run_dir, result, _ = averaged_run
    averaged, trained = states(run_dir / "checkpoints" / "last.ckpt")
    assert averaged.keys() == trained.keys()
    moved = [k for k in averaged if not torch.equal(averaged[k], trained[k])]
    assert len(moved) > len(averaged) // 2  # 6 steps of 0.8: the average lags
    assert result["weights"] == "EMA 0.8"
    assert result["metrics_raw"] is not None and "test/acc" in result["metrics_raw"]


def test_test_and_few_shot_use_the_average_and_the_raw_test_uses_the_trained(averaged_run):
    run_dir, result, seen = averaged_run
    last = run_dir / "checkpoints" / "last.ckpt"
    averaged, trained = (
        {k[4:]: v for k, v in s.items() if k.startswith("net.")} for s in states(last)
    )
    # the random initialisation (the control, before step 1), validations at steps 2, 4,
    # 6, then the final few-shot of the average, then of the trained weights (`fewshot_raw`)
    assert len(seen) == 6
    for key, value in averaged.items():
        torch.testing.assert_close(seen[-2][key], value, rtol=0, atol=0)
        # the end-of-run validation saw the same average: its last.ckpt was written there
        torch.testing.assert_close(seen[-3][key], value, rtol=0, atol=0)
    for key, value in trained.items():
        torch.testing.assert_close(seen[-1][key], value, rtol=0, atol=0)
    assert result["fewshot"] != result["fewshot_raw"]
    x = torch.randn(4, 3, 32, 32)
    logits_avg, logits_raw = net_of(last)(x), net_of(last, RAW_WEIGHTS_KEY)(x)
    assert not torch.allclose(logits_avg, logits_raw)


def test_validation_sees_the_average_of_its_step(averaged_run):
    """Each validation's few-shot model equals the average saved in that validation's
    best/last checkpoint, never the trained weights."""
    run_dir, _, seen = averaged_run
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    step = int(best.stem.split("=")[-1])
    averaged, trained = states(best)
    at_step = seen[step // 2]  # validations every 2 steps, after the control at init
    key = next(k for k in at_step if not torch.equal(averaged["net." + k], trained["net." + k]))
    torch.testing.assert_close(at_step[key], averaged["net." + key], rtol=0, atol=0)


def test_fine_tuning_starts_from_the_average_or_the_trained_weights(averaged_run, tmp_path):
    run_dir, _, _ = averaged_run
    last = run_dir / "checkpoints" / "last.ckpt"
    cfg = config_from_record(torch.load(last, weights_only=True)["vitexp"])[0]
    for weights, key in (("averaged", "state_dict"), ("raw", RAW_WEIGHTS_KEY)):
        model = build_model(cfg, num_classes=10)
        meta = load_pretrained(last, model, weights)
        assert meta["ema_decay"] == 0.8
        want = net_of(last, key)
        torch.testing.assert_close(
            model.encoder.blocks[0].mlp.fc1.weight, want.encoder.blocks[0].mlp.fc1.weight
        )
    result = train(
        tmp_path / "ft", *FINETUNE, f"pretrained={last}", "trainer.max_steps=2", "ema.decay=0.5"
    )
    assert result["weights"] == "EMA 0.5" and result["pretrained"] == str(last)


@pytest.mark.parametrize(
    "override, message",
    [
        ("ema.decay=1.0", r"ema.decay=1.0 must be in \(0, 1\)"),
        ("ema.decay=0", r"ema.decay=0.0 must be in \(0, 1\)"),
        ("pretrained_weights=best", r"pretrained_weights='best' is not allowed"),
    ],
)
def test_bad_average_settings_are_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "bad", override)
    assert not (tmp_path / "bad").exists()
