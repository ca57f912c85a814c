"""Vision Transformer (Dosovitskiy et al., ICLR 2021, "An Image is Worth 16x16 Words").

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          (eq. 1, position embedding)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                       (eq. 2)
    z_l = MLP(LN(z'_l)) + z'_l                              (eq. 3)
    y = LN(z_L^0)                                           (eq. 4, class token)

with every position-embedding variant of the paper's Table 8 (see `pos_embed.py`), class
token or global average pooling, an optional pre-logits layer and a hybrid CNN stem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitexp.models.common import ModelConfig
from vitexp.models.patch_embed import PatchEmbed, Size2d, to_2tuple
from vitexp.models.pos_embed import ROPE_KINDS, PosEmbedSpec, PositionEmbedding
from vitexp.models.relative_2d import RelativePositionBias2D
from vitexp.models.rope import RotaryAxial, RotaryMixed, apply_rope

POOLS = ("cls", "gap")
SHARED_BY_BLOCKS = ("rope", "shared_rel_pos")  # encoder parameters used by every block
STEMS = ("patch", "r50")


@dataclass
class ViTConfig(ModelConfig):
    """Everything that defines a ViT: the `model` config node (`configs/model/` choices
    come from `vitexp.models.factory.SIZES`), saved with every checkpoint and compared
    when one is loaded. Checked on construction; `ValueError` names the field.

    img_size: input resolution, int or (height, width).
    patch_size / patch_stride: patch side and stride (stride < size: overlapping patches;
        null: the patch size). For the hybrid stem they apply to the CNN feature map.
    embed_dim, depth, num_heads, mlp_ratio: the Transformer's width D, layers L, heads and
        MLP size / D (paper Table 1).
    pool: `cls` (class token, the paper) or `gap` (global average pooling of the patches).
    class_token: prepend a class token; null: pool == cls.
    fc_norm: with gap, normalise after pooling instead of before (timm's GAP models).
    representation_size: width of the tanh pre-logits layer of pretraining; null: none.
    pos_embed: how positions are encoded (Table 8, and RoPE, 2-D relative bias and CPVT's
        conditional encoding after it), see `pos_embed.py`.
    layer_scale_init: LayerScale (CaiT; timm's RoPE ViTs use 1e-5): each block's attention
        and MLP output multiplied by a learned per-channel scale started at this value;
        null: none (the paper).
    stem: `patch` (pixels) or `r50` (hybrid: a ResNet-50 feature map at stride 16).
    grad_checkpointing: recompute each block's activations in the backward pass (training
        only; same results, less memory, ~1/3 more compute). Not architecture: the weights
        are the same with or without it.
    head_bias_init: every logit's bias at construction (the head's weights start at zero).
        With the sigmoid loss over many classes, a negative bias makes the first loss small
        (big_vision: -10 for ImageNet-21k, ln(1/1000) = -6.9 for ImageNet-1k); 0 for
        softmax. An init, not architecture: fine-tuning's new head starts at zero
        (`reset_classifier`), and neither loading nor resuming compares it.
    mean, std: the input normalisation the model expects (the paper's code: [-1, 1]).
    """

    name: str = "vit"  # the size it was made from (vitexp.models.factory.SIZES), for records
    img_size: Any = 224
    patch_size: int = 16
    patch_stride: int | None = None
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pool: str = "cls"
    class_token: bool | None = None
    fc_norm: bool = False
    representation_size: int | None = None
    pos_embed: PosEmbedSpec = field(default_factory=PosEmbedSpec)
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    stem: str = "patch"
    norm_eps: float = 1e-6
    grad_checkpointing: bool = False
    head_bias_init: float = 0.0
    layer_scale_init: float | None = None
    # mean, std: from ModelConfig

    # what must agree between a pretrained checkpoint and the model fine-tuned from it
    # (resolution and head may differ: fine-tuning changes them)
    # fmt: off
    ARCHITECTURE = ("patch_size", "patch_stride", "in_chans", "embed_dim", "depth", "num_heads",
                    "mlp_ratio", "qkv_bias", "pool", "class_token", "fc_norm", "stem",
                    "pos_embed.kind", "pos_embed.placement", "pos_embed.shared",
                    "pos_embed.rope_theta", "layer_scale")
    # fmt: on
    # ... and what a resumed run must also keep
    RESUME = (*ARCHITECTURE, "img_size", "representation_size")

    def __post_init__(self) -> None:
        self.img_size = to_2tuple(self.img_size, "img_size")
        self.pos_embed = PosEmbedSpec.parse(self.pos_embed)
        self.class_token = self.pool == "cls" if self.class_token is None else self.class_token
        _one_of("pool", self.pool, POOLS)
        _one_of("stem", self.stem, STEMS)
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool=cls needs class_token=true (or use pool=gap)")
        if self.fc_norm and self.pool != "gap":
            raise ValueError("fc_norm=true applies to pool=gap only")
        stride = self.patch_stride
        if stride is not None and min(to_2tuple(stride, "patch_stride")) < 1:
            raise ValueError(f"patch_stride={stride} must be >= 1; null means patch_size")
        for key in ("in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be > 0")
        if self.representation_size is not None and self.representation_size <= 0:
            raise ValueError(f"representation_size={self.representation_size} must be > 0")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be in [0.0, 1.0)")
        if not math.isfinite(self.head_bias_init):
            raise ValueError(f"head_bias_init={self.head_bias_init!r} must be a finite number")
        if self.layer_scale_init is not None and not self.layer_scale_init > 0:
            raise ValueError(f"layer_scale_init={self.layer_scale_init!r} must be > 0 or null")
        if self.pos_embed.kind in ROPE_KINDS and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"pos_embed.kind={self.pos_embed.kind} needs a head dimension (embed_dim / "
                f"num_heads = {self.embed_dim // self.num_heads}) divisible by 4"
            )
        if self.pos_embed.kind == "conditional" and self.depth < 2:
            raise ValueError("pos_embed.kind=conditional acts after the first block: depth >= 2")
        self.check_mean_std(self.in_chans)

    @property
    def layer_scale(self) -> bool:
        """Whether blocks have LayerScale (its init value does not matter once trained)."""
        return self.layer_scale_init is not None


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")


class Attention(nn.Module):
    """Multi-head self-attention; fused SDPA unless attention probabilities are requested."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos: nn.Module | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rel_pos = rel_pos

    def forward(
        self,
        x: torch.Tensor,
        return_attention: bool = False,
        num_queries: int | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, D) -> (B, Tq, D): the outputs of the first `num_queries` tokens (all
        by default), each attending to all T tokens. `rope`: the (sin, cos) of the patches'
        rotary angles, which turn their queries and keys; `bias`: a (1, heads, T, T) bias
        shared by the blocks (a shared 2-D relative table)."""
        B, T, D = x.shape
        if num_queries is None:
            qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        else:  # queries for the first tokens only; keys and values for all of them
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :num_queries], w[:D], None if b is None else b[:D])
            q = q.reshape(B, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
            kv = F.linear(x, w[D:], None if b is None else b[D:])
            k, v = kv.reshape(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rotate_patches(q, k.shape[2], rope), rotate_patches(k, k.shape[2], rope)
        if self.rel_pos is not None:
            bias = self.rel_pos(q, self.scale)  # (B or 1, heads, Tq, T)
        elif bias is not None:
            bias = bias[:, :, : q.shape[2]].to(q.dtype)
        drop = self.attn_drop if self.training else 0.0
        if return_attention:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, T, T)
            if bias is not None:
                logits = logits + bias
            attn = logits.softmax(dim=-1)
            x = F.dropout(attn, drop, self.training) @ v
        else:
            attn = None
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        x = x.transpose(1, 2).reshape(B, q.shape[2], D)
        return self.proj_drop(self.proj(x)), attn


def rotate_patches(
    t: torch.Tensor, num_tokens: int, rope: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Rotate the patch tokens of t (B, heads, n, head_dim), the first n of `num_tokens`;
    the prefix (class) tokens before the patches are not on the grid and stay as they are."""
    sin, cos = rope
    prefix = num_tokens - sin.shape[-2]
    if t.shape[2] <= prefix:
        return t
    patches = apply_rope(
        t[:, :, prefix:], sin[..., : t.shape[2] - prefix, :], cos[..., : t.shape[2] - prefix, :]
    )
    return torch.cat([t[:, :, :prefix], patches], dim=2)


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch, started small (CaiT)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Two dense layers with a GELU between them (the Transformer's MLP block)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm Transformer encoder block: eq. 2 and eq. 3.

    With `grad_checkpointing`, a training forward keeps only the block's input and recomputes
    the rest during the backward pass (less activation memory for about one more forward).
    The checkpoint sits inside the block, so that under FSDP (one unit per block) the
    recomputation reuses the weights already gathered for the backward pass.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        rel_pos: nn.Module | None = None,
        norm_eps: float = 1e-6,
        grad_checkpointing: bool = False,
        layer_scale_init: float | None = None,
    ):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, rel_pos)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        scaled = layer_scale_init is not None
        self.ls1 = LayerScale(dim, layer_scale_init) if scaled else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale_init) if scaled else nn.Identity()
        from torchvision.ops import StochasticDepth  # here: importing torchvision takes ~2 s

        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(
        self,
        x: torch.Tensor,
        return_attention: bool = False,
        num_queries: int | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs for the first `num_queries` tokens (all by default)."""
        args = (x, return_attention, num_queries, rope, bias)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # non-reentrant: replays the RNG state, so dropout masks match the first pass
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(
        self,
        x: torch.Tensor,
        return_attention: bool,
        num_queries: int | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attn = self.attn(self.norm1(x), return_attention, num_queries, rope, bias)
        x = x[:, :num_queries] + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, attn


class Encoder(nn.Module):
    """The stack of blocks; position information enters where `pos_embed` says: tables added
    to the tokens (`pos_embeds`), or inside each block's attention (RoPE's rotation of
    queries and keys, `rope`; a relative bias, each block's `attn.rel_pos` or one
    `shared_rel_pos` for all)."""

    def __init__(self, cfg: ViTConfig, grid_size: Size2d, num_prefix_tokens: int):
        super().__init__()
        dim, depth, spec = cfg.embed_dim, cfg.depth, cfg.pos_embed
        head_dim = dim // cfg.num_heads
        self.pos_embeds = PositionEmbedding(spec, grid_size, num_prefix_tokens, dim, depth)
        self.pos_drop = nn.Dropout(cfg.drop_rate)  # the paper: dropout right after adding E_pos
        self.rope = build_rope(cfg, grid_size)
        self.shared_rel_pos = None
        if spec.kind == "relative_2d" and spec.shared:
            self.shared_rel_pos = RelativePositionBias2D(
                grid_size, num_prefix_tokens, cfg.num_heads, spec.init_std
            )

        def block_rel_pos() -> nn.Module | None:
            if spec.kind == "relative_2d" and not spec.shared:
                return RelativePositionBias2D(
                    grid_size, num_prefix_tokens, cfg.num_heads, spec.init_std
                )
            return self.pos_embeds.relative_bias(grid_size, num_prefix_tokens, head_dim)

        # stochastic depth grows linearly with depth, 0 at the first block
        drop_paths = [cfg.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                drop=cfg.drop_rate,
                attn_drop=cfg.attn_drop_rate,
                drop_path=drop_path,
                rel_pos=block_rel_pos(),
                norm_eps=cfg.norm_eps,
                grad_checkpointing=cfg.grad_checkpointing,
                layer_scale_init=cfg.layer_scale_init,
            )
            for drop_path in drop_paths
        )
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if not cfg.fc_norm else nn.Identity()

    def forward(
        self, x: torch.Tensor, return_attention: bool = False, num_queries: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode the tokens; with `num_queries`, the last block computes the outputs of the
        first `num_queries` tokens only (their keys and values still come from every token)."""
        maps = []
        last = len(self.blocks) - 1
        x = self.pos_drop(self.pos_embeds(x, 0))
        bias = self.shared_rel_pos.bias() if self.shared_rel_pos is not None else None
        rope = None
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = self.pos_embeds(x, i)
            if self.rope is not None and (rope is None or isinstance(self.rope, RotaryMixed)):
                rope = self.rope(i, x.device)  # axial: the same angles in every block
            x, attn = block(x, return_attention, num_queries if i == last else None, rope, bias)
            if return_attention:
                maps.append(attn)
        return self.norm(x), maps

    def resize(self, grid_size: Size2d, spec: PosEmbedSpec) -> None:
        """Every position encoding follows a new patch grid."""
        self.pos_embeds.resize(grid_size)
        if self.rope is not None:
            self.rope.resize(grid_size, spec.rope_positions)
        if self.shared_rel_pos is not None:
            self.shared_rel_pos.resize(grid_size, spec.interpolation, spec.antialias)
        for block in self.blocks:
            if block.attn.rel_pos is not None:
                block.attn.rel_pos.resize(grid_size, spec.interpolation, spec.antialias)


