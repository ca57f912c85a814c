"""The fast paths compute what the plain ones do (tolerances stated per test).

- class-token-only last block (`VisionTransformer.forward`) vs the full encoder: 1e-5
- fused optimizer kernels vs PyTorch's per-tensor loop: 1e-5 after 3 steps of lr 1e-2
- torch.compile vs eager (CPU inductor): logits 1e-4, gradients 1e-4
- bf16 autocast vs fp32: logits within 5% of the largest logit
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitexp.config import OptimConfig
from vitexp.models import create_model
from vitexp.training.module import build_optimizer

VARIANTS = [
    ("none", "stem"),
    ("learned_1d", "stem"),
    ("learned_1d", "every_layer"),
    ("learned_2d", "every_layer_shared"),
    ("relative", "stem"),
    ("sincos_2d", "stem"),
    ("rope_axial", "stem"),
    ("rope_mixed_ape", "stem"),
    ("relative_2d", "stem"),
    ("conditional", "stem"),
]
# the kinds after the paper run on the GPU path too: compiled, and under bf16 autocast
MODERN = ["rope_mixed", {"kind": "relative_2d", "shared": True}, "conditional"]


def _random_model(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = create_model("vit_tiny_debug", num_classes=7, **kwargs)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial weights everywhere (the head starts at 0)
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("kind,placement", VARIANTS)
def test_class_token_only_last_block_equals_full_encoder(kind, placement):
    model = _random_model(pos_embed={"kind": kind, "placement": placement})
    x = torch.randn(3, 3, 32, 32)
    fast = model(x)
    grads_fast = torch.autograd.grad(fast.square().sum(), list(model.parameters()))
    full = model.forward_head(model.forward_features(x))
    grads_full = torch.autograd.grad(full.square().sum(), list(model.parameters()))
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
    for (name, _), a, b in zip(model.named_parameters(), grads_fast, grads_full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_last_block_computes_only_the_class_token():
    model = _random_model()
    seen = {}
    model.encoder.blocks[-1].mlp.register_forward_hook(
        lambda m, i, o: seen.setdefault("tokens", i[0].shape[1])
    )
    model(torch.randn(2, 3, 32, 32))
    assert seen["tokens"] == 1
    seen.clear()
    gap = _random_model(pool="gap")
    gap.encoder.blocks[-1].mlp.register_forward_hook(
        lambda m, i, o: seen.setdefault("tokens", i[0].shape[1])
    )
    gap(torch.randn(2, 3, 32, 32))
    assert seen["tokens"] == 64  # GAP needs every patch token


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_optimizer_matches_the_per_tensor_loop(name):
    params = {}
    for fused in (True, False):
        model = _random_model()
        groups = [{"params": list(model.parameters()), "weight_decay": 0.05}]
        optimizer = build_optimizer(groups, OptimConfig(name=name, lr=1e-2, fused=fused))
        assert optimizer.defaults["fused"] is fused
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(4, 3, 32, 32, generator=g)
            y = torch.randint(0, 7, (4,), generator=g)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        params[fused] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(params[True], params[False], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pos_embed", ["learned_2d", *MODERN], ids=str)
def test_compiled_model_matches_eager(pos_embed):
    model = _random_model(pos_embed=pos_embed, layer_scale_init=0.5)
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 32, 32)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    comp_out = compiled(x)
    comp_grads = torch.autograd.grad(comp_out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(comp_out, eager_out, atol=1e-4, rtol=1e-4)
    for a, b in zip(comp_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("pos_embed", ["learned_1d", *MODERN], ids=str)
def test_bf16_autocast_stays_close_to_fp32(pos_embed):
    model = _random_model(pos_embed=pos_embed).eval()
    with torch.no_grad():
        model.head.weight.mul_(2)  # logits well above bf16's rounding, for every variant
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        exact = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    scale = exact.abs().max()
    assert scale > 0.05  # real logits, not the zero head's
    assert (low.float() - exact).abs().max() <= 0.05 * scale


@pytest.mark.parametrize(
    "overrides,cuda,expected",
    [
        ([], False, ("32-true", False)),  # the default trainer=auto on a CPU machine
        ([], True, ("bf16-mixed", True)),  # ... and on a GPU machine: the fast path
        (["trainer.accelerator=cpu"], True, ("32-true", False)),
        (["trainer.compile=false"], True, ("bf16-mixed", False)),
        (["trainer=gpu"], True, ("bf16-mixed", True)),
        (["trainer=cpu"], True, ("32-true", False)),
    ],
)
def test_speed_switches_follow_the_device(monkeypatch, overrides, cuda, expected):
    from test_config import compose_cfg
    from vitexp.config import validate
    from vitexp.training.trainer import speed_switches

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert speed_switches(validate(compose_cfg(overrides)).trainer) == expected
