"""Vision Transformer backbones and the DINO projection head.

The module is self-contained, ordered bottom-up: drop path, MLP, attention, block,
patch embedding, the ViT itself, the DINO head, then `build_model`, the one
builder every script uses. State-dict keys are those of the original DINO code,
so its published weights load with strict=True and our checkpoints load there.

    >>> from vision_transformer import build_model
    >>> backbone = build_model("vit_small", patch_size=16)
    >>> backbone(torch.randn(2, 3, 224, 224)).shape   # [CLS] feature
    torch.Size([2, 384])
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        if return_attention:
            # The explicit path, only where the attention matrix itself is wanted
            # (attention maps, videos); training and features use the fused kernel.
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
            x = attn @ v
        else:
            attn = None
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x), attn


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        y, attn = self.attn(self.norm1(x), return_attention=return_attention)
        if return_attention:
            return attn
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """ViT as used by DINO: forward returns the normed [CLS] token (num_classes=0)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position embedding for an (h, w) input, resized from the (n, n) training grid.

        Matches the original numerically: bicubic resize with scale factors
        ((h // p + 0.1) / n, (w // p + 0.1) / n). The 0.1 avoids floating point
        error making the output grid one patch short.
        """
        npatch = x.shape[1] - 1
        n_pos = self.pos_embed.shape[1] - 1
        if npatch == n_pos and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, :1]
        dim = x.shape[-1]
        n = int(math.sqrt(n_pos))
        h0 = h // self.patch_size + 0.1
        w0 = w // self.patch_size + 0.1
        grid = self.pos_embed[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2)  # (1, D, n, n)
        grid = F.interpolate(grid, scale_factor=(h0 / n, w0 / n), mode="bicubic")
        if grid.shape[-2:] != (h // self.patch_size, w // self.patch_size):
            raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, "
                               f"expected {(h // self.patch_size, w // self.patch_size)}")
        patch_pos_embed = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + N, D)
        return x + self.interpolate_pos_encoding(x, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0])

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block, (B, heads, 1 + N, 1 + N)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list:
        """Normed token outputs (B, 1 + N, D) of the last n blocks."""
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
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, *, patch_size: int = 16, drop_path_rate: float = 0.0) -> nn.Module:
    """Backbone without classifier for `arch`; its feature size is `model.embed_dim`.

    ViTs (vit_tiny/small/base, deit_* aliases), any torchvision classification model
    (classifier replaced by identity) or an XCiT model from the facebookresearch/xcit
    hub, which is only contacted here, when such a name is asked for.
    """
    if arch in VIT_ARCHS:
        return VIT_ARCHS[arch](patch_size=patch_size, drop_path_rate=drop_path_rate)
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
        import torchvision
        model = torchvision.models.get_model(arch, weights=None)
        model.embed_dim = _drop_classifier(model, arch)
        return model
    raise UnknownArchError(f"unknown --arch {arch!r}; valid: {', '.join(VIT_ARCHS)}, xcit_* (facebookresearch/xcit "
                           f"hub), or a torchvision model: {', '.join(names)}")


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