def build_rope(cfg: ViTConfig, grid_size: Size2d) -> RotaryAxial | RotaryMixed | None:
    """The rotary embedding of a RoPE kind (None for the others)."""
    spec = cfg.pos_embed
    if spec.kind not in ROPE_KINDS:
        return None
    head_dim = cfg.embed_dim // cfg.num_heads
    if spec.kind.startswith("rope_axial"):
        return RotaryAxial(grid_size, head_dim, spec.theta, positions=spec.rope_positions)
    return RotaryMixed(
        grid_size, head_dim, cfg.depth, cfg.num_heads, spec.theta, positions=spec.rope_positions
    )


class VisionTransformer(nn.Module):
    """ViT classifier: `VisionTransformer(ViTConfig(...), num_classes)`, or the config's
    fields as keywords (`VisionTransformer(depth=6, num_classes=10)`).

    `num_classes` is the head's outputs (0: no head, features only); it is not part of
    `ViTConfig` because the data decides it, and fine-tuning replaces it
    (`reset_classifier`). `self.cfg` always describes the model as it is now.
    """

    def __init__(self, cfg: ViTConfig | None = None, num_classes: int = 1000, **overrides: Any):
        super().__init__()
        if cfg is None:
            cfg = ViTConfig(**overrides)
        elif overrides:
            cfg = replace(cfg, **overrides)
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_prefix_tokens = int(cfg.class_token)
        dim = cfg.embed_dim
        if cfg.stem == "r50":
            from vitexp.models.hybrid import HybridEmbed

            embed = HybridEmbed
        else:
            embed = PatchEmbed
        self.patch_embed = embed(cfg.img_size, cfg.patch_size, cfg.patch_stride, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        self.encoder = Encoder(cfg, self.patch_embed.grid_size, self.num_prefix_tokens)
        self.fc_norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.fc_norm else nn.Identity()
        rep = cfg.representation_size
        self.pre_logits = nn.Sequential(nn.Linear(dim, rep), nn.Tanh()) if rep else nn.Identity()
        self.head = nn.Linear(rep or dim, num_classes) if num_classes else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self._init_weights()

    # --- construction helpers -------------------------------------------------------------
    def _init_weights(self) -> None:
        """The original JAX init: xavier dense layers, lecun patch projection, zero head
        weights, head bias `head_bias_init` (0 unless set)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=1e-6) if ".mlp." in name else nn.init.zeros_(m.bias)
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        nn.init.trunc_normal_(proj.weight, std=(1.0 / fan_in) ** 0.5)
        nn.init.zeros_(proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, self.cfg.head_bias_init)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def grid_size(self) -> Size2d:
        return self.patch_embed.grid_size

    @property
    def img_size(self) -> Size2d:
        return self.patch_embed.img_size

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    # --- forward --------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> token sequence (B, T, D) with the class token first."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded tokens (B, T, D) before pooling."""
        return self.encoder(self.embed(x))[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens, then pre-logits and head. `pre_logits=True` stops before the head
        (the features that few-shot linear evaluation uses)."""
        x = x[:, 0] if self.cfg.pool == "cls" else x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.pre_logits(self.fc_norm(x))
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. With the class token, only its output reaches the head, so the last block
        computes its query, attention output and MLP for the class token alone: the same
        logits as `forward_head(forward_features(x))` for about 1/depth less compute."""
        num_queries = 1 if self.cfg.pool == "cls" else None
        return self.forward_head(self.encoder(self.embed(x), num_queries=num_queries)[0])

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's attention probabilities, a list of (B, heads, T, T)."""
        return self.encoder(self.embed(x), return_attention=True)[1]

    # --- fine-tuning ----------------------------------------------------------------------
    @torch.no_grad()
    def resize(
        self,
        img_size: int | Sequence[int],
        patch_size: int | Sequence[int] | None = None,
        rope_positions: str | None = None,
    ) -> None:
        """Run at a new resolution (and, with `patch_size`, a new patch size: FlexiViT's
        resampling of the patch projection): every position encoding follows the new grid
        (learned tables interpolated, sin-cos recomputed, relative offsets resampled, RoPE
        positions extended or, with `rope_positions=interpolate`, squeezed into the
        training grid's range)."""
        spec = self.cfg.pos_embed
        if patch_size is not None and to_2tuple(patch_size, "patch_size") != to_2tuple(
            self.cfg.patch_size, "patch_size"
        ):
            self.patch_embed.set_patch_size(patch_size, img_size)
            self.cfg = replace(self.cfg, patch_size=patch_size, patch_stride=None)
        if rope_positions is not None:
            self.cfg = replace(self.cfg, pos_embed=replace(spec, rope_positions=rope_positions))
            spec = self.cfg.pos_embed
        self.patch_embed.set_img_size(img_size)
        self.encoder.resize(self.patch_embed.grid_size, spec)
        self.cfg = replace(self.cfg, img_size=self.patch_embed.img_size)

    def reset_classifier(self, num_classes: int, keep_pre_logits: bool = False) -> None:
        """New zero-initialised head for `num_classes` (the paper's fine-tuning head); drops
        the pre-logits layer unless asked to keep it."""
        if not keep_pre_logits:
            self.pre_logits = nn.Identity()
            self.cfg = replace(self.cfg, representation_size=None)
        head_in = self.embed_dim
        if isinstance(self.pre_logits, nn.Sequential):
            head_in = self.pre_logits[0].out_features
        device = next(self.parameters()).device
        self.head = nn.Linear(head_in, num_classes, device=device) if num_classes else nn.Identity()
        if num_classes:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes

    def no_weight_decay(self) -> set[str]:
        """Parameter names that are embeddings (class token, position tables)."""
        return {
            name
            for name, _ in self.named_parameters()
            if name == "cls_token"
            or any(part in name for part in (".pos_embeds.", "rel_pos.", ".rope."))
        }

    def layer_ids(self) -> dict[str, int]:
        """Each parameter's depth for layer-wise lr decay (`optim.layer_decay`), here because
        only the model knows where its parameters sit: 0 the stem (patch or hybrid CNN
        embedding, class token, the stem's position table, the table every layer shares,
        RoPE-Mixed's frequencies and a shared 2-D bias table), i + 1 block i (its own
        relative table, and its own position table under placement=every_layer), depth + 1
        what follows the blocks (final norm, fc_norm, pre-logits, head)."""
        per_layer = self.cfg.pos_embed.placement == "every_layer"
        ids = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if name.startswith("encoder.blocks."):
                ids[name] = int(parts[2]) + 1
            elif name.startswith("encoder.pos_embeds."):
                ids[name] = int(parts[2]) + 1 if per_layer else 0
            elif parts[0] in ("patch_embed", "cls_token") or parts[1] in SHARED_BY_BLOCKS:
                ids[name] = 0
            else:
                ids[name] = self.cfg.depth + 1
        return ids
