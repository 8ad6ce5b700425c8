"""Weighted k-NN classification of frozen DINO features (paper Sec. 3.2, the voting of Wu et al. 2018).

    # the published ViT-S/16 (downloaded once into TORCH_HOME), one GPU or the CPU, no launcher
    python eval_knn.py --arch vit_small --patch_size 16 --data_path /path/to/imagenet
    # our checkpoint on 8 GPUs, keeping the features to sweep k later without the backbone
    torchrun --nproc_per_node=8 eval_knn.py --pretrained_weights /path/to/checkpoint.pth --checkpoint_key teacher \\
        --data_path /path/to/imagenet --dump_features /path/to/features
    python eval_knn.py --load_features /path/to/features --nb_knn 5 10 20 50

--data_path holds train/ (the memory bank) and val/ (the queries) ImageFolders with the same classes.
The feature of an image is the [CLS] output for ViTs, the pooled feature for convnets, L2-normalised;
each query's k nearest training features (cosine similarity) vote for their class with weight exp(sim / T).
"""
import argparse
import os
import time

import torch

import utils

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
    utils.add_model_args(parser)
    parser.add_argument("--dump_features", default=None, type=str,
                        help="Path where to save computed features, empty for no saving")
    parser.add_argument("--load_features", default=None, type=str, help="""If the features have already been
        computed, where to find them (the folder --dump_features wrote); no backbone is built then.""")
    utils.add_eval_size_args(parser)
    utils.add_distributed_args(parser)
    parser.add_argument("--data_path", default="/path/to/imagenet/", type=str,
                        help="Folder with train/ and val/ ImageFolders.")
    return parser


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    if args.batch_size_per_gpu < 1:
        raise utils.InputError(f"--batch_size_per_gpu {args.batch_size_per_gpu}: must be at least 1")
    if min(args.nb_knn) < 1:
        raise utils.InputError(f"--nb_knn {' '.join(map(str, args.nb_knn))}: every k must be at least 1")
    if not args.temperature > 0:
        raise utils.InputError(f"--temperature {args.temperature}: must be positive")


