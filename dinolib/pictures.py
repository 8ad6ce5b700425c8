"""Pictures of a ViT: the [CLS] attention maps of its last block and the PCA of its patch features."""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

from dinolib.checkpoints import attention_weights_url, load_pretrained_weights
from dinolib.datasets import IMAGENET_MEAN, IMAGENET_STD
from dinolib.errors import InputError
from vision_transformer import DINOV2_ARCHS, VIT_ARCHS, build_model


def build_attention_backbone(args, device: torch.device) -> nn.Module:
    """The ViT (DINO's or DINOv2's) of --arch/--patch_size in eval mode on device, for attention maps and PCA.

    Weights: --pretrained_weights with --checkpoint_key, or when it is empty the published
    weights the paper's figures use (attention_weights_url: the 300-epoch ViT-S/8 for vit_small/8).
    """
    if args.arch not in VIT_ARCHS and args.arch not in DINOV2_ARCHS:
        raise InputError(f"--arch {args.arch}: attention maps need a ViT ({', '.join(VIT_ARCHS)}, "
                         f"{', '.join(DINOV2_ARCHS)})")
    model = build_model(args.arch, patch_size=args.patch_size)
    url = "" if args.pretrained_weights else attention_weights_url(args.arch, args.patch_size)
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size, url=url,
                            fit_options=True)
    return model.eval().requires_grad_(False).to(device)


def attention_transform(image_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL image to normalised tensor (ImageNet's mean and std by default), first resized by torchvision's
    Resize(image_size) (bilinear) when given.

    image_size: one int (shorter side) or (height, width), as the original attention scripts.
    """
    resize = [transforms.Resize(image_size)] if image_size else []
    return transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def crop_to_patch_multiple(img: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Crop (..., H, W) at the bottom and right so that H and W are multiples of patch_size."""
    h, w = img.shape[-2:]
    return img[..., :h - h % patch_size, :w - w % patch_size]


@torch.no_grad()
def cls_attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[CLS]-to-patch attention of every head of the last block, (B, heads, H // p, W // p), on the patch grid.

    Each head's full [CLS] row (itself, DINOv2's registers and the N patches) sums to 1; the patches
    alone a little less. The registers are left out.
    """
    p = model.patch_embed.patch_size
    attn = model.get_last_selfattention(images)  # (B, heads, T, T), T = prefix tokens + N
    B, nh = attn.shape[:2]
    return attn[:, :, 0, model.num_prefix_tokens:].reshape(B, nh, images.shape[-2] // p, images.shape[-1] // p)


def attention_mass_mask(attentions: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per map (last two dims), the smallest set of patches holding a fraction `threshold` of its attention mass.

    As the original: sort ascending, normalise, keep the patches whose cumulative mass
    exceeds 1 - threshold, i.e. the largest values until they hold `threshold` of the mass.
    """
    flat = attentions.flatten(-2)  # (..., N)
    val, idx = torch.sort(flat, dim=-1)
    val = val / val.sum(dim=-1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=-1) > (1 - threshold)
    mask = torch.zeros_like(keep_sorted).scatter_(-1, idx, keep_sorted)  # back to patch order
    return mask.reshape(attentions.shape)


def upsample_patches(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, h, w) patch-grid maps to (B, C, h * p, w * p) pixels, nearest neighbour (each patch a flat square)."""
    return F.interpolate(maps.float(), scale_factor=patch_size, mode="nearest")


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normed last-layer patch tokens of a ViT, (B, H // p, W // p, D) on the patch grid; [CLS], registers left out."""
    p = model.patch_embed.patch_size
    tokens = model.get_intermediate_layers(images, 1)[0]  # (B, prefix tokens + N, D)
    return tokens[:, model.num_prefix_tokens:].reshape(len(images), images.shape[-2] // p, images.shape[-1] // p, -1)


def border_patches(h: int, w: int) -> torch.Tensor:
    """(h, w) mask of the patches on the border of an h x w grid."""
    border = torch.ones(h, w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    return border


@dataclasses.dataclass
class PatchPCA:
    """The first principal axes of patch features, and the range of the features' scores on them (to map them to RGB).

    Fitted by an SVD of the centred features (torch.linalg.svd: exact, deterministic). The sign of a
    principal component is arbitrary; it is fixed by one stated rule, so that the same features give
    the same colours every run: each component's score of largest magnitude is made positive, except
    that with `border` (a mask of the features on the image border) the first component's mean score
    over the border is made negative. The border is then taken for background, and the foreground has
    the positive first-component scores, as DINOv2's paper thresholds them.
    """
    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (k, D), orthonormal rows, k = min(n_components, number of features, D)
    low: torch.Tensor  # (k,): the lowest score of the fitted features on each component
    high: torch.Tensor  # (k,): the highest
    std: torch.Tensor  # (k,): the scores' standard deviation

    @classmethod
    def fit(cls, features: torch.Tensor, n_components: int = 3, border: torch.Tensor = None) -> "PatchPCA":
        """PCA of (N, D) features; border: an (N,) mask, or None."""
        features = features.float()
        mean = features.mean(dim=0)
        u, s, vh = torch.linalg.svd(features - mean, full_matrices=False)  # (N, r), (r,), (r, D)
        k = min(n_components, len(s))
        scores = u[:, :k] * s[:k]  # (N, k)
        signs = scores.gather(0, scores.abs().argmax(dim=0, keepdim=True))[0].sign()
        if border is not None and border.any() and not border.all():  # a grid of 1 or 2 rows is all border
            signs[0] = -scores[border, 0].mean().sign()
        signs[signs == 0] = 1
        scores = scores * signs
        std = s[:k] / max(len(features) - 1, 1) ** 0.5
        return cls(mean, vh[:k] * signs[:, None], scores.min(dim=0).values, scores.max(dim=0).values, std)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features to their (N, k) scores on the components."""
        return (features.float() - self.mean) @ self.components.T

    def rgb(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 3) colours in [0, 1]: the first 3 scores, each min-max scaled over the fitted features (then clamped).

        A component of constant score, or one that fewer than 3 features lack, is black.
        """
        scaled = ((self.scores(features) - self.low) / (self.high - self.low).clamp_min(1e-12))[:, :3]
        return F.pad(scaled.clamp(0, 1), (0, 3 - scaled.shape[1]))


def pca_pictures(features: torch.Tensor, threshold: float = 0.0) -> tuple:
    """The colours of pca.png and pca_foreground.png on the patch grid, (3, h, w) each, and the foreground mask (h, w).

    features: (h, w, D) patch features of one image. pca.png: the first 3 principal components of all
    its patches. Foreground: the patches whose first-component score, in standard deviations of that
    score, is above threshold (0: the positive scores, DINOv2's rule); pca_foreground.png colours them
    by a second PCA of the foreground patches alone and leaves the background black.
    """
    h, w, dim = features.shape
    flat = features.reshape(h * w, dim).float()
    pca = PatchPCA.fit(flat, border=border_patches(h, w).flatten().to(flat.device))
    foreground = pca.scores(flat)[:, 0] / pca.std[0].clamp_min(1e-12) > threshold
    foreground_rgb = torch.zeros(h * w, 3, device=flat.device)
    if foreground.any():
        foreground_rgb[foreground] = PatchPCA.fit(flat[foreground]).rgb(flat[foreground])
    return (pca.rgb(flat).T.reshape(3, h, w), foreground_rgb.T.reshape(3, h, w), foreground.reshape(h, w))
