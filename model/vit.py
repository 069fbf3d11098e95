"""The Vision Transformer exactly as the paper's equations (Dosovitskiy et al., 2021, Eq. 1-4).

    z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}
    z_l  = MLP(LN(z'_l)) + z'_l
    y    = LN(z_L^0)

Parameter names follow timm so that its checkpoints load with few renames.
Attention goes through ``F.scaled_dot_product_attention``: that one call is what the
ONNX exporter turns into a single fused ``Attention`` node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ViTConfig
from model.hybrid import HybridEmbed


class PatchEmbed(nn.Module):
    """Cut into P x P patches and project each to D: a Conv2d with kernel = stride = P is that map."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        # Test oracle only: True computes softmax(QK^T/sqrt(d))V by hand (timm's test_attn2d idea).
        self.explicit = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self.explicit:
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
            x = attn.softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as timm and Hugging Face use
        self.fc2 = nn.Linear(config.mlp_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One pre-LayerNorm transformer block (Eq. 2 and 3)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier: pixels (B, C, H, W), normalised -> logits (B, K)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        D = config.embed_dim
        # The paper's hybrid (Sec. 3.1) cuts the patches from a CNN feature map instead (model/hybrid.py).
        self.patch_embed = HybridEmbed(config) if config.is_hybrid else PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if config.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + config.num_prefix_tokens, D))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        # y = LN(z_L^0) normalises before pooling; MAE-style checkpoints normalise the pooled vector (fc_norm).
        self.norm = nn.Identity() if config.fc_norm else nn.LayerNorm(D, eps=config.norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=config.norm_eps) if config.fc_norm else nn.Identity()
        self.head = nn.Linear(D, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init for training from scratch (truncated normal, as timm's 'jax'-free default)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.reset_head(self.config.num_classes)

    def reset_head(self, num_classes: int) -> None:
        """Drop the head and put a fresh zero-initialised D x K layer (the paper's fine-tuning recipe)."""
        self.config = self.config.replace(num_classes=num_classes)
        self.head = nn.Linear(self.config.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_explicit_attention(self, explicit: bool) -> None:
        """Switch every block to the hand-written softmax attention (test oracle) or back to SDPA."""
        for block in self.blocks:
            block.attn.explicit = explicit

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N+1, D)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, N+prefix, D)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.pool == "token":
            x = x[:, 0]  # (B, D): z_L^0, the [class] token
        else:
            x = x[:, self.config.num_prefix_tokens :].mean(dim=1)  # (B, D)
        return self.fc_norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_vit(config: ViTConfig) -> VisionTransformer:
    return VisionTransformer(config)
