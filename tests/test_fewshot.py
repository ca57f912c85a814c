"""Few-shot linear evaluation: the solver against scikit-learn, the draws, the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from test_train import train
from vitexp.analysis.fewshot import draw_shots, fewshot_accuracy, ridge_fit
from vitexp.errors import DataError


@pytest.mark.parametrize("n,d", [(200, 16), (12, 64)])  # primal and dual forms
def test_ridge_matches_sklearn(n, d):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
    ref = Ridge(alpha=0.7, fit_intercept=True, solver="cholesky").fit(x, y)
    w, b = ridge_fit(torch.tensor(x), torch.tensor(y), 0.7)
    np.testing.assert_allclose(w.numpy(), ref.coef_.T, atol=1e-8)
    np.testing.assert_allclose(b.numpy(), ref.intercept_, atol=1e-8)


@pytest.mark.parametrize("n_per_class", [1, 5, 25])
def test_fewshot_accuracy_matches_an_independent_sklearn_pipeline(n_per_class):
    rng = np.random.default_rng(n_per_class)
    num_classes, dim = 4, 32
    centers = rng.normal(size=(num_classes, dim))
    train_y = np.repeat(np.arange(num_classes), n_per_class)
    test_y = rng.integers(0, num_classes, 300)
    train_x = centers[train_y] + rng.normal(scale=2.0, size=(len(train_y), dim))
    test_x = centers[test_y] + rng.normal(scale=2.0, size=(len(test_y), dim))

    scaler = StandardScaler().fit(train_x)  # the k-shot set's own statistics
    targets = 2.0 * np.eye(num_classes)[train_y] - 1.0  # {-1, +1}^K
    ridge = Ridge(alpha=1.0, solver="cholesky").fit(scaler.transform(train_x), targets)
    expected = np.mean(ridge.predict(scaler.transform(test_x)).argmax(1) == test_y)

    ours = fewshot_accuracy(
        torch.tensor(train_x, dtype=torch.float32),
        torch.tensor(train_y),
        torch.tensor(test_x, dtype=torch.float32),
        torch.tensor(test_y),
        num_classes,
        1.0,
    )
    assert ours == pytest.approx(expected, abs=1e-4)
    assert ours > 1 / num_classes  # the classes are separable: better than chance


def test_draws_take_k_of_every_class_deterministically():
    labels = np.repeat(np.arange(5), 7)
    a = draw_shots(labels, 3, 5, np.random.default_rng([0, 3, 0]))
    b = draw_shots(labels, 3, 5, np.random.default_rng([0, 3, 0]))
    c = draw_shots(labels, 3, 5, np.random.default_rng([0, 3, 1]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(set(a.tolist())) == 15 and np.bincount(labels[a]).tolist() == [3] * 5
    with pytest.raises(
        DataError, match="class 0 of the few-shot data has 7 training images, fewer than 10"
    ):
        draw_shots(labels, 10, 5, np.random.default_rng(0))


FEWSHOT = ["fewshot.shots=[1,5]", "fewshot.report_shot=5", "fewshot.draws=2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fs") / "pre"
    results = train(run_dir, *FEWSHOT)
    assert set(results["fewshot"]) == {"digits/1shot", "digits/5shot"}
    assert results["fewshot_report"] == "digits/5shot"
    metrics = next((run_dir / "logs").rglob("metrics.csv")).read_text()
    assert "fewshot/digits/5shot" in metrics  # logged by the callback at each validation
    return run_dir


def test_command_on_a_checkpoint(checkpoint: Path, tmp_path: Path):
    out = tmp_path / "fs.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitexp.fewshot",
            f"pretrained={checkpoint}/checkpoints/last.ckpt",
            "fewshot.shots=[1,5]",
            "fewshot.draws=2",
            f"out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    final = json.loads((checkpoint / "results.json").read_text())["fewshot"]
    assert report["accuracy"] == pytest.approx(final, abs=1e-6)  # same draws, same features
    assert "digits/5shot:" in proc.stdout


def test_command_without_a_checkpoint_is_one_line(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "vitexp.fewshot"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: pretrained is not set; give a checkpoint: pretrained=PATH/last.ckpt"
    )


def test_the_control_is_the_same_probe_on_the_runs_own_initialisation(checkpoint: Path):
    """`fewshot_init`: the run's seed, its model and the same draws, before any step."""
    import lightning as L

    from test_train import TINY, compose_cfg
    from vitexp.analysis.fewshot import FewShotEvaluator
    from vitexp.config import validate
    from vitexp.models import build_model

    results = json.loads((checkpoint / "results.json").read_text())
    assert set(results["fewshot_init"]) == set(results["fewshot"])
    assert results["fewshot_init"] != results["fewshot"]  # trained weights score differently
    c = validate(compose_cfg([*TINY, *FEWSHOT]))
    L.seed_everything(c.seed, verbose=False)
    net = build_model(c.model, len(results["class_names"]))
    evaluator = FewShotEvaluator(c.fewshot, net.img_size, c.model.mean, c.model.std)
    assert evaluator.evaluate(net) == pytest.approx(results["fewshot_init"], abs=1e-6)
