"""The multi-crop augmentation batched on the training device (--augmentation gpu).
"""
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2.functional import resized_crop

from dinolib.datasets import IMAGENET_MEAN, IMAGENET_STD


# The batched multi-crop (--augmentation gpu) draws crops from DataAugmentationDINO's distributions, in two halves.
# DataLoader workers decode each image, cut its crops (RandomResizedCrop's box on the full image, bicubic resize)
# and draw every random parameter of the later steps; the training device applies flip, colour jitter, grayscale,
# blur, solarization and normalisation to the whole batch at once. Crop boxes differ in size from image to image,
# so cutting stays in the workers, with torchvision's uint8 tensor resize (antialiased bicubic, at most 1 grey level
# from PIL's, and 1.6x faster); the per-pixel steps, two thirds of the original's per-image time, batch well on a GPU.


def sample_photometric_params(blur_p: torch.Tensor, solarize_p: torch.Tensor) -> dict:
    """Random parameters of DataAugmentationDINO's steps after the crop, for len(blur_p) crops (one row each).

    flip p 0.5; colour jitter p 0.8 with ColorJitter(0.4, 0.4, 0.2, 0.1)'s factors (brightness and contrast
    U(0.6, 1.4), saturation U(0.8, 1.2), hue U(-0.1, 0.1)) applied in a uniformly random order (`order[i, k]` is
    the k-th operation: 0 brightness, 1 contrast, 2 saturation, 3 hue); grayscale p 0.2; Gaussian blur with
    probability blur_p[i] and sigma U(0.1, 2.0) (PIL's radius is the Gaussian's sigma); solarization with
    probability solarize_p[i].
    """
    n = len(blur_p)
    coins, uniforms = torch.rand(n, 5), torch.rand(n, 5)
    low, high = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    return {
        "flip": coins[:, 0] < 0.5,
        "jitter": coins[:, 1] < 0.8,
        "order": torch.rand(n, 4).argsort(dim=1),  # the ranks of 4 i.i.d. uniforms: a uniform permutation
        "jitter_factors": low + (high - low) * uniforms[:, :4],  # (n, 4) in the order of `order`'s codes
        "gray": coins[:, 2] < 0.2,
        "blur": coins[:, 3] < blur_p,
        "sigma": 0.1 + 1.9 * uniforms[:, 4],
        "solarize": coins[:, 4] < solarize_p,
    }


class MultiCropGeometry:
    """Worker half of the batched multi-crop: the crops of DataAugmentationDINO before flip and colour, as uint8.

    Returns (crops, params): crops a list of (3, S, S) uint8 tensors, 2 global then local_crops_number local, each
    a RandomResizedCrop (box drawn by torchvision's get_params on the full image, ratio (3/4, 4/3)) resized with
    torchvision's antialiased bicubic tensor resize; params the random parameters of the remaining steps
    (sample_photometric_params) with the original's per-crop probabilities: blur 1.0 on global crop 1, 0.1 on
    global crop 2, 0.5 on local crops; solarization 0.2 on global crop 2 only.
    """

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number: int,
                 global_crops_size: int = 224, local_crops_size: int = 96):
        self.crops = [(global_crops_size, tuple(global_crops_scale))] * 2
        self.crops += [(local_crops_size, tuple(local_crops_scale))] * local_crops_number
        self.blur_p = torch.tensor([1.0, 0.1] + [0.5] * local_crops_number)
        self.solarize_p = torch.tensor([0.0, 0.2] + [0.0] * local_crops_number)

    def __call__(self, image) -> tuple:
        # (3, H, W) view of PIL's (H, W, 3) pixels: torch's uint8 bicubic resize is fastest on this layout
        image = image if image.mode == "RGB" else image.convert("RGB")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        crops = []
        for size, scale in self.crops:
            i, j, h, w = RandomResizedCrop.get_params(pixels, list(scale), [3 / 4, 4 / 3])
            crops.append(resized_crop(pixels, i, j, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True))
        return crops, sample_photometric_params(self.blur_p, self.solarize_p)


GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize inverts uint8 values >= 128


