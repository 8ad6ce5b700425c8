"""Vision Transformer backbones (DINO's and DINOv2's) and the DINO projection head.

The module is self-contained, ordered bottom-up: drop path, MLP (and DINOv2's SwiGLU),
layer scale, attention, block, patch embedding, the ViT itself, DINOv2's ViT, HIPT's
region ViT, the DINO head, then `build_model`, the one builder every script uses.
State-dict keys are those of the original DINO code, of DINOv2's published backbones and
of HIPT's vit4k_xs, so the published weights load with strict=True and our checkpoints
load there.

    >>> from vision_transformer import build_model
    >>> backbone = build_model("vit_small", patch_size=16)
    >>> backbone(torch.randn(2, 3, 224, 224)).shape   # [CLS] feature
    torch.Size([2, 384])
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability drop_prob."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample, broadcast over tokens
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """DINOv2's feed-forward layer of ViT-g: w3(silu(x1) * x2), where x1, x2 = w12(x).chunk(2).

    hidden_features is the MLP's 4 * D; the gated hidden size H is 2/3 of it rounded up to a
    multiple of 8, H = (int(4D * 2/3) + 7) // 8 * 8, which keeps the parameter count of the MLP.
    """

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden)
        self.w3 = nn.Linear(hidden, in_features)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # each (B, N, H)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel learnt scale of a residual branch (DINOv2's ls1, ls2), 1e-5 at init as DINOv2's default."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x):
        return x * self.gamma


def _explicit_attention_pays(q: torch.Tensor) -> bool:
    """On a CPU in bf16/fp16 (autocast), torch's fused attention kernel, its backward above all, runs 2 to 5 times
    slower than the explicit product at short sequences (17 and 5 tokens: vit_tiny/7 at 28 and 14 px)."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        if return_attention or _explicit_attention_pays(q):
            # The explicit path where the attention matrix itself is wanted (attention maps, videos), and where
            # it is faster than the fused kernel; elsewhere training and features use the fused kernel.
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
            x = attn @ v
            attn = attn if return_attention else None
        else:
            attn = None
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x), attn


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    ls1 and ls2 are DINOv2's layer scales, starting at `layerscale`; with 0 (DINO) they are identities.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, layerscale: float = 0.0, ffn_layer: type = Mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ffn_layer(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        y, attn = self.attn(self.norm1(x), return_attention=return_attention)
        if return_attention:
            return attn
        x = x + self.drop_path(self.ls1(y))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


def resize_pos_embed(patch_pos_embed: torch.Tensor, h: int, w: int, antialias: bool = False) -> torch.Tensor:
    """The (1, n * n, D) position embedding of an n x n patch grid resized bicubically to h x w, (1, h * w, D), fp32.

    antialias False, the rule of DINO and of DINOv2 without registers: scale factors ((h + 0.1) / n,
    (w + 0.1) / n), without antialiasing. The 0.1 keeps floating-point error from making the grid one
    patch short; torch resamples with the scale factors themselves, so the published numbers need it.
    antialias True, DINOv2's rule for its register models: the size (h, w) itself, antialiased.
    Computed in fp32 whatever the embedding's dtype, as DINOv2 does.
    """
    n_pos, dim = patch_pos_embed.shape[1:]
    n = int(math.sqrt(n_pos))
    grid = patch_pos_embed.float().reshape(1, n, n, dim).permute(0, 3, 1, 2)  # (1, D, n, n)
    if antialias:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    else:
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic")
    if grid.shape[-2:] != (h, w):
        raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, expected {(h, w)}")
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)  # (1, h * w, D)


