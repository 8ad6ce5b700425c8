"""HIPT's hierarchical pretraining (Chen et al., CVPR 2022): regions cut into tiles, the grids of tile features that a
region model trains on, their dataset and multi-crop, their evaluation, and the two-level attention.

A region of R x R pixels is cut row by row into (R / t)^2 tiles of t x t pixels; a frozen tile encoder embeds each
tile into its [CLS]. A region's file (HIPT's format, read with weights_only) holds these features as one float tensor
[n_tiles, D], tile (r, c) at row r * cols + c; the region model reads it as a [D, rows, cols] grid.
"""
import argparse
import math
import os
import pickle
import sys
import zipfile

import torch
import torch.nn as nn
from torchvision import transforms

from dinolib.checkpoints import HIPT_TILE_WEIGHTS_URL, load_pretrained_weights, published_weights_url
from dinolib.datasets import IMAGENET_MEAN, IMAGENET_STD
from dinolib.errors import InputError
from dinolib.evaluation import check_same_classes
from dinolib.flags import AT_LEAST_ONE, FINITE, POSITIVE
from dinolib.process_group import print_main
from vision_transformer import DINOV2_ARCHS, REGION_ARCHS, REGION_IN_DIM, VIT_ARCHS, RegionMeanPool, build_model

REGION_SUFFIX = ".pt"
REGION_CROPS_SIZE = (14, 6)  # HIPT's global and local crops of its 16 x 16 grids, in cells


# ============ flags ============

def is_region_arch(arch: str) -> bool:
    """True for the archs that run on grids of tile features (vit4k_xs) rather than on images."""
    return arch in REGION_ARCHS


def add_region_args(parser: argparse.ArgumentParser, pool: bool = False) -> None:
    """--region_in_dim and, with pool (the evaluation scripts), --region_pool."""
    parser.add_argument("--region_in_dim", default=REGION_IN_DIM, type=int, help=f"""Region archs
        ({', '.join(REGION_ARCHS)}): features per tile in the region files, the width of the tile encoder that
        wrote them: {REGION_IN_DIM} for HIPT's ViT-S/16 tiles, 768 for a ViT-B, 192 for a ViT-T.""")
    if pool:
        parser.add_argument("--region_pool", default="cls", choices=["cls", "mean"], help="""Region archs: what
            represents a region. cls: the region model's [CLS], with --pretrained_weights. mean: the baseline without
            any region model, the mean of the region's tile features (a bag of tiles: it cannot see their
            arrangement).""")


REGION_FLAG_DOMAINS = {"region_in_dim": AT_LEAST_ONE}


def check_region_pool(args: argparse.Namespace) -> None:
    """One-line errors for --region_pool mean where it has no meaning."""
    if args.region_pool != "mean":
        return
    if not is_region_arch(args.arch):
        raise InputError(f"--region_pool mean: for region feature grids (--arch {' or '.join(REGION_ARCHS)}), "
                         f"not --arch {args.arch}")
    if args.pretrained_weights:
        raise InputError("--region_pool mean scores the tile features without any region model: "
                         "--pretrained_weights would not be read (leave it out)")


def add_normalization_args(parser: argparse.ArgumentParser) -> None:
    """--mean and --std of the images' normalisation (ImageNet's by default; HIPT's tile encoder used 0.5 0.5 0.5)."""
    parser.add_argument("--mean", default=IMAGENET_MEAN, type=float, nargs=3, metavar=("R", "G", "B"),
                        help="""Per-channel mean subtracted from the images (the tiles of a region), on ToTensor's
        0-1 scale: the normalisation the encoder was trained with. ImageNet's by default, as this project trains;
        HIPT's tile encoder was trained with 0.5 0.5 0.5.""")
    parser.add_argument("--std", default=IMAGENET_STD, type=float, nargs=3, metavar=("R", "G", "B"),
                        help="Per-channel standard deviation the images are divided by; HIPT's is 0.5 0.5 0.5.")


NORMALIZATION_FLAG_DOMAINS = {"mean": FINITE, "std": POSITIVE}


