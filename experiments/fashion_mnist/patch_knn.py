"""Weighted k-NN of a frozen ViT two ways: its [CLS] (what eval_knn.py scores) and the mean of its last layer's patch
tokens, a patch-level measure (iBOT's loss trains the patch tokens; the [CLS] k-NN does not see them).

    python experiments/fashion_mnist/patch_knn.py --arch vit_tiny --patch_size 7 \
        --pretrained_weights output/demo/checkpoint.pth --data_path data/fashion_mnist_demo

Bank: data_path/train; queries: data_path/val; eval_knn.py's transform, L2 normalisation and vote
(utils.knn_classifier). Prints one line per feature and k, and a JSON line of all of them.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import utils  # noqa: E402
from vision_transformer import DINOV2_ARCHS, VIT_ARCHS  # noqa: E402


class ClsAndPatchMean(nn.Module):
    """A ViT's [CLS] and the mean of its last layer's normed patch tokens (registers left out), each L2-normalised,
    side by side: (B, 2 * D), one forward pass for both."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit, self.embed_dim = vit, 2 * vit.embed_dim

    def forward(self, x):
        out = self.vit.forward_features(x)
        return torch.cat((F.normalize(out["x_norm_clstoken"], dim=-1),
                          F.normalize(out["x_norm_patchtokens"].mean(dim=1), dim=-1)), dim=-1)


def get_args_parser():
    parser = argparse.ArgumentParser("k-NN of the [CLS] and of the mean patch token", add_help=False)
    utils.add_model_args(parser)
    utils.add_weights_args(parser)
    utils.add_eval_size_args(parser)
    parser.set_defaults(arch="vit_tiny", patch_size=7, resize_size=28, crop_size=28)
    parser.add_argument("--data_path", default="data/fashion_mnist_demo", type=str,
                        help="Folder with train/ (the bank) and val/ (the queries) ImageFolders.")
    parser.add_argument("--nb_knn", default=[20], nargs="+", type=int, help="Numbers of neighbours.")
    parser.add_argument("--temperature", default=0.07, type=float, help="Temperature of the vote.")
    parser.add_argument("--batch_size", default=256, type=int, help="Images per forward pass.")
    parser.add_argument("--num_workers", default=1, type=int, help="Data-loading workers.")
    return parser


FLAG_DOMAINS = {**utils.MODEL_FLAG_DOMAINS, **utils.EVAL_SIZE_FLAG_DOMAINS, "nb_knn": utils.AT_LEAST_ONE,
                "temperature": utils.POSITIVE, "batch_size": utils.AT_LEAST_ONE, "num_workers": utils.NON_NEGATIVE}


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    utils.check_flag_domains(args, FLAG_DOMAINS)
    if args.arch not in VIT_ARCHS and args.arch not in DINOV2_ARCHS:
        raise utils.InputError(f"--arch {args.arch}: patch tokens need a ViT")
    utils.check_patch_fits(args, "crop_size")


def main(args):
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = utils.build_frozen_backbone(args, device)
    transform = utils.eval_transform(args.resize_size, args.crop_size)
    train, val = utils.build_eval_datasets(args.data_path, transform, transform)
    loaders = [utils.feature_loader(d, args.batch_size, args.num_workers, device) for d in (train, val)]
    (bank, bank_labels), (queries, labels) = (utils.extract_features(ClsAndPatchMean(backbone), loader, device,
                                                                     device) for loader in loaders)
    dim = backbone.embed_dim
    results = {}
    for name, half in (("cls", slice(0, dim)), ("patch_mean", slice(dim, 2 * dim))):
        # each half normalised again: extract_features normalised the pair, which halves every cosine similarity
        bank_half, queries_half = F.normalize(bank[:, half], dim=-1), F.normalize(queries[:, half], dim=-1)
        for k, (top1, top5) in utils.knn_classifier(bank_half, bank_labels, queries_half, labels, args.nb_knn,
                                                    args.temperature, len(train.classes)).items():
            print(f"{name} {k}-NN: top-1 {top1:.2f}, top-5 {top5:.2f}")
            results[f"{name}_{k}nn_top1"] = top1
    print(json.dumps(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser("k-NN of the [CLS] and of the mean patch token", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