class VisionTransformer(nn.Module):
    """ViT as used by DINO: forward returns the normed [CLS] token (num_classes=0).

    Token layout: [CLS] first, then `num_prefix_tokens - 1` others (DINOv2's registers, none
    here), then the patches row by row; whatever wants patches skips num_prefix_tokens.
    DINOv2's training options, all off by default (the original's layout): `layerscale`, the
    starting value of a LayerScale in every residual branch (DINOv2: 1e-5); `drop_path_uniform`,
    the same stochastic depth in every block instead of one growing with depth; `mask_token`,
    the learnt embedding iBOT's student sees in place of its masked patches.
    """

    num_prefix_tokens = 1
    interpolate_antialias = False  # DINO's position-embedding rule (see resize_pos_embed)

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, layerscale: float = 0.0,
                 ffn_layer: type = Mlp, drop_path_uniform: bool = False, mask_token: bool = False):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        # stochastic depth grows with depth (DINOv2's drop_path_uniform: the same in every block); on the CPU even
        # where a meta-device model is built (layouts, tests)
        dpr = [drop_path_rate] * depth if drop_path_uniform else \
            torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i], layerscale=layerscale,
                  ffn_layer=ffn_layer) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # registered last: the original's keys keep their order, and the key exists only where iBOT trains it
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position embedding (1, 1 + N, D) for the tokens x ([CLS] and N patches) of an (h, w) input, in x's dtype.

        The training grid's embedding itself for a square input of that grid; otherwise
        resized by resize_pos_embed with this model's rule. [CLS]'s embedding is kept.
        """
        npatch = x.shape[1] - 1
        if npatch == self.pos_embed.shape[1] - 1 and w == h:
            return self.pos_embed
        p = self.patch_size
        patch_pos_embed = resize_pos_embed(self.pos_embed[:, 1:], h // p, w // p, self.interpolate_antialias)
        return torch.cat((self.pos_embed[:, :1].float(), patch_pos_embed), dim=1).to(x.dtype)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor = None) -> torch.Tensor:
        """(B, 3, H, W) images to (B, 1 + N, D) tokens: [CLS] and the patches, position embedding added.

        Sides that are not multiples of the patch size lose their remainder at the bottom and right
        (the strided patch convolution drops it). masks (B, N) bool: those patches' embeddings are
        replaced by the mask token before the position embedding is added (iBOT's student, as DINOv2).
        """
        B, _, h, w = x.shape
        if h < self.patch_size or w < self.patch_size:
            raise ValueError(f"input {h}x{w} is smaller than one {self.patch_size}x{self.patch_size} patch")
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks given to a ViT without a mask token (build it with mask_token=True)")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + N, D)
        return x + self.interpolate_pos_encoding(x, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0])

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor = None) -> dict:
        """The normed tokens under DINOv2's names: x_norm_clstoken (B, D), the [CLS] that forward returns, and
        x_norm_patchtokens (B, N, D), the patches (registers skipped). masks: as prepare_tokens."""
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return {"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, self.num_prefix_tokens:]}

    @torch.no_grad()
    def fit_optional_parts(self, keys) -> None:
        """Add what a state dict with these keys has and this DINO ViT lacks: LayerScale in every block
        (blocks.*.ls1.gamma) and the mask token, so that DINO ViTs trained with those options load strictly.
        The values are those of the state dict once it is loaded."""
        keys = set(keys)
        if "mask_token" in keys and self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim, device=self.cls_token.device))
        for i, blk in enumerate(self.blocks):
            for name in ("ls1", "ls2"):
                if f"blocks.{i}.{name}.gamma" in keys and isinstance(getattr(blk, name), nn.Identity):
                    setattr(blk, name, LayerScale(self.embed_dim).to(self.cls_token.device))

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block over all tokens, (B, heads, T, T), T = num_prefix_tokens + N."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list:
        """Normed outputs of all tokens (B, num_prefix_tokens + N, D) of the last n blocks."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


def _init_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, **kwargs)


VIT_ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base,
             "deit_tiny": vit_tiny, "deit_small": vit_small}


# ============ DINOv2's ViTs ============

DINOV2_PATCH_SIZE = 14
DINOV2_NUM_REGISTERS = 4


