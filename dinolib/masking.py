"""iBOT's blockwise masks of the student's global crops (DINOv2's data/masking.py and the masks part of its collate).

    generator = mask_generator_for(global_crops_size=224, patch_size=14)  # a 16 x 16 grid, blocks of <= 128
    masks = collate_masks(2 * 64, 256, (0.1, 0.5), 0.5, generator)  # 64 images' 2 global crops, 64 of them masked
    masks["collated_masks"].shape  # (128, 256)

Both draw from Python's `random` in DINOv2's order, with DINOv2's arithmetic (the ratio slices are float32, as
torch.linspace makes them), so under one `random.seed` they give DINOv2's masks.
"""
import math
import random

import numpy as np
import torch


class MaskingGenerator:
    """Blockwise masks of an (H, W) patch grid: rectangles of random area and aspect ratio are added until the
    asked number of patches is masked, or until 10 tries in a row add nothing (then fewer are masked, as in DINOv2).

    Each rectangle covers between min_num_patches and max_num_patches patches (by area drawn, before overlap),
    with aspect ratio in [min_aspect, max_aspect] (max_aspect None: 1 / min_aspect), log-uniformly.
    num_masking_patches, DINOv2's default for max_num_patches, is the count __call__ is not given here.
    """

    def __init__(self, input_size, num_masking_patches: int = None, min_num_patches: int = 4,
                 max_num_patches: float = None, min_aspect: float = 0.3, max_aspect: float = None):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self):
        return (f"MaskingGenerator({self.height}x{self.width}, patches per block {self.min_num_patches} to "
                f"{self.max_num_patches}, log aspect {self.log_aspect_ratio[0]:.3f} to {self.log_aspect_ratio[1]:.3f})")

    def get_shape(self) -> tuple:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float) -> int:
        """Add one rectangle of at most max_mask_patches new patches to mask, in place; return how many it added
        (0 when 10 draws found no rectangle that fits the grid and adds between 1 and max_mask_patches)."""
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())  # patches of the rectangle not masked yet
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        """An (H, W) boolean mask of at most num_masking_patches patches (0: none)."""
        mask = np.zeros(shape=self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


def collate_masks(n_images: int, n_tokens: int, mask_ratio_tuple, mask_probability: float,
                  mask_generator: MaskingGenerator) -> dict:
    """The masks of one batch of n_images global crops, ordered as the student's batch (crop by crop: every
    image's first global crop, then every image's second), under the names of DINOv2's collate_data_and_cast.

    int(n_images * mask_probability) crops are masked, with masked shares spread evenly over mask_ratio_tuple: the
    i-th draws its share uniformly within the i-th of as many equal slices of the range. The rest are unmasked, and
    the list is shuffled. Returns
      collated_masks     (n_images, n_tokens) bool, True where the student sees its mask token;
      mask_indices_list  (M,) indices of the masked patches in collated_masks.flatten();
      masks_weight       (M,) 1 / (masked patches of its crop), per masked patch: each crop weighs the same;
      upperbound         an int at least M whatever the draws (DINOv2 pads the head's batch to it for fixed
                         shapes; here the head runs on the M patches themselves);
      n_masked_patches   (1,) long tensor holding M.
    """
    n_samples_masked = int(n_images * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)  # float32 slice bounds, as DINOv2's
    upperbound = 0
    masks_list = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        masks_list.append(torch.from_numpy(mask_generator(int(n_tokens * random.uniform(prob_min, prob_max)))))
        upperbound += int(n_tokens * prob_max)
    masks_list += [torch.from_numpy(mask_generator(0)) for _ in range(n_samples_masked, n_images)]
    random.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)  # (n_images, n_tokens)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }


def mask_generator_for(global_crops_size: int, patch_size: int) -> MaskingGenerator:
    """The generator of DINOv2's train.py for square global crops: their patch grid, each block at most half of it.

    DINOv2 writes the bound 0.5 * img_size // patch_size * img_size // patch_size, evaluated left to right in
    floats; that is half the tokens whenever the patch size divides the crop.
    """
    grid = global_crops_size // patch_size
    return MaskingGenerator(input_size=(grid, grid),
                            max_num_patches=0.5 * global_crops_size // patch_size * global_crops_size // patch_size)