def resolve_crop_sizes(args: argparse.Namespace, default: tuple) -> argparse.Namespace:
    """A copy of args whose --global_crops_size and --local_crops_size are those given, else the arch's own: in grid
    cells for a region arch (REGION_CROPS_SIZE, HIPT's 14 and 6), else default (pixels). args is left as parsed."""
    resolved = argparse.Namespace(**vars(args))
    sizes = REGION_CROPS_SIZE if is_region_arch(args.arch) else default
    for name, size in zip(("global_crops_size", "local_crops_size"), sizes):
        if getattr(resolved, name) is None:
            setattr(resolved, name, size)
    return resolved


# ============ regions and tiles ============

def region_names(stem: str, height: int, width: int, region_size: int) -> list:
    """(file stem, top, left) of each whole region of a height x width image, row by row: the stem itself for an image
    of exactly one region, else `<stem>_<row>_<col>` with row and col its place in the image's grid of regions."""
    if (height, width) == (region_size, region_size):
        return [(stem, 0, 0)]
    return [(f"{stem}_{r}_{c}", r * region_size, c * region_size)
            for r in range(height // region_size) for c in range(width // region_size)]


def partial_regions(height: int, width: int, region_size: int) -> int:
    """The regions of a height x width image cut short by its bottom or right edge (skipped: not whole)."""
    whole = (height // region_size) * (width // region_size)
    return math.ceil(height / region_size) * math.ceil(width / region_size) - whole


def tile_image(image: torch.Tensor, tile_size: int) -> torch.Tensor:
    """(C, H, W), H and W multiples of tile_size, to (rows * cols, C, t, t) tiles, row-major: tile (r, c) is
    r * cols + c."""
    channels = image.shape[0]
    tiles = image.unfold(1, tile_size, tile_size).unfold(2, tile_size, tile_size)  # (C, rows, cols, t, t)
    return tiles.permute(1, 2, 0, 3, 4).reshape(-1, channels, tile_size, tile_size)  # (rows * cols, C, t, t)


def tile_features_to_grid(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Row-major tile features (rows * cols, D) to the region model's (D, rows, cols) grid."""
    return features.t().reshape(features.shape[1], rows, cols)  # [d, r, c] = features[r * cols + c, d]


def tile_transform(mean, std):
    """PIL image to a normalised tensor, as tiles are fed to the tile encoder (no resizing: a tile is t x t pixels)."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


@torch.inference_mode()
def embed_tiles(backbone: nn.Module, tiles: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """The backbone's feature ([CLS] for ViTs) of each tile, (n, D) float32 on the CPU, batch_size tiles at a time."""
    return torch.cat([backbone(tiles[i:i + batch_size].to(device, non_blocking=True)).float().cpu()
                      for i in range(0, len(tiles), batch_size)])


# ============ region feature files ============

class BadRegion(ValueError):
    """A region file that cannot serve: not readable, not a tensor, or not a square grid of the expected features."""


class RegionWidthError(BadRegion):
    """A square grid of tile features of another width than --region_in_dim."""


def region_grid(features, in_dim: int, side: int = None) -> torch.Tensor:
    """A region file's features [n_tiles, D] as a (D, s, s) float32 grid; BadRegion saying why not when they are not a
    square grid of in_dim-d features (of s == side cells a side, when side is given)."""
    if not torch.is_tensor(features):
        raise BadRegion(f"holds a {type(features).__name__}, not a tensor [n_tiles, {in_dim}]")
    if features.ndim != 2 or not features.is_floating_point():
        raise BadRegion(f"a {str(features.dtype).removeprefix('torch.')} tensor {list(features.shape)}, not a float "
                        f"tensor [n_tiles, {in_dim}]")
    n, dim = features.shape
    s = math.isqrt(n)
    if n == 0 or s * s != n:
        raise BadRegion(f"[{n}, {dim}]: {n} tiles are not a square grid")
    if dim != in_dim:
        raise RegionWidthError(f"[{n}, {dim}]: {dim} features per tile, --region_in_dim is {in_dim}")
    if side is not None and s != side:
        raise BadRegion(f"[{n}, {dim}]: a {s}x{s} grid, the other regions' are {side}x{side}")
    return tile_features_to_grid(features.float(), s, s)


def list_region_files(root: str) -> tuple:
    """([(path, class index)], classes) of the .pt files of root: in class subfolders (sorted, the classes), or all in
    root itself (one class, '0'). One-line errors for a missing folder, one without region files, or both kinds."""
    if not os.path.isdir(root):
        raise InputError(f"region features {root}: no such folder (give a folder of {REGION_SUFFIX} region files)")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    loose = [e.path for e in entries if e.is_file() and e.name.endswith(REGION_SUFFIX)]
    folders = [e.name for e in entries if e.is_dir()]
    if loose and folders:
        raise InputError(f"region features {root}: {REGION_SUFFIX} files beside subfolders ({folders[0]}/): put every "
                         f"region in a class subfolder, or none")
    if loose:
        return [(path, 0) for path in loose], ["0"]
    samples = []
    for target, name in enumerate(folders):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(os.path.join(root, name), followlinks=True)
                       for f in names if f.endswith(REGION_SUFFIX))
        if not files:
            raise InputError(f"region features {root}: class folder {name}/ holds no {REGION_SUFFIX} file")
        samples += [(path, target) for path in files]
    if not samples:
        raise InputError(f"region features {root}: no {REGION_SUFFIX} files (tools/extract_region_features.py "
                         f"writes them)")
    return samples, folders


class RegionFeatureDataset(torch.utils.data.Dataset):
    """The regions of a folder of HIPT's region files, each as a (D, s, s) grid of tile features, and its class index.

    The first readable file decides the grid side s; a width other than in_dim there, or a grid smaller than
    min_side (the crops), is refused at once with one line. A later file that is unreadable or is not an s x s grid of
    in_dim-d features is reported once (naming it), counted in num_skipped() and replaced by the next region, as
    ImageFolderSkipBad does with images; the set of bad files lives in shared memory, for the DataLoader workers.
    """

    def __init__(self, root: str, in_dim: int, transform=None, min_side: int = 1):
        self.root, self.in_dim, self.transform = root, in_dim, transform
        self.samples, self.classes = list_region_files(root)
        self.targets = [target for _, target in self.samples]
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        self.side = self._first_side(min_side)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            if self.bad[i]:
                continue
            try:
                grid = self.read_region(i, self.side)
            except BadRegion as e:
                self._skip(i, e)
                continue
            return (self.transform(grid) if self.transform else grid), self.targets[i]
        raise InputError(f"no readable region file in {self.root}")

    def read_region(self, i: int, side: int = None) -> torch.Tensor:
        """Region i's (D, s, s) grid; BadRegion when it cannot serve."""
        try:
            features = torch.load(self.samples[i][0], map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BadRegion(f"not readable by torch.load with weights_only ({type(e).__name__}: {message})") from None
        return region_grid(features, self.in_dim, side)

    def num_skipped(self) -> int:
        return int(self.bad.sum())

    def _skip(self, i: int, reason: Exception) -> None:
        self.bad[i] = True
        print(f"WARNING: skipping region file {self.samples[i][0]}: {reason}", file=sys.stderr, flush=True)

    def _first_side(self, min_side: int) -> int:
        """The grid side of the first readable region; a wrong width or too small a grid there is refused."""
        for i, (path, _) in enumerate(self.samples):
            try:
                grid = self.read_region(i)
            except RegionWidthError as e:
                raise InputError(f"{path}: {e} (the width of the tile encoder that wrote it)") from None
            except BadRegion as e:
                self._skip(i, e)
                continue
            side = grid.shape[-1]
            if side < min_side:
                raise InputError(f"{path}: a {side}x{side} grid of tiles, smaller than the {min_side}x{min_side} "
                                 f"crops (--global_crops_size and --local_crops_size count cells)")
            return side
        raise InputError(f"region features {self.root}: no readable region file")


class RegionMultiCrop:
    """HIPT's multi-crop of a (D, s, s) grid: 2 global crops of global_crops_size cells a side and local_crops_number
    local crops of local_crops_size, each cut at a uniformly random place and flipped left-right with p 0.5
    (torchvision's RandomCrop and RandomHorizontalFlip, as HIPT). No resizing, colour or blur: a cell is a feature
    vector, not a pixel, and HIPT's crops are fixed sizes."""

    def __init__(self, global_crops_size: int, local_crops_size: int, local_crops_number: int):
        self.global_transfo = transforms.Compose([transforms.RandomCrop(global_crops_size),
                                                  transforms.RandomHorizontalFlip(p=0.5)])
        self.local_transfo = transforms.Compose([transforms.RandomCrop(local_crops_size),
                                                 transforms.RandomHorizontalFlip(p=0.5)])
        self.local_crops_number = local_crops_number

    def __call__(self, grid: torch.Tensor) -> list:
        crops = [self.global_transfo(grid), self.global_transfo(grid)]
        return crops + [self.local_transfo(grid) for _ in range(self.local_crops_number)]


# ============ evaluation ============

def build_region_eval_datasets(data_path: str, in_dim: int, train_transform=None, need_train: bool = True):
    """(train, val) RegionFeatureDatasets of data_path/train/ and data_path/val/, one subfolder of region files per
    class, with the same classes; with need_train False, (None, val)."""
    if not os.path.isdir(data_path):
        raise InputError(f"--data_path {data_path}: no such folder (it must hold train/ and val/ folders of region "
                         f"files, one subfolder per class)")
    splits = {}
    for split in ("train", "val") if need_train else ("val",):
        root = os.path.join(data_path, split)
        if not os.path.isdir(root):
            raise InputError(f"--data_path {data_path}: no {split}/ folder (it must hold train/ and val/ folders of "
                             f"region files, one subfolder per class)")
        splits[split] = RegionFeatureDataset(root, in_dim, train_transform if split == "train" else None)
    if not need_train:
        return None, splits["val"]
    check_same_classes(data_path, splits["train"].classes, splits["val"].classes)
    return splits["train"], splits["val"]


def build_region_backbone(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The region model of --arch with the evaluated weights (--pretrained_weights and --checkpoint_key; HIPT's
    published ones when empty), or with --region_pool mean the mean of the tile features; frozen, on device."""
    if args.region_pool == "mean":
        model = RegionMeanPool(args.region_in_dim)
        print_main(f"--region_pool mean: a region's feature is the mean of its {args.region_in_dim}-d tile features")
    else:
        model = build_model(args.arch, region_in_dim=args.region_in_dim)
        load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, None)
        print_main(f"Model {args.arch} built, on grids of {args.region_in_dim}-d tile features.")
    return model.eval().requires_grad_(False).to(device)


# ============ two-level attention ============

def build_tile_encoder(arch: str, patch_size: int, weights: str, checkpoint_key: str, device: torch.device):
    """The tile encoder ViT of arch and patch_size with weights (checkpoint_key), in eval mode on device. Empty
    weights: HIPT's ViT-S/16 for vit_small/16 (the tile encoder of its published vit4k_xs), else arch's published."""
    if arch not in VIT_ARCHS and arch not in DINOV2_ARCHS:
        raise InputError(f"--tile_arch {arch}: the two-level attention needs a ViT tile encoder "
                         f"({', '.join(VIT_ARCHS)}, {', '.join(DINOV2_ARCHS)})")
    model = build_model(arch, patch_size=patch_size)
    url = "" if weights else HIPT_TILE_WEIGHTS_URL if (arch, patch_size) == ("vit_small", 16) else \
        published_weights_url(arch, patch_size)
    load_pretrained_weights(model, weights, checkpoint_key, arch, patch_size, url=url, fit_options=True)
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def cell_attention(model: nn.Module, grid: torch.Tensor) -> torch.Tensor:
    """The region model's last-block [CLS] attention to each cell of a (D, rows, cols) grid, (heads, rows, cols)."""
    attn = model.get_last_selfattention(grid[None])  # (1, heads, 1 + rows * cols, 1 + rows * cols)
    return attn[0, :, 0, 1:].reshape(attn.shape[1], grid.shape[1], grid.shape[2])


def hierarchical_attention(region_attention: torch.Tensor, tile_attention: torch.Tensor) -> torch.Tensor:
    """HIPT's two-level heatmap of a region: each tile's own [CLS] attention over its patches, rescaled to sum to the
    region model's attention to that tile. region_attention (rows, cols); tile_attention (rows * cols, h, w), the
    tiles row-major; returns (rows * h, cols * w), the region's patch grid."""
    rows, cols = region_attention.shape
    n, h, w = tile_attention.shape
    within = tile_attention / tile_attention.sum(dim=(1, 2), keepdim=True)  # each tile's map sums to 1
    weighted = within * region_attention.reshape(n, 1, 1)
    return weighted.reshape(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w)  # (rows*h, cols*w)
