"""Linear classification on frozen DINO features (paper Sec. 3.2, evaluation protocols).

    # ViT-S/16 recipe: [CLS] of the last 4 blocks; one GPU or the CPU, no launcher
    python eval_linear.py --arch vit_small --patch_size 16 --n_last_blocks 4 --avgpool_patchtokens false \\
        --pretrained_weights /path/to/checkpoint.pth --data_path /path/to/imagenet --output_dir /path/to/linear
    # ViT-B/16 recipe on 8 GPUs: [CLS] of the last block and the average of its patch tokens
    torchrun --nproc_per_node=8 eval_linear.py --arch vit_base --n_last_blocks 1 --avgpool_patchtokens true \\
        --data_path /path/to/imagenet --output_dir /path/to/linear
    # evaluate the published linear classifier of the published ViT-S/16 (or --linear_weights a checkpoint.pth.tar)
    python eval_linear.py --evaluate --arch vit_small --patch_size 16 --data_path /path/to/imagenet

--data_path holds train/ and val/ ImageFolders with the same classes (--evaluate needs only val/).
Training resumes from output_dir/checkpoint.pth.tar when it exists.
"""
import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

import utils
from vision_transformer import RegionVisionTransformer, VisionTransformer

PATCH_SIZE = 16  # --patch_size of the DINO ViTs when not given (DINOv2 archs: 14)


def get_args_parser():
    parser = argparse.ArgumentParser("Evaluation with linear classification on ImageNet", add_help=False)
    parser.add_argument("--n_last_blocks", default=4, type=int, help="""Concatenate [CLS] tokens
        for the `n` last blocks. We use `n=4` when evaluating ViT-Small and `n=1` with ViT-Base.""")
    parser.add_argument("--avgpool_patchtokens", default=False, type=utils.bool_flag,
                        help="""Whether ot not to concatenate the global average pooled features to the [CLS] token.
        We typically set this to False for ViT-Small and to True with ViT-Base.""")
    utils.add_model_args(parser, patch_size=PATCH_SIZE)
    utils.add_region_args(parser, pool=True)
    utils.add_weights_args(parser)
    parser.add_argument("--epochs", default=100, type=int, help="Number of epochs of training.")
    parser.add_argument("--lr", default=0.001, type=float, help="""Learning rate at the beginning of
        training (highest LR used during training). The learning rate is linearly scaled
        with the batch size, and specified here for a reference batch size of 256.
        We recommend tweaking the LR depending on the checkpoint evaluated.""")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Per-GPU batch-size")
    utils.add_distributed_args(parser)
    parser.add_argument("--data_path", default="/path/to/imagenet/", type=str,
                        help="Folder with train/ and val/ ImageFolders (or train.tar and val.tar, see README).")
    parser.add_argument("--val_freq", default=1, type=int, help="Epoch frequency for validation.")
    parser.add_argument("--output_dir", default=".", help="Path to save logs and checkpoints")
    parser.add_argument("--num_labels", default=None, type=int, help="""Number of labels for linear classifier
        (default: the number of classes of --data_path; a value given must equal it). The original's default was
        1000, ImageNet's.""")
    parser.add_argument("--evaluate", dest="evaluate", action="store_true",
                        help="Only evaluate a linear classifier on val/ (see --linear_weights), no training.")
    parser.add_argument("--linear_weights", default="", type=str, help="""With --evaluate: linear classifier
        weights to evaluate, e.g. a checkpoint.pth.tar this script wrote; empty: the published linear weights of
        the published backbone for --arch and --patch_size.""")
    utils.add_eval_size_args(parser)
    parser.add_argument("--train_crop_scale", type=float, nargs=2, default=(0.08, 1.), metavar=("MIN", "MAX"),
                        help="""Range of the area fraction of a training image that its RandomResizedCrop covers
        (the original's 0.08 1). On small images such as Fashion-MNIST's 28 pixels, 8%% of the image is a few
        pixels: 1 1 trains on whole images (random aspect ratios then fall back to the whole image) and flips.""")
    parser.add_argument("--seed", default=0, type=int, help="Random seed (crops, flips and data order).")
    return parser


