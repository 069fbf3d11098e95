"""ViT configuration and the registry of named variants.

Sizes follow the paper's Table 1 (Dosovitskiy et al., 2021) plus the Tiny and Small
widths that DeiT introduced and timm ships. A variant is parsed from its name
(big_vision style): ``vit_base_patch16_224`` or ``B/16`` -> one row of ``SIZES``.
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

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', got {self.pool!r}")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' needs class_token=True")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

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
)

_TIMM_NAME = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)$")
_PAPER_NAME = re.compile(r"^(?:ViT-)?(Ti|S|B|L|H)/(\d+)(?:@(\d+))?$")


def config_from_name(name: str, **overrides) -> ViTConfig:
    """Build the config of a named variant.

    Accepts timm names (``vit_large_patch16_384``; a ``.tag`` suffix is ignored) and the
    paper's notation (``B/16``, ``ViT-L/16@384``). ``overrides`` replace any field,
    e.g. ``num_classes=10``.
    """
    base = name.split(".", 1)[0]
    if match := _TIMM_NAME.match(base):
        size, patch, res = match.group(1), int(match.group(2)), int(match.group(3))
    elif match := _PAPER_NAME.match(base):
        size = _SIZE_LETTERS[match.group(1)]
        patch, res = int(match.group(2)), int(match.group(3) or 224)
        base = f"vit_{size}_patch{patch}_{res}"
    else:
        raise KeyError(f"unknown ViT variant {name!r}; known: {', '.join(VARIANTS)} (or paper names like 'B/16@384')")
    width, depth, heads, mlp = SIZES[size]
    fields = dict(
        image_size=res, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, mlp_dim=mlp, name=base
    )
    fields.update(overrides)
    return ViTConfig(**fields)