def main(args):
    utils.init_distributed_mode(args)
    check_args(args)
    utils.print_main(utils.git_description())
    utils.print_main("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    on_gpu = args.use_cuda and args.device.type == "cuda"
    if args.use_cuda and not on_gpu:
        utils.print_main("--use_cuda: no GPU here, the features stay on the CPU")
    storage = args.device if on_gpu else torch.device("cpu")

    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_features(args.load_features, storage)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    else:
        # ============ preparing data ... ============
        transform = utils.eval_transform(args.resize_size, args.crop_size)
        dataset_train, dataset_val = utils.build_eval_datasets(args.data_path, transform, transform)
        num_classes = len(dataset_train.classes)
        utils.print_main(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs "
                         f"in {num_classes} classes.")

        # ============ building network ... ============
        model = utils.build_frozen_backbone(args)

        # ============ extracting features ... ============
        utils.print_main("Extracting features for train set...")
        train_features, train_labels = extract_features(model, dataset_train, args, storage)
        utils.print_main("Extracting features for val set...")
        test_features, test_labels = extract_features(model, dataset_val, args, storage)
        if args.dump_features and utils.is_main_process():
            dump_features(args.dump_features, train_features, test_features, train_labels, test_labels)

    # ============ k-NN classification ... ============
    results = knn_classifier(train_features, train_labels, test_features, test_labels, args.nb_knn,
                             args.temperature, num_classes, rank=args.rank, world_size=args.world_size,
                             comm_device=args.device)
    for k, (top1, top5) in results.items():
        utils.print_main(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
    utils.shutdown_distributed()


@torch.inference_mode()
def extract_features(model, dataset, args, storage: torch.device):
    """L2-normalised features (N, D) of the dataset's readable images, in dataset order, and their labels (N,).

    Each process runs the batches ShardedBatchSampler deals it; after every round the batches of
    all processes are gathered with their indices, so every process ends with all features.
    An unreadable image is skipped (ImageFolderSkipBad warns) and left out of features and labels.
    """
    sampler = utils.ShardedBatchSampler(len(dataset), args.batch_size_per_gpu, args.rank, args.world_size)
    data_loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                              pin_memory=args.device.type == "cuda",
                                              multiprocessing_context=utils.worker_start_method(args.num_workers))
    batch_size, dim = args.batch_size_per_gpu, model.embed_dim
    features = torch.zeros(len(dataset), dim, device=storage)
    readable = torch.zeros(len(dataset), dtype=torch.bool, device=storage)
    local_batches, local_indices = iter(data_loader), iter(sampler)
    start = time.time()
    for r in range(sampler.num_rounds):
        # every rank takes part in every gather: a rank without a batch this round sends only padding (index -1)
        feats = torch.zeros(batch_size, dim, device=args.device)
        index = torch.full((batch_size,), -1, dtype=torch.long, device=args.device)
        ok = torch.zeros(batch_size, dtype=torch.bool, device=args.device)
        idx = next(local_indices, None)
        if idx is not None:
            images, _ = next(local_batches)
            feats[:len(idx)] = model(images.to(args.device, non_blocking=True)).float()
            index[:len(idx)] = torch.as_tensor(idx)
            ok[:len(idx)] = ~dataset.bad[idx].to(args.device)  # a skipped image was replaced by another one
        feats, index, ok = utils.all_gather_cat(feats), utils.all_gather_cat(index), utils.all_gather_cat(ok)
        keep = index >= 0
        features[index[keep].to(storage)] = feats[keep].to(storage)
        readable[index[keep].to(storage)] = ok[keep].to(storage)
        if r % 20 == 0 or r == sampler.num_rounds - 1:
            utils.print_main(f"  [{r + 1}/{sampler.num_rounds}] batches of {batch_size} x {args.world_size} "
                             f"processes, {time.time() - start:.1f}s")
    elapsed = time.time() - start
    utils.print_main(f"Extracted {len(dataset)} features in {elapsed:.1f}s "
                     f"({len(dataset) / elapsed:.1f} images/s, {args.world_size} processes)")
    skipped = len(dataset) - int(readable.sum())
    if skipped:
        utils.print_main(f"WARNING: {skipped} unreadable images of {dataset.folder.root} skipped")
        features = features[readable]
    features.div_(features.norm(dim=1, keepdim=True).clamp_min(1e-12))  # L2 normalisation in place
    labels = torch.tensor(dataset.targets, dtype=torch.long, device=storage)[readable]
    return features, labels


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


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, nb_knn, T: float, num_classes: int,
                   test_chunk: int = 0, train_chunk: int = 2**17, rank: int = 0, world_size: int = 1,
                   comm_device: torch.device = None) -> dict:
    """{k: (top1, top5)} in percent for each k in nb_knn, features L2-normalised, labels in [0, num_classes).

    For every query, the k training features of highest cosine similarity vote for their
    labels with weight exp(sim / T); classes are ranked by total vote (ties: lower class index
    first), top-5 counting the first min(5, k) classes as the original does. Similarities are
    computed in blocks of test_chunk queries x train_chunk bank rows, keeping a running top-k,
    so a bank of any size fits in memory; the largest k is searched once and the smaller ks
    are read from its prefix. Several processes split the query chunks and sum their counts.
    """
    n_train = len(train_features)
    too_big = [k for k in nb_knn if k > n_train]
    if too_big:
        utils.print_main(f"WARNING: skipping k = {', '.join(map(str, too_big))}: only {n_train} training images")
    nb_knn = [k for k in nb_knn if k <= n_train]
    if not nb_knn:
        raise utils.InputError(f"--nb_knn: every k is more than the {n_train} training images")
    max_k = max(nb_knn)
    train_chunk = min(train_chunk, n_train)
    test_chunk = test_chunk or max(1, 2**26 // train_chunk)  # at most 64M similarities (256 MB) at a time
    device = test_features.device
    correct = torch.zeros(len(nb_knn), 2, dtype=torch.long, device=device)  # (k, [top1, top5])
    for start in range(rank * test_chunk, len(test_features), test_chunk * world_size):
        queries = test_features[start:start + test_chunk]  # (c, D)
        targets = test_labels[start:start + test_chunk]
        best_sim = torch.empty(len(queries), 0, device=device)
        best_idx = torch.empty(len(queries), 0, dtype=torch.long, device=device)
        for t0 in range(0, n_train, train_chunk):
            sim = queries @ train_features[t0:t0 + train_chunk].T  # (c, train_chunk)
            sim, idx = sim.topk(min(max_k, sim.shape[1]), dim=1)
            best_sim, order = torch.cat((best_sim, sim), dim=1).topk(min(max_k, best_sim.shape[1] + sim.shape[1]),
                                                                     dim=1)
            best_idx = torch.gather(torch.cat((best_idx, idx + t0), dim=1), 1, order)
        neighbour_labels = train_labels[best_idx]  # (c, max_k), by decreasing similarity
        weights = (best_sim / T).exp()
        for j, k in enumerate(nb_knn):
            votes = torch.zeros(len(queries), num_classes, dtype=weights.dtype, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])  # (c, num_classes)
            n_top = min(5, k, num_classes)
            predictions = votes.sort(dim=1, descending=True, stable=True).indices[:, :n_top]
            hits = predictions == targets[:, None]
            correct[j, 0] += hits[:, 0].sum()
            correct[j, 1] += hits.any(dim=1).sum()
    if world_size > 1:  # the collective runs where the process group's backend wants it (NCCL: the GPU)
        correct = utils.all_reduce_sum(correct.to(comm_device or device))
    total = len(test_features)
    return {k: (100.0 * correct[j, 0].item() / total, 100.0 * correct[j, 1].item() / total)
            for j, k in enumerate(nb_knn)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN on ImageNet", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