class MultiCropOnDevice:
    """Device half of the batched multi-crop: MultiCropGeometry's collated uint8 crops in, normalised crops out.

    Every operation follows torchvision's tensor implementation (float images in [0, 1]) with one parameter per
    crop instead of one per call: flip, then colour jitter in each crop's own order, grayscale, Gaussian blur
    (kernel radius 6 = 3 sigma at the largest sigma 2.0, reflect padding), solarization, normalisation. Which crops
    an operation touches is read from the parameters on the host, so nothing here waits for the device.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.gray_weights = torch.tensor(GRAYSCALE_WEIGHTS, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, crops: list, params: dict) -> list:
        """crops: one (B, 3, S, S) uint8 tensor per crop; params: (B, ncrops, ...) tensors. Returns (B, 3, S, S)s."""
        out, start = [], 0
        for end in range(1, len(crops) + 1):  # the crops of one size are augmented as one batch
            if end < len(crops) and crops[end].shape == crops[start].shape:
                continue
            x = torch.cat([c.to(self.device, non_blocking=True) for c in crops[start:end]])  # (n*B, 3, S, S)
            x = x.float().div_(255)
            p = {k: v[:, start:end].transpose(0, 1).flatten(0, 1) for k, v in params.items()}  # crop-major, as x
            out += list(self.augment(x, p).chunk(end - start))
            start = end
        return out

    def augment(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """x: (N, 3, H, W) floats in [0, 1]; p: sample_photometric_params' dict with N rows, on the host."""
        on_device = {k: self._to_device(v) for k, v in p.items()}
        x = torch.where(on_device["flip"].view(-1, 1, 1, 1), x.flip(-1), x)

        # colour jitter: at step k, each operation runs on the crops that have it k-th in their order
        masks = [p["jitter"] & (p["order"][:, k] == op) for k in range(4) for op in range(4)]
        masks += [p["gray"], p["blur"]]
        *jitter_idx, gray_idx, blur_idx = self._indices_to_device(masks)
        operations = (adjust_brightness_batched, self.adjust_contrast, self.adjust_saturation, adjust_hue_batched)
        for (k, op), idx in zip([(k, op) for k in range(4) for op in range(4)], jitter_idx):
            if len(idx):
                factors = on_device["jitter_factors"][idx, op]
                x.index_copy_(0, idx, operations[op](x.index_select(0, idx), factors))

        if len(gray_idx):
            x.index_copy_(0, gray_idx, self.grayscale(x.index_select(0, gray_idx)).expand(-1, 3, -1, -1))
        if len(blur_idx):
            x.index_copy_(0, blur_idx, gaussian_blur_batched(x.index_select(0, blur_idx),
                                                             on_device["sigma"][blur_idx]))
        solarize = on_device["solarize"].view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD)
        x = torch.where(solarize, 1 - x, x)
        return x.sub_(self.mean).div_(self.std)

    def grayscale(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1, H, W) luma."""
        return (x * self.gray_weights).sum(dim=1, keepdim=True)

    def adjust_contrast(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Blend with the mean luma of each image (torchvision's adjust_contrast), one factor per image."""
        mean = self.grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(x, mean, factor)

    def adjust_saturation(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Blend with the image's own luma (torchvision's adjust_saturation), one factor per image."""
        return _blend(x, self.grayscale(x), factor)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and not t.is_pinned():
            t = t.pin_memory()  # page-locked, so the copy below does not make the host wait
        return t.to(self.device, non_blocking=True)

    def _indices_to_device(self, masks: list) -> list:
        """Each host mask's row indices, on the device, with a single copy."""
        idx = [m.nonzero().flatten() for m in masks]
        return list(self._to_device(torch.cat(idx)).split([len(i) for i in idx]))


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (torchvision's _blend), one factor per image."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def adjust_brightness_batched(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black (torchvision's adjust_brightness), one factor per image."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_hue_batched(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Shift the hue of each image by hue[i] turns in HSV space (torchvision's adjust_hue); x: (N, 3, H, W)."""
    r, g, b = x.unbind(dim=1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    gray = chroma == 0  # hue and saturation are 0 where r == g == b; the divisors below avoid 0/0
    saturation = chroma / torch.where(gray, 1.0, value)
    chroma = torch.where(gray, 1.0, chroma)
    rc, gc, bc = (value - r) / chroma, (value - g) / chroma, (value - b) / chroma
    h = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h6 = ((h + hue.view(-1, 1, 1)) % 1.0) * 6.0  # hue in sixths of a turn, in [0, 6)
    # HSV back to RGB: channel n (5 red, 3 green, 1 blue) is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n) % 6.0
        out.append(value - value * saturation * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(out, dim=1)


def gaussian_blur_batched(x: torch.Tensor, sigma: torch.Tensor, radius: int = 6) -> torch.Tensor:
    """Gaussian blur of each image with its own sigma; kernel 2*radius+1 wide, reflect padding, as torchvision's.

    Separable: one depthwise convolution along rows, one along columns.
    """
    n, c, h, w = x.shape
    radius = min(radius, h - 1, w - 1)  # reflect padding needs the image wider than the pad
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, 2*radius+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)  # along rows
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)  # along columns
    return y.view(n, c, h, w)
