"""Evaluation of frozen features: the evaluation transform and datasets, the frozen backbone, feature extraction
over processes, and the weighted k-NN classifier."""
import math
import os
import time

import torch
import torch.nn as nn
from torchvision import transforms

from dinolib.checkpoints import load_pretrained_weights
from dinolib.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageFolderSkipBad, image_dataset, worker_start_method
from dinolib.errors import InputError
from dinolib.process_group import all_gather_cat, all_reduce_sum, get_rank, get_world_size, print_main
from dinolib.tar_index import TAR_SUFFIXES
from vision_transformer import build_model


def eval_transform(resize_size: int = 256, crop_size: int = 224):
    """The paper's evaluation transform: Resize(resize_size, bicubic), CenterCrop(crop_size), ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _eval_image_folder(root: str, transform) -> ImageFolderSkipBad:
    try:
        return image_dataset(root, transform=transform)
    except FileNotFoundError as e:  # torchvision: a class folder without any image
        raise InputError(f"data folder {root}: {e}") from None


def build_eval_datasets(data_path: str, train_transform, val_transform, need_train: bool = True):
    """(train, val) datasets of data_path/train/ and data_path/val/ with the same classes: ImageFolderSkipBad, or
    TarImageDataset where a split is a tar, train.tar and val.tar (indexed by tools/infer_entries.py).

    One-line errors for a missing folder and for val/ classes that differ from train/'s;
    with need_train False, train/ may be missing and (None, val) is returned.
    """
    if not os.path.isdir(data_path):
        raise InputError(f"--data_path {data_path}: no such folder (it must hold train/ and val/ ImageFolders)")
    splits = {}
    for split in ("train", "val") if need_train else ("val",):
        tars = [os.path.join(data_path, split + suffix) for suffix in TAR_SUFFIXES]
        splits[split] = next((p for p in [os.path.join(data_path, split), *tars] if os.path.exists(p)), None)
        if splits[split] is None:
            raise InputError(f"--data_path {data_path}: no {split}/ folder (it must hold train/ and val/ "
                             f"ImageFolders, one subfolder per class, or train.tar and val.tar)")
    val = _eval_image_folder(splits["val"], val_transform)
    if not need_train:
        return None, val
    train = _eval_image_folder(splits["train"], train_transform)
    check_same_classes(data_path, train.classes, val.classes)
    return train, val


def check_same_classes(data_path: str, train_classes: list, val_classes: list) -> None:
    """One line naming the classes that only one split has, when train/ and val/ do not have the same classes."""
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise InputError(f"--data_path {data_path}: val/ has other classes than train/ (train/ {len(train_classes)}, "
                         f"val/ {len(val_classes)}; only in train/: {', '.join(only_train[:5]) or '-'}"
                         f"{' ...' if len(only_train) > 5 else ''}; only in val/: {', '.join(only_val[:5]) or '-'}"
                         f"{' ...' if len(only_val) > 5 else ''})")


class ShardedBatchSampler(torch.utils.data.Sampler):
    """The dataset's consecutive batches, in order, dealt round-robin to the processes (batch b to rank b % world).

    No image is repeated or dropped, and each batch is exactly the one a single process
    would form, so features computed by several processes equal a one-process run's.
    `num_rounds` is the number of batches of rank 0, the most any rank has.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.num_batches = math.ceil(num_samples / batch_size)
        self.num_rounds = math.ceil(self.num_batches / world_size)

    def __iter__(self):
        for b in range(self.rank, self.num_batches, self.world_size):
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples)))

    def __len__(self):
        return len(range(self.rank, self.num_batches, self.world_size))


def build_frozen_backbone(args, device: torch.device) -> nn.Module:
    """The backbone of --arch/--patch_size with the evaluated weights, in eval mode, without gradients, on device.

    Weights: --pretrained_weights with --checkpoint_key, or the published ones for the arch when it is empty.
    """
    model = build_model(args.arch, patch_size=args.patch_size)
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size,
                            fit_options=True)
    model.eval().requires_grad_(False)
    patches = f" {args.patch_size}x{args.patch_size}" if hasattr(model, "patch_embed") else ""
    print_main(f"Model {args.arch}{patches} built.")
    return model.to(device)


