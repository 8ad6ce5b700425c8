"""Mosaics of Fashion-MNIST images whose label a bag of tiles cannot see: shoes above shirts, or shirts above shoes.

    python tools/prepare_fashion_mnist.py --output_dir data/fashion_mnist --train_per_class 300 --val_per_class 150
    python experiments/hipt_mosaics/make_mosaics.py --data_path data/fashion_mnist --output_dir data/hipt_mosaics

A mosaic is a region of --grid x --grid tiles (8 x 8: a 224 x 224 PNG of 28-pixel tiles), each tile one image. Its
top half of rows holds images of one group and its bottom half images of the other; the groups are shoes (sandal,
sneaker, ankle boot) and shirts (T-shirt/top, pullover, shirt). Class 0_shoes_above_shirts has the shoes on top,
1_shirts_above_shoes at the bottom. Every mosaic of both classes holds as many shoes as shirts (32 and 32 in 8 x 8),
drawn from the same images in the same way, so a bag of its tiles (the tiles in any order) has one distribution in
both classes: the mean of the tile features scores chance, 50%; only the arrangement tells the classes apart.

train/ mosaics are made of the images of --data_path/train (Fashion-MNIST's training split, as
tools/prepare_fashion_mnist.py exports it), val/ of those of --data_path/val (its test split). Each mosaic draws its
images at random without repeats (--seed), and places them in the order drawn.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import utils  # noqa: E402

# class folders of tools/prepare_fashion_mnist.py
GROUPS = {"shoes": ("5_sandal", "7_sneaker", "9_ankle_boot"), "shirts": ("0_tshirt_top", "2_pullover", "6_shirt")}
CLASSES = ("0_shoes_above_shirts", "1_shirts_above_shoes")


def get_args_parser():
    parser = argparse.ArgumentParser("Fashion-MNIST mosaics", add_help=False)
    parser.add_argument("--data_path", default="data/fashion_mnist", type=str, help="""Fashion-MNIST as
        tools/prepare_fashion_mnist.py exports it: train/ and val/ with one folder per class.""")
    parser.add_argument("--output_dir", default="data/hipt_mosaics", type=str,
                        help="Where train/<class>/ and val/<class>/ mosaics are written.")
    parser.add_argument("--train_per_class", default=300, type=int, help="Mosaics per class in train/.")
    parser.add_argument("--val_per_class", default=150, type=int, help="Mosaics per class in val/.")
    parser.add_argument("--grid", default=8, type=int, help="Tiles per side of a mosaic (even: two halves).")
    parser.add_argument("--seed", default=0, type=int, help="Seed of the draws.")
    return parser


FLAG_DOMAINS = {"train_per_class": utils.AT_LEAST_ONE, "val_per_class": utils.AT_LEAST_ONE,
                "grid": utils.Domain(low=2), "seed": utils.NON_NEGATIVE}


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    utils.check_flag_domains(args, FLAG_DOMAINS)
    if args.grid % 2:
        raise utils.InputError(f"--grid {args.grid}: must be even (the top half of the rows is one group, the bottom "
                               f"half the other)")


def load_groups(root: str) -> dict:
    """{group: (N, h, w, 3) uint8 images} of the group's class folders of an exported split."""
    images = utils.image_dataset(root)
    groups = {}
    for group, folders in GROUPS.items():
        missing = [f for f in folders if f not in images.classes]
        if missing:
            raise utils.InputError(f"{root}: no class folder {missing[0]}/ (tools/prepare_fashion_mnist.py writes the "
                                   f"Fashion-MNIST class folders)")
        wanted = {images.classes.index(f) for f in folders}
        groups[group] = np.stack([np.asarray(images.read_image(i)) for i, t in enumerate(images.targets)
                                  if t in wanted])
    sizes = {a.shape[1:] for a in groups.values()}
    if len(sizes) != 1:
        raise utils.InputError(f"{root}: images of different sizes ({', '.join(map(str, sorted(sizes)))})")
    return groups


def mosaic(top: np.ndarray, bottom: np.ndarray, grid: int) -> np.ndarray:
    """(grid * h, grid * w, 3): the grid * grid / 2 images of top in the top rows, row by row, then those of bottom."""
    tiles = np.concatenate((top, bottom))  # (grid * grid, h, w, 3)
    h, w = tiles.shape[1:3]
    return tiles.reshape(grid, grid, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(grid * h, grid * w, 3)


def write_split(groups: dict, out: str, per_class: int, grid: int, rng: np.random.Generator) -> None:
    """per_class mosaics of each class in out/<class>/, each image drawn once at most in a mosaic."""
    half = grid * grid // 2
    for name in ("shoes", "shirts"):
        if len(groups[name]) < half:
            raise utils.InputError(f"only {len(groups[name])} {name} images for {out}: a mosaic takes {half}")
    for label, (upper, lower) in enumerate((("shoes", "shirts"), ("shirts", "shoes"))):
        os.makedirs(os.path.join(out, CLASSES[label]), exist_ok=True)
        for i in range(per_class):
            top = groups[upper][rng.choice(len(groups[upper]), half, replace=False)]
            bottom = groups[lower][rng.choice(len(groups[lower]), half, replace=False)]
            Image.fromarray(mosaic(top, bottom, grid)).save(os.path.join(out, CLASSES[label], f"{i:05d}.png"))


def main(args):
    check_args(args)
    rng = np.random.default_rng(args.seed)
    for split, per_class in (("train", args.train_per_class), ("val", args.val_per_class)):
        groups = load_groups(os.path.join(args.data_path, split))
        out = os.path.join(args.output_dir, split)
        write_split(groups, out, per_class, args.grid, rng)
        side = args.grid * groups["shoes"].shape[1]
        print(f"{out}: {2 * per_class} mosaics of {side}x{side} pixels ({args.grid}x{args.grid} tiles), from "
              f"{len(groups['shoes'])} shoes and {len(groups['shirts'])} shirts")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Fashion-MNIST mosaics", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
