"""The paper's hybrid patch embedding (Sec. 3.1): patches cut from a ResNet feature map, not from the image.

    pixels (B, 3, H, W) -> ResNetV2 backbone -> (B, C, H/s, W/s) -> Conv2d(C, D, kernel = stride = P) -> (B, N, D)

The backbone is BiT's ResNetV2 as timm builds it for these models (resnetv2.py with
``preact=False``, vision_transformer_hybrid.py ``_resnetv2``), which is the parity target:
- every convolution is weight-standardised (StdConv2dSame: each output channel's weights
  normalised over in x kh x kw, biased variance, eps 1e-8) with TensorFlow "SAME" padding, which is
  asymmetric when the stride is 2 (the 7x7/2 stem pads (2, 3) at 224 and 384);
- stem: 7x7/2 conv to 64 channels, GroupNorm(32) + ReLU, 3x3/2 max-pool with SAME padding;
- stage s: bottleneck blocks (1x1, 3x3 with the stride, 1x1; width a quarter of 256 * 2^s),
  GroupNorm after each conv, ReLU(residual + shortcut); block 0 has a strided 1x1 conv + GroupNorm
  shortcut; the first stage keeps the stride, every later one halves it. No final norm.
- ``backbone_layers=()`` (the R+Ti models) keeps the stem alone, under timm's names
  ``patch_embed.backbone.{conv,norm}`` instead of ``patch_embed.backbone.stem.{conv,norm}``.

For export, ``fold_weight_standardization`` replaces each StdConv2dSame by a plain padded Conv2d
holding the standardised weights, so no graph recomputes them at every run.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import BACKBONE_STEM_WIDTH, BACKBONE_WIDTHS, ViTConfig

NUM_GROUPS = 32
GROUP_NORM_EPS = 1e-5
WS_EPS = 1e-8  # timm's _resnetv2: partial(StdConv2dSame, eps=1e-8)


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding of one axis: (before, after), the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    pad_h = same_padding(x.shape[-2], kernel_size, stride)
    pad_w = same_padding(x.shape[-1], kernel_size, stride)
    if not any(pad_h + pad_w):
        return x
    return F.pad(x, (*pad_w, *pad_h), value=value)  # F.pad takes the last axis first


class Conv2dSame(nn.Conv2d):
    """Conv2d with SAME padding (no bias): what a StdConv2dSame becomes once its weights are standardised."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), self.weight, None, self.stride)


class StdConv2dSame(Conv2dSame):
    """Weight-standardised Conv2d with SAME padding (timm layers/std_conv.py StdConv2dSame)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, eps: float = WS_EPS) -> None:
        super().__init__(in_chs, out_chs, kernel_size, stride)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        # batch_norm over (1, out, in*kh*kw) normalises each output channel with the biased variance,
        # the same call timm and transformers' BiT make, so the rounding matches theirs too.
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        )
        return weight.reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), self.standardized_weight(), None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5), then ReLU unless ``act=False`` (timm's GroupNormAct)."""

    def __init__(self, num_channels: int, act: bool = True) -> None:
        super().__init__(NUM_GROUPS, num_channels, eps=GROUP_NORM_EPS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x) if self.act else x


class MaxPool2dSame(nn.Module):
    """3x3/2 max-pool with SAME padding (padded with -inf, so a pad never wins)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), kernel_size=3, stride=2)


class Stem(nn.Module):
    """7x7/2 conv to 64 channels, GroupNorm + ReLU, 3x3/2 max-pool: stride 4."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_chans, BACKBONE_STEM_WIDTH, 7, stride=2)
        self.norm = GroupNormAct(BACKBONE_STEM_WIDTH)
        self.pool = MaxPool2dSame()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(self.conv(x)))  # (B, 64, H/4, W/4)


class Downsample(nn.Module):
    """The projection shortcut of a stage's first block: strided 1x1 conv + GroupNorm, no ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_chs, out_chs, 1, stride=stride)
        self.norm = GroupNormAct(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (with the stride) -> 1x1, each followed by GroupNorm; ReLU(residual + shortcut)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, downsample: bool) -> None:
        super().__init__()
        mid_chs = out_chs // 4
        self.downsample = Downsample(in_chs, out_chs, stride) if downsample else None
        self.conv1 = StdConv2dSame(in_chs, mid_chs, 1)
        self.norm1 = GroupNormAct(mid_chs)
        self.conv2 = StdConv2dSame(mid_chs, mid_chs, 3, stride=stride)
        self.norm2 = GroupNormAct(mid_chs)
        self.conv3 = StdConv2dSame(mid_chs, out_chs, 1)
        self.norm3 = GroupNormAct(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(Bottleneck(in_chs if b == 0 else out_chs, out_chs, stride if b == 0 else 1, b == 0) for b in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """Stem and stages, no final norm: (B, 3, H, W) -> (B, C, H/s, W/s)."""

    def __init__(self, layers: tuple[int, ...], in_chans: int) -> None:
        super().__init__()
        self.stem = Stem(in_chans)
        stages = []
        prev = BACKBONE_STEM_WIDTH
        for s, depth in enumerate(layers):
            stages.append(Stage(prev, BACKBONE_WIDTHS[s], depth, stride=1 if s == 0 else 2))
            prev = BACKBONE_WIDTHS[s]
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def build_backbone(config: ViTConfig) -> nn.Module:
    """The ResNetV2 of ``config.backbone_layers``; the bare Stem (timm's names) when there are no stages."""
    assert config.backbone_layers is not None, "build_backbone needs a hybrid config"
    if not config.backbone_layers:
        return Stem(config.in_chans)
    return ResNetV2(config.backbone_layers, config.in_chans)


class HybridEmbed(nn.Module):
    """Backbone feature map -> P x P patches -> D: the hybrid's replacement of PatchEmbed."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.backbone = build_backbone(config)
        self.proj = nn.Conv2d(config.feature_dim, config.embed_dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.backbone(x))  # (B, D, grid, grid)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


@torch.no_grad()
def fold_weight_standardization(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose StdConv2dSame layers are plain Conv2dSame with standardised weights.

    The same outputs (up to float rounding), without the per-run BatchNormalization over every
    weight that an exported StdConv2dSame would carry. ``model`` itself is left unchanged, and is
    returned as it is when it has nothing to fold (a plain ViT).
    """
    if not any(isinstance(m, StdConv2dSame) for m in model.modules()):
        return model
    folded = copy.deepcopy(model)
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, StdConv2dSame):
                conv = Conv2dSame(child.in_channels, child.out_channels, child.kernel_size[0], child.stride[0])
                conv.weight.copy_(child.standardized_weight())
                conv.train(child.training)
                setattr(parent, name, conv)
    return folded
