"""Few-shot linear evaluation, the metric of the paper's Table 8.

Freeze the model, take the pre-logit features of k images per class of dataset B, solve a
regularised least-squares regression to {-1, +1}^K targets in closed form, and report the
accuracy on B's held-out split, averaged over several random draws of the k-shot set.

`FewShotEvaluator` scores a model; as a Lightning callback (`FewShotCallback`, which
`vitexp.train` hands to the Trainer) it runs at every validation of a pretraining and logs
`fewshot/<dataset>/<k>shot`. The command on a checkpoint is `python -m vitexp.fewshot`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from vitexp.config import FewshotConfig
from vitexp.errors import DataError
from vitexp.models import VisionTransformer

log = logging.getLogger("vitexp")


# --- the closed-form solver ----------------------------------------------------------------
def ridge_fit(x: torch.Tensor, y: torch.Tensor, l2_reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights W (D, K) and intercept b (K,) minimising |x W + b - y|^2 + l2 |W|^2 (the
    intercept unpenalised, as scikit-learn's Ridge). Solved in float64, in whichever of the
    primal (D x D) or dual (N x N) forms is smaller."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    if n >= d:  # (xᵀx + λI)⁻¹ xᵀy
        w = torch.linalg.solve(xc.T @ xc + l2_reg * torch.eye(d, dtype=x.dtype), xc.T @ yc)
    else:  # xᵀ (x xᵀ + λI)⁻¹ y: the same W with an N x N system
        w = xc.T @ torch.linalg.solve(xc @ xc.T + l2_reg * torch.eye(n, dtype=x.dtype), yc)
    return w, (y_mean - x_mean @ w)[0]


def fewshot_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    l2_reg: float,
) -> float:
    """Standardise features with the k-shot set's statistics, regress to {-1, +1}^K targets,
    predict the argmax."""
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, unbiased=False, keepdim=True) + 1e-5
    targets = 2.0 * torch.nn.functional.one_hot(train_y, num_classes) - 1.0
    w, b = ridge_fit((train_x - mean) / std, targets, l2_reg)
    scores = ((test_x.double() - mean.double()) / std.double()) @ w + b
    return (scores.argmax(1) == test_y).double().mean().item()


def draw_shots(
    labels: np.ndarray, k: int, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of k random images of every class."""
    picks = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise DataError(
                f"few-shot: class {c} of the few-shot data has {len(members)} training images, "
                f"fewer than {k}; lower fewshot.shots"
            )
        picks.append(rng.choice(members, size=k, replace=False))
    return np.concatenate(picks)


# --- the evaluator -------------------------------------------------------------------------
@torch.no_grad()
@torch.no_grad()
def pre_logits(model: VisionTransformer, dataset, indices, batch_size: int) -> torch.Tensor:
    """(len(indices), D) features the head would see, in `indices` order, on CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats = []
    loader = DataLoader(Subset(dataset, list(map(int, indices))), batch_size=batch_size)
    for images, _ in loader:
        with torch.autocast(device.type, enabled=device.type == "cuda", dtype=torch.bfloat16):
            tokens = model.forward_features(images.to(device, non_blocking=True))
            feats.append(model.forward_head(tokens, pre_logits=True).float().cpu())
    model.train(was_training)
    return torch.cat(feats)


@dataclass
class FewShotEvaluator:
    """Scores a model's features on dataset B; the k-shot draws and the test subset are fixed
    by the seed, so every evaluation of every model sees the same images."""

    cfg: FewshotConfig
    img_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    _data: object = field(default=None, init=False, repr=False)

    def _prepare(self) -> None:
        from vitexp.data import ImageDataModule

        if self._data is not None:
            return
        dm = ImageDataModule(self.cfg.data, self.img_size, self.mean, self.std, self.cfg.seed)
        self.train_set, self.test_set = dm.split_dataset("train"), dm.split_dataset("test")
        self.train_labels = dm.split_labels("train").numpy()
        test_labels = dm.split_labels("test").numpy()
        rng = np.random.default_rng([self.cfg.seed, 1])
        order = rng.permutation(len(test_labels))[: self.cfg.max_test]
        self.test_indices = np.sort(order)
        self.test_labels = torch.as_tensor(test_labels[self.test_indices])
        self.num_classes = dm.num_classes
        self.draws = {
            k: [
                draw_shots(
                    self.train_labels,
                    k,
                    self.num_classes,
                    np.random.default_rng([self.cfg.seed, k, d]),
                )
                for d in range(self.cfg.draws)
            ]
            for k in self.cfg.shots
        }
        self._data = dm

    def evaluate(self, model: VisionTransformer) -> dict[str, float]:
        """{"<dataset>/<k>shot": mean accuracy over the draws} for every k. Leaves the global
        RNG as it found it, so that evaluating (or not, after a resume) never changes the
        dropout masks of the training that follows."""
        with torch.random.fork_rng(devices=[]):
            return self._evaluate(model)

    def _evaluate(self, model: VisionTransformer) -> dict[str, float]:
        self._prepare()
        batch = self.cfg.data.batch_size
        needed = np.unique(np.concatenate([d for draws in self.draws.values() for d in draws]))
        feats = pre_logits(model, self.train_set, needed, batch)
        row = {int(i): r for r, i in enumerate(needed)}
        test_x = pre_logits(model, self.test_set, self.test_indices, batch)
        results = {}
        for k, draws in self.draws.items():
            accs = []
            for idx in draws:
                x = feats[[row[int(i)] for i in idx]]
                y = torch.as_tensor(self.train_labels[idx])
                accs.append(
                    fewshot_accuracy(
                        x, y, test_x, self.test_labels, self.num_classes, self.cfg.l2_reg
                    )
                )
            results[f"{self.cfg.data.name}/{k}shot"] = float(np.mean(accs))
        return results


class FewShotCallback(L.Callback):
    """Logs `fewshot/<dataset>/<k>shot` at the end of every validation (rank zero computes),
    and scores the run's own random initialisation once, before the first step: the control
    that a transfer score must beat (`at_init`, kept in checkpoints for a resumed run)."""

    def __init__(self, evaluator: FewShotEvaluator) -> None:
        self.evaluator = evaluator
        self.at_init: dict[str, float] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and self.at_init is None and trainer.is_global_zero:
            self.at_init = self.evaluator.evaluate(pl_module.net)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for key, value in self.evaluator.evaluate(pl_module.net).items():
            pl_module.log(f"fewshot/{key}", value, rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"at_init": self.at_init}

    def load_state_dict(self, state_dict: dict) -> None:
        self.at_init = state_dict.get("at_init")