FLAG_DOMAINS = {
    **utils.MODEL_FLAG_DOMAINS, **utils.EVAL_SIZE_FLAG_DOMAINS, **utils.DISTRIBUTED_FLAG_DOMAINS,
    **utils.REGION_FLAG_DOMAINS,
    "n_last_blocks": utils.AT_LEAST_ONE, "epochs": utils.AT_LEAST_ONE, "lr": utils.POSITIVE,
    "batch_size_per_gpu": utils.AT_LEAST_ONE, "val_freq": utils.AT_LEAST_ONE, "num_labels": utils.AT_LEAST_ONE,
    "train_crop_scale": utils.FRACTION, "seed": utils.NON_NEGATIVE,
}


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    args = utils.resolve_patch_size(args, PATCH_SIZE)
    utils.check_flag_domains(args, FLAG_DOMAINS)
    utils.check_region_pool(args)
    low, high = args.train_crop_scale
    if not low <= high:
        raise utils.InputError(f"--train_crop_scale {low:g} {high:g}: expected two numbers 0 < min <= max <= 1")
    utils.check_patch_fits(args, "crop_size")
    if args.linear_weights and not args.evaluate:
        raise utils.InputError("--linear_weights is for --evaluate; to resume training, keep the same --output_dir")


def main(args):
    args = utils.resolve_patch_size(args, PATCH_SIZE)  # the arch's own when not given
    check_args(args)  # before the rendezvous, so that a typo does not wait for every process
    dist_env = utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    utils.print_main(utils.git_description())
    utils.print_main("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    torch.backends.cudnn.benchmark = True

    # ============ preparing data ... ============
    train_loader, val_loader, num_labels = build_data_loaders(args, dist_env)

    # ============ building network ... ============
    model = (utils.build_region_backbone(args, dist_env.device) if utils.is_region_arch(args.arch)
             else utils.build_frozen_backbone(args, dist_env.device))
    feat_dim = check_feature_args(model, args)
    linear_classifier = utils.wrap_ddp(LinearClassifier(feat_dim, num_labels).to(dist_env.device), dist_env)

    if args.evaluate:
        load_linear_weights(linear_classifier, args)
        test_stats = validate_network(val_loader, model, linear_classifier, args)
        utils.print_main(f"Accuracy of the network on the {test_stats['n']} test images: {test_stats['acc1']:.1f}%")
        utils.shutdown_distributed()
        return

    # ============ preparing optimizer ... ============
    optimizer = torch.optim.SGD(linear_classifier.parameters(),
                                lr=args.lr * (args.batch_size_per_gpu * dist_env.world_size) / 256.,  # linear scaling
                                momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)

    # ============ optionally resume training ... ============
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    ckp_path = os.path.join(args.output_dir, "checkpoint.pth.tar")
    to_restore = {"epoch": 0, "best_acc": 0.}
    check_resumable(ckp_path, linear_classifier)
    try:
        utils.restart_from_checkpoint(ckp_path, run_variables=to_restore, state_dict=linear_classifier,
                                      optimizer=optimizer, scheduler=scheduler)
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. an optimizer state of another shape
        raise utils.InputError(f"{ckp_path} does not fit this run ({' '.join(str(e).split())}); "
                               f"use another --output_dir or the flags it was written with") from None
    start_epoch, best_acc = to_restore["epoch"], to_restore["best_acc"]

    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)  # the order of the images
        train_loader.dataset.set_epoch(epoch)  # their crops and flips
        start = time.time()
        train_stats = train(model, linear_classifier, optimizer, train_loader, epoch, args)
        scheduler.step()
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "time": round(time.time() - start, 2)}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            test_stats = validate_network(val_loader, model, linear_classifier, args)
            utils.print_main(f"Accuracy at epoch {epoch} of the network on the {test_stats['n']} test images: "
                             f"{test_stats['acc1']:.1f}%")
            best_acc = max(best_acc, test_stats["acc1"])
            utils.print_main(f"Max accuracy so far: {best_acc:.2f}%")
            log_stats.update({f"test_{k}": v for k, v in test_stats.items()}, best_acc=best_acc)
        log_stats["skipped_images"] = train_loader.dataset.num_skipped() + val_loader.dataset.num_skipped()
        utils.append_log(args.output_dir, log_stats)
        save_dict = {
            "epoch": epoch + 1,
            "state_dict": linear_classifier.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best_acc": best_acc,
        }
        utils.save_on_master(save_dict, ckp_path)
    utils.print_main("Training of the supervised linear classifier on frozen features completed.\n"
                     f"Top-1 test accuracy: {best_acc:.1f}")
    utils.shutdown_distributed()


