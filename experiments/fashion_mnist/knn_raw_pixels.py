"""Weighted k-NN on raw pixels: the baseline that learned features have to beat.

    python experiments/fashion_mnist/knn_raw_pixels.py --data_path data/fashion_mnist --nb_knn 10 20

Each image of data_path/train (the bank) and data_path/val (the queries) is read as greyscale, flattened and
L2-normalised; eval_knn.py's voting (utils.knn_classifier: k nearest by cosine similarity, weights exp(sim / T))
then classifies the queries. The pixels are those of the exported PNGs, with no resizing or normalisation.
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import utils  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("Weighted k-NN on raw pixels", add_help=False)
    parser.add_argument("--data_path", default="data/fashion_mnist", type=str,
                        help="Folder with train/ and val/ ImageFolders with the same classes.")
    parser.add_argument("--nb_knn", default=[10, 20], nargs="+", type=int, help="Number of NN to use.")
    parser.add_argument("--temperature", default=0.07, type=float, help="Temperature used in the voting coefficient")
    return parser


FLAG_DOMAINS = {"nb_knn": utils.AT_LEAST_ONE, "temperature": utils.POSITIVE}


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    utils.check_flag_domains(args, FLAG_DOMAINS)


def load_pixels(dataset) -> tuple:
    """(N, H*W) L2-normalised greyscale pixels and (N,) labels of an ImageFolderSkipBad without transform."""
    rows, labels = [], []
    for path, label in dataset.folder.samples:
        try:
            with Image.open(path) as img:
                rows.append(np.asarray(img.convert("L"), dtype=np.float32).ravel())
        except (OSError, ValueError) as e:
            raise utils.InputError(f"{path}: unreadable image ({e})") from e
        labels.append(label)
    if len({len(r) for r in rows}) != 1:
        raise utils.InputError(f"{dataset.folder.root}: images of different sizes; raw pixels need one size")
    features = torch.from_numpy(np.stack(rows))
    features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return features, torch.tensor(labels, dtype=torch.long)


def main(args):
    check_args(args)
    dataset_train, dataset_val = utils.build_eval_datasets(args.data_path, None, None)
    train_features, train_labels = load_pixels(dataset_train)
    test_features, test_labels = load_pixels(dataset_val)
    print(f"{len(train_features)} train and {len(test_features)} val images of {train_features.shape[1]} pixels")
    results = utils.knn_classifier(train_features, train_labels, test_features, test_labels, args.nb_knn,
                                   args.temperature, len(dataset_train.classes))
    for k, (top1, top5) in results.items():
        print(f"{k}-NN classifier result on raw pixels: Top1: {top1}, Top5: {top5}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Weighted k-NN on raw pixels", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
