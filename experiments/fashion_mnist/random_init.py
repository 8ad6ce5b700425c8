"""Save the randomly initialised backbone of an architecture, the "random weights" baseline of the evaluations.

    python experiments/fashion_mnist/random_init.py --arch vit_tiny --patch_size 7 --output /tmp/vit_tiny7_random.pth
    python eval_knn.py --arch vit_tiny --patch_size 7 --pretrained_weights /tmp/vit_tiny7_random.pth \
        --checkpoint_key none --data_path data/fashion_mnist --resize_size 28 --crop_size 28 --nb_knn 10 20
    python experiments/fashion_mnist/random_init.py --arch vit4k_xs --region_in_dim 192 --output /tmp/vit4k_random.pth

The file holds build_model(arch, patch_size=..., region_in_dim=...).state_dict() after torch.manual_seed(--seed): the
same initialisation main_dino.py starts the student and the teacher from with the same seed and architecture.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import utils  # noqa: E402
from vision_transformer import build_model  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("Random-init backbone weights", add_help=False)
    utils.add_model_args(parser)
    utils.add_region_args(parser)
    parser.add_argument("--seed", default=0, type=int, help="torch.manual_seed before building the model.")
    parser.add_argument("--output", required=True, type=str, help="Where the state dict is written (.pth).")
    return parser


FLAG_DOMAINS = {**utils.MODEL_FLAG_DOMAINS, **utils.REGION_FLAG_DOMAINS, "seed": utils.NON_NEGATIVE}


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    utils.check_flag_domains(args, FLAG_DOMAINS)


def main(args):
    check_args(args)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, patch_size=args.patch_size, region_in_dim=args.region_in_dim)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise utils.InputError(f"--output {args.output}: folder {out_dir} does not exist")
    utils.save_on_master(model.state_dict(), args.output)
    print(f"{args.arch} (patch {args.patch_size}) with random weights (seed {args.seed}) saved to {args.output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Random-init backbone weights", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