def feature_loader(dataset, batch_size: int, num_workers: int, device: torch.device, persistent: bool = False):
    """The DataLoader extract_features reads: this process's ShardedBatchSampler batches of the dataset.

    persistent: keep the workers between passes (the k-NN monitoring reads the same images every few epochs; starting
    workers costs seconds each time, more than a small split's whole pass).
    """
    sampler = ShardedBatchSampler(len(dataset), batch_size, get_rank(), get_world_size())
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=device.type == "cuda",
                                       persistent_workers=persistent and num_workers > 0,
                                       multiprocessing_context=worker_start_method(num_workers))


@torch.inference_mode()
def extract_features(model: nn.Module, data_loader, device: torch.device, storage: torch.device):
    """L2-normalised features (N, D) of the dataset's readable images, in dataset order, and their labels (N,).

    data_loader: feature_loader's. The model runs on device and the features are kept on storage. Each process runs
    the batches ShardedBatchSampler deals it; after every round the batches of all processes are gathered with
    their indices, so every process ends with all features.
    An unreadable image is skipped (ImageFolderSkipBad warns) and left out of features and labels.
    """
    dataset, sampler = data_loader.dataset, data_loader.batch_sampler
    batch_size = sampler.batch_size
    dim = model.embed_dim
    features = torch.zeros(len(dataset), dim, device=storage)
    readable = torch.zeros(len(dataset), dtype=torch.bool, device=storage)
    local_batches, local_indices = iter(data_loader), iter(sampler)
    start = time.time()
    for r in range(sampler.num_rounds):
        # every rank takes part in every gather: a rank without a batch this round sends only padding (index -1)
        feats = torch.zeros(batch_size, dim, device=device)
        index = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        ok = torch.zeros(batch_size, dtype=torch.bool, device=device)
        idx = next(local_indices, None)
        if idx is not None:
            images, _ = next(local_batches)
            feats[:len(idx)] = model(images.to(device, non_blocking=True)).float()
            index[:len(idx)] = torch.as_tensor(idx)
            ok[:len(idx)] = ~dataset.bad[idx].to(device)  # a skipped image was replaced by another one
        feats, index, ok = all_gather_cat(feats), all_gather_cat(index), all_gather_cat(ok)
        keep = index >= 0
        features[index[keep].to(storage)] = feats[keep].to(storage)
        readable[index[keep].to(storage)] = ok[keep].to(storage)
        if r % 20 == 0 or r == sampler.num_rounds - 1:
            print_main(f"  [{r + 1}/{sampler.num_rounds}] batches of {batch_size} x {get_world_size()} "
                       f"processes, {time.time() - start:.1f}s")
    elapsed = time.time() - start
    print_main(f"Extracted {len(dataset)} features in {elapsed:.1f}s "
                     f"({len(dataset) / elapsed:.1f} images/s, {get_world_size()} processes)")
    skipped = len(dataset) - int(readable.sum())
    if skipped:
        print_main(f"WARNING: {skipped} unreadable images of {dataset.root} skipped")
        features = features[readable]
    features.div_(features.norm(dim=1, keepdim=True).clamp_min(1e-12))  # L2 normalisation in place
    labels = torch.tensor(dataset.targets, dtype=torch.long, device=storage)[readable]
    return features, labels


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, nb_knn, T: float, num_classes: int,
                   test_chunk: int = 0, train_chunk: int = 2**17, rank: int = 0, world_size: int = 1) -> dict:
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
        print_main(f"WARNING: skipping k = {', '.join(map(str, too_big))}: only {n_train} training images")
    nb_knn = [k for k in nb_knn if k <= n_train]
    if not nb_knn:
        raise InputError(f"--nb_knn: every k is more than the {n_train} training images")
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
    if world_size > 1:
        correct = all_reduce_sum(correct)
    total = len(test_features)
    return {k: (100.0 * correct[j, 0].item() / total, 100.0 * correct[j, 1].item() / total)
            for j, k in enumerate(nb_knn)}
