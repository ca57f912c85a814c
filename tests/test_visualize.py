"""The paper's figures: rollout, token boxes, attention distance, position similarity, filter
PCs, the `vitexp.visualize` command and the FiguresCallback."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from vitexp.analysis.figures import FILES, FiguresCallback, log_figures, make_figures
from vitexp.analysis.viz import plots
from vitexp.analysis.viz.compute import (
    attention_rollout,
    embedding_filter_pcs,
    embedding_filters,
    grid_structure,
    mean_attention_distance,
    patch_boxes,
    pos_embed_similarity,
    position_tables,
    rollout_to_patches,
    similarity_mosaic,
    token_boxes,
    tokens_to_pixels,
)
from vitexp.analysis.viz.images import center_crop_resize, load_images
from vitexp.errors import CheckpointError, ConfigError, DataError
from vitexp.models.factory import model_record
from vitexp.visualize import VisualizeCommandConfig, visualize_checkpoint

from conftest import randomize_, tiny_vit

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def softmax_rows(*shape) -> torch.Tensor:
    return torch.randn(*shape).softmax(dim=-1)


# --- attention rollout -----------------------------------------------------------------------
def test_rollout_is_the_product_of_head_averaged_residual_attentions():
    a1, a2 = softmax_rows(2, 3, 5, 5), softmax_rows(2, 3, 5, 5)  # (B, heads, T, T)
    eye = torch.eye(5)
    hat1, hat2 = (a1.mean(1) + eye) / 2, (a2.mean(1) + eye) / 2
    expected = torch.stack([hat2[b] @ hat1[b] for b in range(2)])
    rollout = attention_rollout([a1, a2])
    assert torch.allclose(rollout, expected, atol=1e-6)
    assert torch.allclose(rollout.sum(-1), torch.ones(2, 5), atol=1e-6)
    assert not torch.allclose(rollout, torch.stack([hat1[b] @ hat2[b] for b in range(2)]))


def test_rollout_by_hand():
    # layer 1: heads [[1,0],[0,1]] and [[0,1],[0,1]] average to [[.5,.5],[0,1]];
    # with the residual, A1 = [[.75,.25],[0,1]]. Layer 2: [[.2,.8],[.6,.4]] -> [[.6,.4],[.3,.7]].
    # R = A2 A1 = [[.6*.75, .6*.25 + .4], [.3*.75, .3*.25 + .7]] = [[.45,.55],[.225,.775]]
    layer1 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    layer2 = torch.tensor([[[[0.2, 0.8], [0.6, 0.4]]]])
    rollout = attention_rollout([layer1, layer2])
    assert torch.allclose(rollout[0], torch.tensor([[0.45, 0.55], [0.225, 0.775]]), atol=1e-6)


def test_rollout_to_patches_takes_the_class_row_or_the_mean_patch_row():
    r = torch.arange(9.0).reshape(1, 3, 3)  # token 0 is the class token
    assert rollout_to_patches(r, 1, "cls").tolist() == [[1.0, 2.0]]
    assert rollout_to_patches(r, 1, "gap").tolist() == [[5.5, 6.5]]  # rows 1, 2; cols 1, 2
    assert rollout_to_patches(r, 0, "gap").tolist() == [[3.0, 4.0, 5.0]]


# --- tokens, pixels, distances ---------------------------------------------------------------
def test_overlapping_patches_map_to_their_boxes_and_average():
    model = tiny_vit(img_size=16, patch_size=8, patch_stride=4)  # 3 x 3 tokens
    boxes = token_boxes(model)
    assert model.grid_size == (3, 3)
    assert boxes[4].tolist() == [4, 4, 12, 12] and boxes[5].tolist() == [8, 4, 16, 12]
    one_hot = torch.zeros(2, 9)
    one_hot[0, 4] = 1.0  # the centre token: every pixel of its box is covered by 4 tokens
    one_hot[1, 0] = 1.0  # the corner token: 1, 2 or 4 tokens cover its pixels
    pixels = tokens_to_pixels(one_hot, boxes, (16, 16))
    centre = torch.zeros(16, 16)
    centre[4:12, 4:12] = 0.25
    assert torch.equal(pixels[0], centre)
    corner = torch.zeros(16, 16)
    corner[:8, :8] = 0.25
    corner[:4, :8] = corner[:8, :4] = 0.5
    corner[:4, :4] = 1.0
    assert torch.equal(pixels[1], corner)
    assert tokens_to_pixels(torch.full((1, 9), 3.0), boxes, (16, 16)).eq(3.0).all()


def test_hybrid_tokens_cover_feature_map_cells_of_16_pixels():
    model = tiny_vit(stem="r50", img_size=64, patch_size=2, patch_stride=1)  # 4x4 map -> 3x3
    boxes = token_boxes(model)
    assert model.grid_size == (3, 3)
    assert boxes.tolist() == [
        [16 * j, 16 * i, 16 * j + 32, 16 * i + 32] for i in range(3) for j in range(3)
    ]
    pixels = tokens_to_pixels(torch.eye(9)[[8]], boxes, (64, 64))[0]
    assert (pixels > 0).nonzero().min(0).values.tolist() == [32, 32]  # token (2, 2): 32..64
    assert pixels[48:, 48:].eq(1.0).all() and pixels[32:48, 32:48].eq(0.25).all()
    weight, root = embedding_filters(model)
    assert root and weight.shape == (64, 3, 7, 7)  # the ResNet root conv, not the 1024-ch proj
    x = torch.randn(1, 3, 16, 16)  # the filters the StdConv2d applies (weight-standardised)
    conv = model.patch_embed.backbone.root[0]
    assert torch.allclose(F.conv2d(F.pad(x, [2, 3, 2, 3]), weight, stride=2), conv(x), atol=1e-4)


def test_mean_attention_distance_by_hand():
    # 2 x 2 grid of 4 px patches, centres (2,2), (6,2), (2,6), (6,6); a class token first.
    boxes = patch_boxes((2, 2), (4, 4), (4, 4))
    self_only = torch.zeros(5, 5)
    self_only[:, 0] = 0.5  # half on the class token: dropped and renormalised away
    self_only[1:, 1:] += 0.5 * torch.eye(4)
    uniform = torch.full((5, 5), 0.2)
    layer = torch.stack([self_only, uniform])[None].expand(3, -1, -1, -1)  # (B, heads, T, T)
    distance = mean_attention_distance([layer, layer.flip(1)], boxes, num_prefix_tokens=1)
    mean_uniform = (0 + 4 + 4 + 4 * math.sqrt(2)) / 4  # from any patch: self, 2 sides, diagonal
    expected = torch.tensor([[0.0, mean_uniform], [mean_uniform, 0.0]])
    assert torch.allclose(distance, expected, atol=1e-5)


def test_attention_distance_of_a_model_has_one_value_per_layer_and_head():
    model = randomize_(tiny_vit(depth=3)).eval()
    maps = model.attention_maps(torch.randn(2, 3, 32, 32))
    distance = mean_attention_distance(maps, token_boxes(model), model.num_prefix_tokens)
    assert distance.shape == (3, 4)
    assert (distance > 0).all() and (distance < 32 * math.sqrt(2)).all()


# --- position embeddings ---------------------------------------------------------------------
def test_learned_2d_similarity_shows_rows_and_columns_in_the_patch_layout():
    model = tiny_vit(img_size=(16, 24), patch_size=8, pos_embed="learned_2d")  # 2 x 3 grid
    table = model.encoder.pos_embeds[0]
    with torch.no_grad():  # orthonormal X and Y vectors: exact similarities
        table.x_embed.copy_(torch.eye(16)[:3])
        table.y_embed.copy_(torch.eye(16)[3:5])
    [(layer, patches)] = position_tables(model, 1)
    assert layer == 0 and patches.shape == (6, 32)  # class token excluded
    sim = pos_embed_similarity(patches)
    rows, cols = torch.arange(6) // 3, torch.arange(6) % 3
    share = (rows[:, None] == rows[None]).float() + (cols[:, None] == cols[None]).float()
    assert torch.allclose(sim, share / 2, atol=1e-6)  # 1 on the diagonal, 1/2 same row/col
    mosaic = similarity_mosaic(sim, (2, 3))
    assert mosaic.shape == (2 * 3 - 1, 3 * 4 - 1)  # 2 x 3 tiles of 2 x 3, 1-pixel gaps
    for q in range(6):
        i, j = divmod(q, 3)
        tile = mosaic[i * 3 : i * 3 + 2, j * 4 : j * 4 + 3]
        assert np.allclose(tile, sim[q].reshape(2, 3).numpy())
    assert np.isnan(mosaic[2]).all() and np.isnan(mosaic[:, 3]).all()


def test_grid_structure_measures_closeness_and_rows_and_columns():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    r, c = rows.reshape(-1), cols.reshape(-1)
    smooth = torch.exp(-torch.cdist(torch.stack([r, c], 1), torch.stack([r, c], 1)))
    s = grid_structure(smooth, (4, 4))
    assert s["neighbours"] == pytest.approx(math.exp(-1))
    assert s["neighbours_minus_far"] > 0.25 and s["same_row_col_minus_other"] > 0
    lines = ((r[:, None] == r[None]) | (c[:, None] == c[None])).float()  # rows/columns only
    assert grid_structure(lines, (4, 4))["same_row_col_minus_other"] == pytest.approx(1.0)
    flat = grid_structure(torch.full((16, 16), 0.3), (4, 4))
    assert flat["neighbours_minus_far"] == 0 and flat["same_row_col_minus_other"] == 0


def test_every_layer_draws_the_first_and_the_chosen_table():
    model = tiny_vit(depth=3, pos_embed={"kind": "learned_1d", "placement": "every_layer"})
    tables = position_tables(model, 2)
    assert [i for i, _ in tables] == [0, 2]
    assert torch.equal(tables[1][1], model.encoder.pos_embeds[2].weight[0, 1:])
    assert [i for i, _ in position_tables(model, 0)] == [0]
    sim = pos_embed_similarity(tables[1][1])
    assert torch.allclose(sim.diagonal(), torch.ones(16), atol=1e-6)


# --- embedding filters -----------------------------------------------------------------------
def test_filter_pcs_match_sklearn_pca():
    from sklearn.decomposition import PCA

    weight = torch.randn(40, 3, 4, 4) * torch.linspace(0.1, 2, 48).reshape(1, 3, 4, 4)
    pcs, ratio = embedding_filter_pcs(weight, 28)
    ref = PCA(n_components=28).fit(weight.reshape(40, -1).double().numpy())
    assert pcs.shape == (28, 3, 4, 4)
    assert np.allclose(ratio.numpy(), ref.explained_variance_ratio_, atol=1e-5)
    dots = (pcs.reshape(28, -1).double() * torch.from_numpy(ref.components_)).sum(1)
    assert np.allclose(dots.abs().numpy(), 1.0, atol=1e-4)  # the same axes, up to sign
    assert embedding_filter_pcs(weight[:10], 28)[0].shape[0] == 9  # rank D - 1 after centring


# --- images ----------------------------------------------------------------------------------
def test_images_any_mode_become_rgb_at_the_model_size(tmp_path: Path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20, 0] = 255  # left half red, right half blue
    wide[:, 20:, 2] = 255
    Image.fromarray(wide).save(tmp_path / "a.png")
    Image.fromarray(np.full((9, 9), 7, np.uint8), "L").save(tmp_path / "b.jpg")
    Image.new("RGBA", (12, 12), (0, 255, 0, 128)).save(tmp_path / "c.PNG")
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(tmp_path / "d.png")  # 16-bit grey
    (tmp_path / "notes.txt").write_text("not an image")
    images, names = load_images(tmp_path, (8, 8), max_images=4)
    assert names == ["a.png", "b.jpg", "c.PNG", "d.png"]
    assert all(im.shape == (8, 8, 3) and im.dtype == np.uint8 for im in images)
    assert images[0][:, :3, 0].min() > 200 and images[0][:, 5:, 2].min() > 200  # centre crop
    assert images[2][..., 1].min() == 255 and images[3].min() == 255  # scaled to its maximum
    assert load_images(tmp_path, (8, 8), max_images=2)[1] == ["a.png", "b.jpg"]
    crop = center_crop_resize(Image.fromarray(wide), (10, 10))
    assert crop.size == (10, 10)
    samples, sample_names = load_images(None, (16, 24))
    assert sample_names == ["china.jpg", "flower.jpg"] and samples[0].shape == (16, 24, 3)


def test_image_errors_are_data_errors(tmp_path: Path):
    with pytest.raises(DataError, match="is not a directory"):
        load_images(tmp_path / "missing", (8, 8))
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DataError, match="holds no images"):
        load_images(tmp_path, (8, 8))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read .*broken.jpg"):
        load_images(tmp_path, (8, 8))


# --- the command -----------------------------------------------------------------------------
def save_checkpoint(path: Path, model) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"net." + k: v for k, v in model.state_dict().items()}
    model.cfg = replace(model.cfg, mean=MEAN, std=STD)  # the normalisation it was trained with
    meta = model_record(model)
    torch.save({"state_dict": state, "vitexp": meta}, path)
    return path


def colours(path: Path) -> int:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 100
        return len(image.convert("RGB").getcolors(1 << 24))


def check_outputs(out: Path, pos_colours: int = 200) -> dict:
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    for name in ("attention_maps.png", "embedding_filters.png", "attention_distance.png"):
        assert colours(out / name) > 200, name
    assert colours(out / "pos_embed_similarity.png") > pos_colours
    return json.loads((out / "figures.json").read_text())


def run_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitexp.visualize", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
    )


def test_command_writes_the_figures_beside_the_checkpoints(tmp_path: Path):
    ckpt = save_checkpoint(tmp_path / "run/checkpoints/last.ckpt", randomize_(tiny_vit()))
    proc = run_command(f"pretrained={ckpt}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = check_outputs(tmp_path / "run/figures")
    assert report["images"] == ["china.jpg", "flower.jpg"]
    assert report["attention_maps"]["source"] == "class token row of the rollout"
    assert np.array(report["attention_maps"]["maps"]).shape == (2, 4, 4)
    assert np.array(report["attention_distance"]["distance"]).shape == (2, 4)
    assert report["embedding_filters"]["source"] == "patch embedding"
    assert np.array(report["embedding_filters"]["components"]).shape == (28, 3, 8, 8)
    [table] = report["pos_embed_similarity"]["tables"]
    assert np.allclose(np.diag(table["similarity"]), 1.0, atol=1e-4)
    sim = torch.tensor(table["similarity"])
    expected = grid_structure(sim, (4, 4))["neighbours_minus_far"]
    assert table["neighbours_minus_far"] == pytest.approx(expected, abs=1e-4)
    distance = report["attention_distance"]
    per_layer = np.array(distance["distance"]).mean(axis=1)
    assert np.allclose(distance["mean_per_layer"], per_layer, atol=1e-3)
    assert distance["last_minus_first_layer"] == pytest.approx(
        per_layer[-1] - per_layer[0], abs=2e-3
    )


def test_command_error_is_one_line(tmp_path: Path):
    proc = run_command(f"pretrained={tmp_path}/nope.ckpt", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: pretrained={tmp_path}/nope.ckpt does not exist"


def test_checkpoint_and_layer_errors(tmp_path: Path):
    run = lambda **kw: visualize_checkpoint(VisualizeCommandConfig(**kw))  # noqa: E731
    with pytest.raises(ConfigError, match="pretrained is not set"):
        run()
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt.ckpt cannot be loaded"):
        run(pretrained=str(tmp_path / "corrupt.ckpt"))
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="is not a vitexp checkpoint"):
        run(pretrained=str(tmp_path / "other.ckpt"))
    ckpt = save_checkpoint(tmp_path / "m.ckpt", tiny_vit())
    content = torch.load(ckpt)
    del content["state_dict"]["net.head.weight"]
    torch.save(content, tmp_path / "damaged.ckpt")
    with pytest.raises(CheckpointError, match="damaged.ckpt is damaged"):
        run(pretrained=str(tmp_path / "damaged.ckpt"))
    with pytest.raises(ConfigError, match="layer=2 is out of range: the model has 2 layers"):
        run(pretrained=str(ckpt), layer=2)
    with pytest.raises(DataError, match="missing is not a directory; give a folder of images"):
        run(pretrained=str(ckpt), images=str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "kind",
    ["gap", "relative", "none", "every_layer", "overlap"],
)
def test_figures_for_every_model_kind(kind: str, tmp_path: Path):
    models = {
        "gap": dict(pool="gap"),
        "relative": dict(pos_embed="relative"),
        "none": dict(pos_embed="none"),
        "every_layer": dict(
            depth=3, img_size=(24, 40), pos_embed={"kind": "learned_2d", "placement": "every_layer"}
        ),
        "overlap": dict(patch_size=16, patch_stride=8),
    }
    model = randomize_(tiny_vit(**models[kind]))
    ckpt = save_checkpoint(tmp_path / "run/checkpoints/last.ckpt", model)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)).save(
        images / "noise.png"
    )
    config = VisualizeCommandConfig(pretrained=str(ckpt), out=str(tmp_path / "out"), layer=-2)
    if kind == "overlap":
        config.images = str(images)
    visualize_checkpoint(config)
    report = check_outputs(tmp_path / "out", pos_colours=2 if kind == "none" else 200)
    pos = report["pos_embed_similarity"]
    if kind == "gap":
        assert "GAP model: no class token" in report["attention_maps"]["source"]
        assert report["model"]["num_prefix_tokens"] == 0
    elif kind == "relative":  # the offset table of layer -2 = 0: 2N - 1 = 31 offsets
        assert pos["layer"] == 0 and np.array(pos["similarity"]).shape == (31, 31)
    elif kind == "none":
        assert pos["note"] == "the model has no position embedding (pos_embed.kind=none)"
    elif kind == "every_layer":
        assert [t["layer"] for t in pos["tables"]] == [0, 1] and pos["grid"] == [3, 5]
        assert np.array(pos["tables"][1]["similarity"]).shape == (15, 15)
    else:
        assert report["images"] == ["noise.png"]
        assert report["model"]["token_boxes_xyxy"][1] == [8, 0, 24, 16]


@pytest.mark.parametrize(
    "kind, placement",
    [
        ("none", "stem"),
        ("learned_1d", "stem"),
        ("learned_1d", "every_layer"),
        ("learned_1d", "every_layer_shared"),
        ("learned_2d", "stem"),
        ("learned_2d", "every_layer_shared"),
        ("relative", "stem"),
        ("sincos_2d", "stem"),
        ("sincos_2d", "every_layer_shared"),
    ],
)
def test_every_title_fits_inside_its_figure(kind: str, placement: str, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "png_bytes", lambda fig: figures.append(fig) or b"")
    model = tiny_vit(depth=3, pos_embed={"kind": kind, "placement": placement})
    make_figures(model, *load_images(None, model.img_size), MEAN, STD)
    assert len(figures) == 4
    for fig in figures:
        FigureCanvasAgg(fig)
        fig.set_dpi(plots.DPI)  # as png_bytes saves it
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for text in {*fig.texts, *(ax.title for ax in fig.axes)}:  # fig.texts has the suptitle
            box = text.get_window_extent(renderer)
            inside = (box.min >= fig.bbox.min).all() and (box.max <= fig.bbox.max).all()
            assert inside or not text.get_text(), f"{text.get_text()!r}: {box} not in {fig.bbox}"


# --- the callback ----------------------------------------------------------------------------
class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_vit()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4) % 5)
        return torch.utils.data.DataLoader(data, batch_size=2)


def fit(tmp_path: Path, logger) -> Path:
    out = tmp_path / "figures"
    trainer = L.Trainer(
        max_steps=1,
        logger=logger,
        callbacks=[FiguresCallback(out, MEAN, STD)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(TinyModule())
    return out


def test_callback_writes_files_with_a_csv_logger(tmp_path: Path):
    out = fit(tmp_path, L.pytorch.loggers.CSVLogger(tmp_path, name="logs"))
    report = check_outputs(out)
    assert report["step"] == 1 and report["images"] == ["china.jpg", "flower.jpg"]


def test_callback_logs_images_to_tensorboard(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="logs")
    check_outputs(fit(tmp_path, logger))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = {f"figures/{Path(f).stem}" for f in FILES if f.endswith(".png")}
    assert tags <= set(events.Tags()["images"])
    [image] = events.Images("figures/attention_maps")
    assert image.step == 1 and image.width > 200


def test_wandb_gets_each_figure_and_other_ranks_draw_nothing(tmp_path: Path):
    from lightning.pytorch.loggers import WandbLogger

    model = randomize_(tiny_vit())
    images, names = load_images(None, model.img_size)
    pngs, _ = make_figures(model, images, names, MEAN, STD)
    wandb, csv = MagicMock(spec=WandbLogger), MagicMock(spec=L.pytorch.loggers.CSVLogger)
    log_figures([wandb, csv], pngs, step=7)
    assert not csv.method_calls  # CSV: the files only
    keys = [call.kwargs["key"] for call in wandb.log_image.call_args_list]
    assert keys == [f"figures/{Path(name).stem}" for name in pngs]
    assert all(call.kwargs["step"] == 7 for call in wandb.log_image.call_args_list)
    assert wandb.log_image.call_args_list[0].kwargs["images"][0].shape[2] == 3
    callback = FiguresCallback(tmp_path / "figs", MEAN, STD)
    module = SimpleNamespace(net=model)
    callback.on_train_end(SimpleNamespace(is_global_zero=False), module)
    assert not (tmp_path / "figs").exists()
    broken = SimpleNamespace(is_global_zero=True, received_sigterm=False, global_step=0)
    callback.on_train_end(broken, SimpleNamespace())  # no net: a warning, never an exception
    assert not (tmp_path / "figs").exists()