class DINOv2VisionTransformer(VisionTransformer):
    """ViT in the layout of DINOv2's published backbones; forward returns the normed [CLS] (DINOv2's x_norm_clstoken).

    What differs from DINO's ViT: 14-pixel patches and a position embedding of a 518-pixel
    (37 x 37) grid, LayerScale in every block, SwiGLU instead of the MLP in ViT-g, a mask token
    and, in the _reg models, register tokens right after [CLS], which get no position embedding.
    get_intermediate_layers and get_last_selfattention cover all tokens, registers included.
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, ffn_layer: type = Mlp,
                 num_register_tokens: int = 0, interpolate_antialias: bool = False, drop_path_rate: float = 0.0,
                 layerscale: float = 1e-5, drop_path_uniform: bool = False, train_mask_token: bool = False):
        super().__init__(img_size=518, patch_size=DINOV2_PATCH_SIZE, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, drop_path_rate=drop_path_rate, layerscale=layerscale,
                         ffn_layer=ffn_layer, drop_path_uniform=drop_path_uniform)
        self.num_prefix_tokens = 1 + num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        # the published layout always has it; it trains only where iBOT masks patches, else it stays frozen
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=train_mask_token)
        nn.init.normal_(self.cls_token, std=1e-6)  # DINOv2's initialisation
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor = None) -> torch.Tensor:
        """(B, 3, H, W) images to (B, 1 + R + N, D) tokens: [CLS], the R registers, the patches.

        The position embedding is added to [CLS] and the patches first (masked patches replaced by the
        mask token before it, as DINO's prepare_tokens does); the registers come after it.
        """
        x = super().prepare_tokens(x, masks)  # (B, 1 + N, D)
        if self.register_tokens is None:
            return x
        registers = self.register_tokens.expand(x.shape[0], -1, -1)  # (B, R, D)
        return torch.cat((x[:, :1], registers, x[:, 1:]), dim=1)


# Sizes (dim/depth/heads) of DINOv2's ViT-S, B, L and g; ViT-g has SwiGLU.
DINOV2_ARCHS = {
    "dinov2_vits14": partial(DINOv2VisionTransformer, embed_dim=384, depth=12, num_heads=6),
    "dinov2_vitb14": partial(DINOv2VisionTransformer, embed_dim=768, depth=12, num_heads=12),
    "dinov2_vitl14": partial(DINOv2VisionTransformer, embed_dim=1024, depth=24, num_heads=16),
    "dinov2_vitg14": partial(DINOv2VisionTransformer, embed_dim=1536, depth=40, num_heads=24, ffn_layer=SwiGLUFFN),
}
# the register models: their position embedding is resized to the grid's size with antialiasing, as DINOv2's hub does
DINOV2_ARCHS.update({f"{name}_reg": partial(build, num_register_tokens=DINOV2_NUM_REGISTERS, interpolate_antialias=True)
                     for name, build in list(DINOV2_ARCHS.items())})


# ============ HIPT's region ViT ============

REGION_IN_DIM = 384  # features per tile in HIPT: the [CLS] of its tile encoder, a ViT-S/16
REGION_GRID = 14  # cells per side of HIPT's position embedding (its img_size 224 // 16)


class RegionVisionTransformer(nn.Module):
    """HIPT's ViT-4K (Chen et al., CVPR 2022): a ViT whose tokens are the cells of a grid of tile features.

    Input (B, in_dim, H, W): cell (r, c) holds the tile encoder's [CLS] of the region's tile in row r,
    column c. The cells are read row by row, each embedded by phi (Linear, GELU, Dropout), [CLS] is
    prepended and the position embedding of a 14 x 14 grid added, resized for other grids by DINO's
    rule (bicubic, scale factors (H + 0.1) / 14 and (W + 0.1) / 14). forward returns the normed [CLS].
    The state-dict keys are those of HIPT's vit4k_xs: its published weights load strictly.
    """

    num_prefix_tokens = 1

    def __init__(self, in_dim: int = REGION_IN_DIM, embed_dim: int = 192, depth: int = 6, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        self.in_dim = in_dim
        self.num_features = self.embed_dim = embed_dim
        # HIPT's dropout rate is 0; the Dropout is kept so that phi is HIPT's module, Linear at index 0
        self.phi = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU(), nn.Dropout(0.0))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, REGION_GRID ** 2 + 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i])
                                    for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()  # no classifier, as HIPT's num_classes=0

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position embedding (1, 1 + h * w, D) for the tokens x of an h x w grid, in x's dtype: the 14 x 14
        grid's own for a square grid of 196 cells, else resized by resize_pos_embed (DINO's rule, HIPT's too)."""
        if x.shape[1] == self.pos_embed.shape[1] and h == w:
            return self.pos_embed
        cells = resize_pos_embed(self.pos_embed[:, 1:], h, w)
        return torch.cat((self.pos_embed[:, :1].float(), cells), dim=1).to(x.dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, H, W) grids to (B, 1 + H * W, D) tokens: [CLS], then cell (r, c) at 1 + r * W + c."""
        B, dim, h, w = x.shape
        if dim != self.in_dim:
            raise ValueError(f"grid of {dim} features per cell; this model takes {self.in_dim} (--region_in_dim)")
        x = self.phi(x.flatten(2).transpose(1, 2))  # (B, H * W, D), row-major
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + H * W, D)
        return x + self.interpolate_pos_encoding(x, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block over all tokens, (B, heads, 1 + H * W, 1 + H * W)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list:
        """Normed outputs of all tokens (B, 1 + H * W, D) of the last n blocks."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


class RegionMeanPool(nn.Module):
    """The bag-of-tiles baseline, no region model: a region's feature is the mean of its tile features."""

    def __init__(self, in_dim: int = REGION_IN_DIM):
        super().__init__()
        self.num_features = self.embed_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, in_dim, H, W) -> (B, in_dim)


def vit4k_xs(in_dim: int = REGION_IN_DIM, **kwargs) -> RegionVisionTransformer:
    """HIPT's vit4k_xs: 192-d tokens, 6 blocks of 6 heads, on grids of in_dim-d tile features."""
    return RegionVisionTransformer(in_dim=in_dim, embed_dim=192, depth=6, num_heads=6, **kwargs)


REGION_ARCHS = {"vit4k_xs": vit4k_xs}


# ============ DINO head ============

