"""ViT configuration and the registry of named variants.

Sizes follow the paper's Table 1 (Dosovitskiy et al., 2021) plus the Tiny and Small
widths that DeiT introduced and timm ships. A variant is parsed from its name
(big_vision style): ``vit_base_patch16_224`` or ``B/16`` -> one row of ``SIZES``.
The hybrids of the paper's Sec. 3.1 (a ResNet's feature map cut into patches, model/hybrid.py)
are one more table, ``HYBRIDS``: ``vit_base_r50_s16_384`` or ``R50+ViT-B/16@384``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

Pool = Literal["token", "avg"]


@dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes a ViT's shapes and its forward pass.

    Args:
        image_size: input height = width in pixels.
        patch_size: P; the image is cut into (image_size / P)^2 patches.
        embed_dim: D, the token width.
        depth: L, the number of transformer blocks.
        num_heads: attention heads per block.
        mlp_dim: hidden width of each block's MLP.
        num_classes: K, the size of the classification head.
        pool: "token" reads the [class] token (the paper); "avg" averages the patch tokens.
        class_token: whether a learnable [class] token is prepended.
        fc_norm: apply the final LayerNorm after pooling instead of before it
            (timm's MAE-style average pooling); False is the paper's y = LN(z_L^0).
        norm_eps: LayerNorm epsilon (timm uses 1e-6, Hugging Face ViT 1e-12).
        qkv_bias: bias in the query/key/value projection.
        in_chans: input channels.
        name: the variant name this config came from, carried into metadata.
        backbone_layers: None for the plain ViT (linear patch projection of the image); for a
            hybrid, the bottleneck blocks per stage of its ResNetV2 backbone (model/hybrid.py),
            ``()`` for the stem alone. The patches (``patch_size``) are then cut from its feature map.
    """

    image_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    pool: Pool = "token"
    class_token: bool = True
    fc_norm: bool = False
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    in_chans: int = 3
    name: str = "vit"
    backbone_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.backbone_layers is not None:
            layers = tuple(int(n) for n in self.backbone_layers)  # a list from JSON becomes the tuple
            if any(n < 1 for n in layers) or len(layers) > len(BACKBONE_WIDTHS):
                raise ValueError(f"backbone_layers must be up to {len(BACKBONE_WIDTHS)} positive counts, got {layers}")
            object.__setattr__(self, "backbone_layers", layers)
            if self.feature_size % self.patch_size:
                raise ValueError(
                    f"the backbone's {self.feature_size}x{self.feature_size} feature map at {self.image_size}px "
                    f"is not a multiple of patch_size {self.patch_size}"
                )
        elif self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', got {self.pool!r}")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' needs class_token=True")

    @property
    def is_hybrid(self) -> bool:
        return self.backbone_layers is not None

    @property
    def feature_size(self) -> int:
        """Side of the map the patches are cut from: the image, or the hybrid backbone's output."""
        if self.backbone_layers is None:
            return self.image_size
        size = self.image_size
        # SAME padding: every stride-2 layer gives ceil(size / 2) (stem conv, stem pool, stages after the first).
        for _ in range(2 + max(len(self.backbone_layers) - 1, 0)):
            size = -(-size // 2)
        return size

    @property
    def feature_dim(self) -> int:
        """Channels of that map (the image's for the plain ViT)."""
        if self.backbone_layers is None:
            return self.in_chans
        return BACKBONE_WIDTHS[len(self.backbone_layers) - 1] if self.backbone_layers else BACKBONE_STEM_WIDTH

    @property
    def backbone_stride(self) -> int:
        """Pixels per feature-map cell: 4 for the stem, doubled by each stage after the first."""
        if self.backbone_layers is None:
            return 1
        return 4 * 2 ** max(len(self.backbone_layers) - 1, 0)

    @property
    def backbone_name(self) -> str:
        """'ResNetV2-50 (3, 4, 9)' (the depth counts 3 convs per block plus stem and projection), or ''."""
        if self.backbone_layers is None:
            return ""
        if not self.backbone_layers:
            return "ResNetV2 stem"
        return f"ResNetV2-{3 * sum(self.backbone_layers) + 2} {self.backbone_layers}"

    @property
    def grid_size(self) -> int:
        return self.feature_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        """The inverse of ``to_dict`` (JSON turns ``backbone_layers`` into a list; __post_init__ turns it back)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViT config keys: {unknown}")
        return cls(**data)


# width D, depth L, heads, MLP width: paper Table 1 (Base, Large, Huge); Tiny and Small as in DeiT/timm.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
}
_SIZE_LETTERS = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}

# The hybrid backbone (timm's ResNetV2 without pre-activation, BiT's widths): a 64-channel stem,
# then stage s outputs BACKBONE_WIDTHS[s] channels through bottlenecks a quarter as wide.
BACKBONE_STEM_WIDTH = 64
BACKBONE_WIDTHS = (256, 512, 1024, 2048)

# The hybrids as timm names them (vision_transformer_hybrid.py), without the resolution suffix:
# name -> (size, backbone blocks per stage, patch size on the feature map). "s16"/"s32" is the
# total stride; R+Ti's stem (stride 4) with 8x8 patches is in fact stride 32 (a 7x7 grid at 224).
HYBRIDS: dict[str, tuple[str, tuple[int, ...], int]] = {
    "vit_tiny_r_s16_p8": ("tiny", (), 8),
    "vit_small_r26_s32": ("small", (2, 2, 2, 2), 1),
    "vit_base_r26_s32": ("base", (2, 2, 2, 2), 1),
    "vit_base_r50_s16": ("base", (3, 4, 9), 1),  # the paper's R50+ViT-B/16
    "vit_large_r50_s32": ("large", (3, 4, 6, 3), 1),
}
# The paper's notation for them ("R50+ViT-B/16"; the /16 or /32 is the total stride).
_PAPER_HYBRIDS = {
    ("R", "Ti", 16): "vit_tiny_r_s16_p8",
    ("R26", "S", 32): "vit_small_r26_s32",
    ("R26", "B", 32): "vit_base_r26_s32",
    ("R50", "B", 16): "vit_base_r50_s16",
    ("R50", "L", 32): "vit_large_r50_s32",
}

# The variants as they exist in timm (name -> ViT-X/P at resolution), the registry users pick from.
VARIANTS: tuple[str, ...] = (
    "vit_tiny_patch16_224",
    "vit_tiny_patch16_384",
    "vit_small_patch16_224",
    "vit_small_patch16_384",
    "vit_small_patch32_224",
    "vit_small_patch32_384",
    "vit_base_patch16_224",
    "vit_base_patch16_384",
    "vit_base_patch32_224",
    "vit_base_patch32_384",
    "vit_large_patch16_224",
    "vit_large_patch16_384",
    "vit_large_patch32_384",
    "vit_huge_patch14_224",
    "vit_tiny_r_s16_p8_224",
    "vit_tiny_r_s16_p8_384",
    "vit_small_r26_s32_224",
    "vit_small_r26_s32_384",
    "vit_base_r26_s32_224",
    "vit_base_r50_s16_224",
    "vit_base_r50_s16_384",
    "vit_large_r50_s32_224",
    "vit_large_r50_s32_384",
)

_TIMM_NAME = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)$")
_PAPER_NAME = re.compile(r"^(?:ViT-)?(Ti|S|B|L|H)/(\d+)(?:@(\d+))?$")
_HYBRID_NAME = re.compile(r"^(vit_[a-z]+_r\w*?_s\d+(?:_p\d+)?)_(\d+)$")
_PAPER_HYBRID_NAME = re.compile(r"^(R|R26|R50)\+(?:ViT-)?(Ti|S|B|L|H)/(\d+)(?:@(\d+))?$")


def config_from_name(name: str, **overrides) -> ViTConfig:
    """Build the config of a named variant.

    Accepts timm names (``vit_large_patch16_384``, ``vit_base_r50_s16_384``; a ``.tag`` suffix is
    ignored) and the paper's notation (``B/16``, ``ViT-L/16@384``, ``R50+ViT-B/16@384``).
    ``overrides`` replace any field, e.g. ``num_classes=10``.
    """
    base = name.split(".", 1)[0]
    backbone_layers = None
    if (match := _HYBRID_NAME.match(base)) and match.group(1) in HYBRIDS:
        size, backbone_layers, patch = HYBRIDS[match.group(1)]
        res = int(match.group(2))
    elif (match := _PAPER_HYBRID_NAME.match(base)) and (
        key := (match.group(1), match.group(2), int(match.group(3)))
    ) in _PAPER_HYBRIDS:
        hybrid = _PAPER_HYBRIDS[key]
        size, backbone_layers, patch = HYBRIDS[hybrid]
        res = int(match.group(4) or 224)
        base = f"{hybrid}_{res}"
    elif match := _TIMM_NAME.match(base):
        size, patch, res = match.group(1), int(match.group(2)), int(match.group(3))
    elif match := _PAPER_NAME.match(base):
        size = _SIZE_LETTERS[match.group(1)]
        patch, res = int(match.group(2)), int(match.group(3) or 224)
        base = f"vit_{size}_patch{patch}_{res}"
    else:
        raise KeyError(
            f"unknown ViT variant {name!r}; known: {', '.join(VARIANTS)} "
            "(or paper names like 'B/16@384', 'R50+ViT-B/16')"
        )
    width, depth, heads, mlp = SIZES[size]
    fields = dict(
        image_size=res,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
        name=base,
        backbone_layers=backbone_layers,
    )
    fields.update(overrides)
    return ViTConfig(**fields)
