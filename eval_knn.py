"""Weighted k-NN classification of frozen DINO features (paper Sec. 3.2, the voting of Wu et al. 2018).

    # the published ViT-S/16 (downloaded once into TORCH_HOME), one GPU or the CPU, no launcher
    python eval_knn.py --arch vit_small --patch_size 16 --data_path /path/to/imagenet
    # our checkpoint on 8 GPUs, keeping the features to sweep k later without the backbone
    torchrun --nproc_per_node=8 eval_knn.py --pretrained_weights /path/to/checkpoint.pth --checkpoint_key teacher \\
        --data_path /path/to/imagenet --dump_features /path/to/features
    python eval_knn.py --load_features /path/to/features --nb_knn 5 10 20 50
    # HIPT's region model on region feature folders, and the mean of the tile features as a baseline
    python eval_knn.py --arch vit4k_xs --pretrained_weights /path/to/checkpoint.pth --data_path /path/to/regions
    python eval_knn.py --arch vit4k_xs --region_pool mean --data_path /path/to/regions

--data_path holds train/ (the memory bank) and val/ (the queries) ImageFolders with the same classes
(for a region arch, folders of region files, one subfolder per class).
The feature of an image is the [CLS] output for ViTs, the pooled feature for convnets, L2-normalised;
each query's k nearest training features (cosine similarity) vote for their class with weight exp(sim / T).
"""
import argparse
import os

import torch

import utils

PATCH_SIZE = 16  # --patch_size of the DINO ViTs when not given (DINOv2 archs: 14)

FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


def get_args_parser():
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN on ImageNet", add_help=False)
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Per-GPU batch-size")
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                        help="Number of NN to use. 20 is usually working the best.")
    parser.add_argument("--temperature", default=0.07, type=float,
                        help="Temperature used in the voting coefficient")
    utils.add_weights_args(parser)
    parser.add_argument("--use_cuda", default=True, type=utils.bool_flag,
                        help="""Should we store the features on GPU? We recommend setting this to False if you
        encounter OOM. Without a GPU the features stay on the CPU.""")
    utils.add_model_args(parser, patch_size=PATCH_SIZE)
    utils.add_region_args(parser, pool=True)
    parser.add_argument("--dump_features", default=None, type=str,
                        help="Path where to save computed features, empty for no saving")
    parser.add_argument("--load_features", default=None, type=str, help="""If the features have already been
        computed, where to find them (the folder --dump_features wrote); no backbone is built then.""")
    utils.add_eval_size_args(parser)
    utils.add_distributed_args(parser)
    parser.add_argument("--data_path", default="/path/to/imagenet/", type=str,
                        help="Folder with train/ and val/ ImageFolders (or train.tar and val.tar, see README).")
    return parser


FLAG_DOMAINS = {
    **utils.MODEL_FLAG_DOMAINS, **utils.EVAL_SIZE_FLAG_DOMAINS, **utils.DISTRIBUTED_FLAG_DOMAINS,
    **utils.REGION_FLAG_DOMAINS,
    "batch_size_per_gpu": utils.AT_LEAST_ONE, "nb_knn": utils.AT_LEAST_ONE, "temperature": utils.POSITIVE,
}


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    args = utils.resolve_patch_size(args, PATCH_SIZE)
    utils.check_flag_domains(args, FLAG_DOMAINS)
    utils.check_region_pool(args)
    if not args.load_features:  # cached features need no backbone
        utils.check_patch_fits(args, "crop_size")


def main(args):
    args = utils.resolve_patch_size(args, PATCH_SIZE)  # the arch's own when not given
    check_args(args)  # before the rendezvous, so that a typo does not wait for every process
    dist_env = utils.init_distributed_mode(args)
    utils.print_main(utils.git_description())
    utils.print_main("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    on_gpu = args.use_cuda and dist_env.device.type == "cuda"
    if args.use_cuda and not on_gpu:
        utils.print_main("--use_cuda: no GPU here, the features stay on the CPU")
    storage = dist_env.device if on_gpu else torch.device("cpu")

    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_features(args.load_features, storage)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    else:
        # ============ preparing data ... ============
        if utils.is_region_arch(args.arch):  # whole grids of tile features
            dataset_train, dataset_val = utils.build_region_eval_datasets(args.data_path, args.region_in_dim)
        else:
            transform = utils.eval_transform(args.resize_size, args.crop_size)
            dataset_train, dataset_val = utils.build_eval_datasets(args.data_path, transform, transform)
        num_classes = len(dataset_train.classes)
        utils.print_main(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs "
                         f"in {num_classes} classes.")

        # ============ building network ... ============
        model = (utils.build_region_backbone(args, dist_env.device) if utils.is_region_arch(args.arch)
                 else utils.build_frozen_backbone(args, dist_env.device))

        # ============ extracting features ... ============
        utils.print_main("Extracting features for train set...")
        train_features, train_labels = utils.extract_features(
            model, utils.feature_loader(dataset_train, args.batch_size_per_gpu, args.num_workers, dist_env.device),
            dist_env.device, storage)
        utils.print_main("Extracting features for val set...")
        test_features, test_labels = utils.extract_features(
            model, utils.feature_loader(dataset_val, args.batch_size_per_gpu, args.num_workers, dist_env.device),
            dist_env.device, storage)
        if args.dump_features and utils.is_main_process():
            dump_features(args.dump_features, train_features, test_features, train_labels, test_labels)

    # ============ k-NN classification ... ============
    results = utils.knn_classifier(train_features, train_labels, test_features, test_labels, args.nb_knn,
                             args.temperature, num_classes, rank=dist_env.rank, world_size=dist_env.world_size)
    for k, (top1, top5) in results.items():
        utils.print_main(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
    utils.shutdown_distributed()


def dump_features(folder: str, train_features, test_features, train_labels, test_labels) -> None:
    """trainfeat.pth, testfeat.pth, trainlabels.pth, testlabels.pth in folder, each written atomically."""
    os.makedirs(folder, exist_ok=True)
    for name, t in zip(FEATURE_FILES, (train_features, test_features, train_labels, test_labels)):
        utils.save_on_master(t.cpu(), os.path.join(folder, name))
    print(f"Features saved in {folder}", flush=True)


def load_features(folder: str, storage: torch.device):
    """The four tensors dump_features wrote, checked for consistent shapes."""
    tensors = []
    for name in FEATURE_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise utils.InputError(f"--load_features {folder}: no {name} (expected {', '.join(FEATURE_FILES)})")
        t = utils.torch_load(path)
        if not torch.is_tensor(t):
            raise utils.InputError(f"{path}: not a tensor but a {type(t).__name__}")
        tensors.append(t.to(storage))
    train_features, test_features, train_labels, test_labels = tensors
    for feats, labels, split in ((train_features, train_labels, "train"), (test_features, test_labels, "test")):
        if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels) or len(feats) == 0:
            raise utils.InputError(f"--load_features {folder}: {split}feat.pth {list(feats.shape)} and "
                                   f"{split}labels.pth {list(labels.shape)} do not match (expected [N, D] and [N])")
    if train_features.shape[1] != test_features.shape[1]:
        raise utils.InputError(f"--load_features {folder}: feature sizes differ: train {train_features.shape[1]}, "
                               f"test {test_features.shape[1]}")
    utils.print_main(f"Features loaded from {folder}: {len(train_features)} train, {len(test_features)} test")
    return train_features.float(), test_features.float(), train_labels.long(), test_labels.long()


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN on ImageNet", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