class WeightNormLinear(nn.Module):
    """Linear layer without bias, weight = g * v / ||v|| row-wise (Salimans & Kingma).

    Written out rather than through torch.nn.utils.weight_norm (deprecated) or
    parametrizations (other state-dict keys), so the keys stay `weight_g` [out, 1] and
    `weight_v` [out, in] as in the original checkpoints. Checkpoints written with the
    parametrization keys (`parametrizations.weight.original0/1`) load too.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's own initialisation
        # g before v, as torch's weight_norm registers them: optimizer state is stored by parameter position, so
        # the original's checkpoints (norm_last_layer false: g is trained) resume only in this order
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(v)
        self._register_load_state_dict_pre_hook(_rename_parametrized_weight_norm)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x):
        return F.linear(x, self.weight)


def _rename_parametrized_weight_norm(state_dict, prefix, *args):
    for new, old in (("weight_g", "parametrizations.weight.original0"),
                     ("weight_v", "parametrizations.weight.original1")):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class DINOHead(nn.Module):
    """MLP projection, L2 normalisation, weight-normalised prototype layer (paper Sec. 3.1)."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # A fixed norm of 1 stabilises training with large out_dim (paper Appendix).
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


# ============ one builder for every script ============

class UnknownArchError(ValueError):
    """--arch names no model this module can build."""


def torchvision_arch_names() -> list:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, *, patch_size: int = None, drop_path_rate: float = 0.0, layerscale: float = 0.0,
                drop_path_uniform: bool = False, mask_token: bool = False,
                region_in_dim: int = REGION_IN_DIM) -> nn.Module:
    """Backbone without classifier for `arch`; its feature size is `model.embed_dim`.

    ViTs (vit_tiny/small/base, deit_* aliases; patch_size None: 16), DINOv2's ViTs
    (dinov2_vits14, _vitb14, _vitl14, _vitg14 and each with _reg; their patch size is 14),
    HIPT's region ViT vit4k_xs (on grids of region_in_dim-d tile features; no patches),
    any torchvision classification model (classifier replaced by identity) or an XCiT model
    from the facebookresearch/xcit hub, which is only contacted here, when such a name is asked for.
    The ViTs take DINOv2's training options (see VisionTransformer): layerscale (0: none; DINOv2's
    archs always have it, from 1e-5 unless given), drop_path_uniform, and mask_token (a DINO ViT
    gets one; a DINOv2 arch, which always has one, trains it).
    """
    if arch in REGION_ARCHS:  # its tokens are grid cells: patch_size does not apply
        return REGION_ARCHS[arch](in_dim=region_in_dim, drop_path_rate=drop_path_rate)
    if arch in VIT_ARCHS:
        return VIT_ARCHS[arch](patch_size=patch_size or 16, drop_path_rate=drop_path_rate, layerscale=layerscale,
                               drop_path_uniform=drop_path_uniform, mask_token=mask_token)
    if arch in DINOV2_ARCHS:
        if patch_size not in (None, DINOV2_PATCH_SIZE):
            raise UnknownArchError(f"--patch_size {patch_size}: {arch} has {DINOV2_PATCH_SIZE}x{DINOV2_PATCH_SIZE} "
                                   f"patches (give --patch_size {DINOV2_PATCH_SIZE})")
        return DINOV2_ARCHS[arch](drop_path_rate=drop_path_rate, layerscale=layerscale or 1e-5,
                                  drop_path_uniform=drop_path_uniform, train_mask_token=mask_token)
    if arch.startswith("xcit"):
        try:
            model = torch.hub.load("facebookresearch/xcit:main", arch, num_classes=0,
                                   drop_path_rate=drop_path_rate)
        except (OSError, RuntimeError, ImportError) as e:  # offline, unknown entrypoint, timm missing
            raise UnknownArchError(f"--arch {arch}: could not load it from the facebookresearch/xcit torch.hub "
                                   f"repository ({type(e).__name__}: {e})") from None
        return model  # XCiT models carry embed_dim themselves
    names = torchvision_arch_names()
    if arch in names:
        model = torchvision.models.get_model(arch, weights=None)
        model.embed_dim = _drop_classifier(model, arch)
        return model
    raise UnknownArchError(f"unknown --arch {arch!r}; valid: {', '.join(VIT_ARCHS)}, {', '.join(DINOV2_ARCHS)}, "
                           f"{', '.join(REGION_ARCHS)} (on region feature grids), xcit_* (facebookresearch/xcit hub), "
                           f"or a torchvision model: {', '.join(names)}")


def _drop_classifier(model: nn.Module, arch: str) -> int:
    """Replace the last Linear of the classifier (fc/classifier/head/heads) by identity; return its input size."""
    for attr in ("fc", "classifier", "head", "heads"):
        module = getattr(model, attr, None)
        if module is None:
            continue
        if isinstance(module, nn.Linear):
            setattr(model, attr, nn.Identity())
            return module.in_features
        linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            name, last = linears[-1]
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], nn.Identity())
            return last.in_features
    raise UnknownArchError(f"--arch {arch}: no linear classifier (fc, classifier, head, heads) found to remove")