def build_data_loaders(args, dist_env: utils.Distributed):
    """Training: RandomResizedCrop + flip, shuffled over processes; val: the evaluation transform, split in order.

    Also returns the number of classes, which --num_labels must equal when it is given. A region arch reads whole
    grids of tile features; the training grids are flipped left-right, the one move of its pretraining crops that
    keeps every cell.
    """
    if utils.is_region_arch(args.arch):
        dataset_train, dataset_val = utils.build_region_eval_datasets(
            args.data_path, args.region_in_dim, transforms.RandomHorizontalFlip(), need_train=not args.evaluate)
    else:
        normalize = transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)
        train_transform = transforms.Compose([
            transforms.RandomResizedCrop(args.crop_size, scale=tuple(args.train_crop_scale)),  # original: 0.08 1
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ])
        val_transform = utils.eval_transform(args.resize_size, args.crop_size)
        dataset_train, dataset_val = utils.build_eval_datasets(args.data_path, train_transform, val_transform,
                                                               need_train=not args.evaluate)
    num_classes = len(dataset_val.classes)
    if args.num_labels is not None and args.num_labels != num_classes:
        raise utils.InputError(f"--num_labels {args.num_labels}: {args.data_path} has {num_classes} classes")
    on_gpu = dist_env.device.type == "cuda"
    workers = dict(num_workers=args.num_workers, pin_memory=on_gpu,
                   multiprocessing_context=utils.worker_start_method(args.num_workers))
    val_loader = torch.utils.data.DataLoader(
        dataset_val, batch_sampler=utils.ShardedBatchSampler(len(dataset_val), args.batch_size_per_gpu,
                                                             dist_env.rank, dist_env.world_size),
        persistent_workers=args.num_workers > 0 and not args.evaluate, **workers)
    if args.evaluate:
        utils.print_main(f"Data loaded with {len(dataset_val)} val imgs.")
        return None, val_loader, num_classes
    dataset_train = EpochSeeded(dataset_train, args.seed)
    sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=dist_env.world_size, rank=dist_env.rank,
                                                  shuffle=True, seed=args.seed)
    train_loader = torch.utils.data.DataLoader(dataset_train, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                               persistent_workers=args.num_workers > 0, **workers)
    utils.print_main(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs.")
    return train_loader, val_loader, num_classes


class EpochSeeded(torch.utils.data.Dataset):
    """The dataset with the random transform of image i in epoch e seeded by (seed, e, i).

    Crops and flips then depend neither on the number of workers or processes nor on where
    a run was interrupted: a resumed run repeats the uninterrupted one. The epoch lives in
    shared memory, so persistent workers see set_epoch.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch[0] = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int):
        torch.manual_seed(((self.seed * 1_000_003 + int(self.epoch[0])) * 1_000_000_007 + index) % 2**63)
        return self.dataset[index]

    def num_skipped(self) -> int:
        return self.dataset.num_skipped()


def check_resumable(ckp_path: str, linear_classifier: nn.Module) -> None:
    """A one-line error, before anything is overwritten, when output_dir holds a classifier of another shape."""
    if not os.path.isfile(ckp_path):
        return
    checkpoint = utils.torch_load(ckp_path)
    if "state_dict" not in checkpoint:
        raise utils.InputError(f"{ckp_path}: no key 'state_dict'; it has: {', '.join(checkpoint)}")
    try:
        utils.load_state_dict_strict(linear_classifier, checkpoint["state_dict"], ckp_path)
    except utils.InputError as e:
        raise utils.InputError(f"{e}; it was written by a run with other flags: resume with those, or use another "
                               f"--output_dir") from None


def check_feature_args(model, args) -> int:
    """Size of the frozen feature the linear classifier reads; errors for block counts the backbone lacks."""
    if not isinstance(model, (VisionTransformer, RegionVisionTransformer)):
        if args.n_last_blocks != 4 or args.avgpool_patchtokens:
            utils.print_main(f"--n_last_blocks and --avgpool_patchtokens apply to ViTs only: "
                             f"{args.arch} gives its pooled feature")
        return model.embed_dim
    if args.n_last_blocks > len(model.blocks):
        raise utils.InputError(f"--n_last_blocks {args.n_last_blocks}: {args.arch} has {len(model.blocks)} blocks")
    return model.embed_dim * (args.n_last_blocks + int(args.avgpool_patchtokens))


def frozen_features(model, images: torch.Tensor, args) -> torch.Tensor:
    """(B, F) input of the linear classifier; call it without gradients.

    ViTs: the [CLS] tokens of the last n_last_blocks blocks concatenated, plus, with
    avgpool_patchtokens, the mean of the last block's patch tokens (never DINOv2's registers). With one block the two
    are interleaved element-wise, the layout the published ViT-B linear weights were trained
    on; with more blocks (where the original fails) the mean is appended. Convnets: the pooled feature; HIPT's region
    ViT as a ViT, its cells as the patches; --region_pool mean: the mean of the tile features.
    """
    if not isinstance(model, (VisionTransformer, RegionVisionTransformer)):
        return model(images)
    intermediate_output = model.get_intermediate_layers(images, args.n_last_blocks)  # each (B, prefix + N, D)
    output = torch.cat([x[:, 0] for x in intermediate_output], dim=-1)  # (B, n * D)
    if args.avgpool_patchtokens:
        patch_mean = torch.mean(intermediate_output[-1][:, model.num_prefix_tokens:], dim=1)  # (B, D)
        if args.n_last_blocks == 1:
            output = torch.stack((output, patch_mean), dim=-1).flatten(1)  # (B, 2 * D): cls_0, avg_0, cls_1, ...
        else:
            output = torch.cat((output, patch_mean), dim=-1)  # (B, (n + 1) * D)
    return output


class LinearClassifier(nn.Module):
    """Linear layer to train on top of frozen features."""

    def __init__(self, dim: int, num_labels: int = 1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        return self.linear(x.view(x.size(0), -1))  # flatten


def load_linear_weights(linear_classifier: nn.Module, args) -> None:
    """--linear_weights (a checkpoint.pth.tar or a bare state dict), else the published linear weights; strict."""
    if args.linear_weights:
        if not os.path.isfile(args.linear_weights):
            raise utils.InputError(f"--linear_weights {args.linear_weights}: no such file")
        state_dict, source = utils.torch_load(args.linear_weights), args.linear_weights
    else:
        source = utils.published_linear_weights_url(args.arch, args.patch_size)
        utils.print_main(f"No --linear_weights given: using the published linear weights {source}")
        state_dict = utils.download_weights(source, flag="--linear_weights")
    state_dict = state_dict.get("state_dict", state_dict)
    if not all(torch.is_tensor(v) for v in state_dict.values()):
        raise utils.InputError(f"{source}: no 'state_dict' and not a state dict; it has: {', '.join(state_dict)}")
    state_dict = {("" if k.startswith("module.") else "module.") + k: v for k, v in state_dict.items()}
    utils.load_state_dict_strict(linear_classifier, state_dict, source)
    utils.print_main(f"Linear weights loaded from {source}")


def train(model, linear_classifier, optimizer, loader, epoch, args) -> dict:
    linear_classifier.train()
    device = next(linear_classifier.parameters()).device
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = f"Epoch: [{epoch}/{args.epochs}]"
    for images, target in metric_logger.log_every(loader, 20, header):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.no_grad():  # the backbone is frozen: no graph, only the linear layer learns
            features = frozen_features(model, images, args)
        loss = F.cross_entropy(linear_classifier(features), target)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        metric_logger.update(loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
    metric_logger.synchronize_between_processes()
    utils.print_main("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def validate_network(val_loader, model, linear_classifier, args) -> dict:
    """Loss, Acc@1 and (with 5 classes or more) Acc@5 in percent over the readable val images of all processes.

    Each process evaluates its share of the batches; the sums are added over processes, so the
    numbers are those of one process over the whole of val/. An unreadable image is left out.
    """
    linear_classifier.eval()
    dataset = val_loader.dataset
    device, num_labels = next(linear_classifier.parameters()).device, linear_classifier.module.num_labels
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    for idx, (images, target) in zip(val_loader.batch_sampler, val_loader):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        output = linear_classifier(frozen_features(model, images, args))
        keep = ~dataset.bad[idx].to(device)  # a skipped image was replaced by another one: count it once
        loss = F.cross_entropy(output, target, reduction="none")
        top = output.topk(min(5, num_labels), dim=1).indices == target[:, None]  # (B, min(5, C))
        sums += torch.stack([loss[keep].sum(), top[keep, 0].sum(), top[keep].any(dim=1).sum(),
                             keep.sum()]).double()
    sums = utils.all_reduce_sum(sums)
    n = int(sums[3].item())
    if n == 0:
        raise utils.InputError(f"no readable image in {dataset.root}")
    stats = {"loss": sums[0].item() / n, "acc1": 100.0 * sums[1].item() / n, "n": n}
    if num_labels >= 5:
        stats["acc5"] = 100.0 * sums[2].item() / n
    utils.print_main(f"* Acc@1 {stats['acc1']:.3f}" + (f" Acc@5 {stats['acc5']:.3f}" if "acc5" in stats else "") +
                     f" loss {stats['loss']:.3f}")
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Evaluation with linear classification on ImageNet",
                                     parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
