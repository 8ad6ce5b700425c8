"""Export Fashion-MNIST (Debian package dataset-fashion-mnist) to train/ and val/ ImageFolders of RGB PNGs.

    python tools/prepare_fashion_mnist.py --output_dir data/fashion_mnist
    python tools/prepare_fashion_mnist.py --output_dir data/fmnist_small --train_per_class 200 --val_per_class 50

train/ holds the 60,000 training images, val/ the 10,000 test images (or the first N
of each class), one folder per class. Images already exported are not written again.
"""
import argparse
import gzip
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import utils  # noqa: E402

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES = ["0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
           "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot"]
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def get_args_parser():
    parser = argparse.ArgumentParser("Fashion-MNIST to ImageFolder", add_help=False)
    parser.add_argument("--source", default=DEFAULT_SOURCE, type=str,
                        help="Folder with the idx .gz files (apt-get install dataset-fashion-mnist).")
    parser.add_argument("--output_dir", default="data/fashion_mnist", type=str, help="Where train/ and val/ go.")
    parser.add_argument("--size", default=28, type=int, help="Side of the written PNGs (bicubic resize from 28).")
    parser.add_argument("--train_per_class", default=0, type=int, help="Images per class in train/ (0: all).")
    parser.add_argument("--val_per_class", default=0, type=int, help="Images per class in val/ (0: all).")
    return parser


FLAG_DOMAINS = {"size": utils.AT_LEAST_ONE, "train_per_class": utils.NON_NEGATIVE,
                "val_per_class": utils.NON_NEGATIVE}


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    utils.check_flag_domains(args, FLAG_DOMAINS)


def read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format): magic, dims, then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def export_split(images: np.ndarray, labels: np.ndarray, out: str, size: int, per_class: int) -> int:
    written = 0
    counts = np.zeros(len(CLASSES), dtype=int)
    for i, (img, label) in enumerate(zip(images, labels)):
        if per_class and counts[label] >= per_class:
            continue
        counts[label] += 1
        path = os.path.join(out, CLASSES[label], f"{i:05d}.png")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pil = Image.fromarray(img).convert("RGB")
        if size != img.shape[0]:
            pil = pil.resize((size, size), Image.BICUBIC)
        pil.save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)
        written += 1
    return written


def main(args):
    check_args(args)
    for split, (images_file, labels_file) in SPLITS.items():
        paths = [os.path.join(args.source, f) for f in (images_file, labels_file)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            sys.exit(f"error: {missing[0]} not found: install Fashion-MNIST with "
                     f"`apt-get install dataset-fashion-mnist` (Debian) or give --source")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        per_class = args.train_per_class if split == "train" else args.val_per_class
        out = os.path.join(args.output_dir, split)
        written = export_split(images, labels, out, args.size, per_class)
        total = sum(len(files) for _, _, files in os.walk(out))
        print(f"{out}: {total} images ({written} written now)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Fashion-MNIST to ImageFolder", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
