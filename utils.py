"""What the DINO scripts share: the design's pieces here, the rest in the dinolib package and re-exported.

Here, in this order: the DDP helpers, the cosine schedules, the multi-crop augmentation, the DINO loss with its
centering and the EMA teacher, and logging. dinolib holds one module per other concern, and every name of theirs
that the scripts use is reachable as `utils.<name>` too:

    dinolib.errors                 one-line errors for bad inputs, run_main
    dinolib.process_group          rank, world size, collectives on the device the process group serves
    dinolib.flags                  shared flags and their domains
    dinolib.checkpoints            published weights, strict loading, atomic saves, resuming, optimizer state
    dinolib.optim                  parameter groups (layer-wise lr decay too), gradient clipping, LARS
    dinolib.masking                iBOT's blockwise masks (DINOv2's MaskingGenerator and collate)
    dinolib.ibot_patch_loss        iBOT's masked-patch loss
    dinolib.koleo_loss             DINOv2's KoLeo regulariser
    dinolib.sinkhorn_knopp         DINOv2's Sinkhorn-Knopp teacher
    dinolib.tar_index              tarball member indices (the original's file-index format)
    dinolib.datasets               class folders and tarballs that survive unreadable images
    dinolib.evaluation             frozen features, k-NN classifier
    dinolib.batched_augmentation   the multi-crop's per-pixel steps on whole batches
    dinolib.pictures               attention maps and PCA pictures

Nothing runs at import: no network, no subprocess, no process group.
"""
import dataclasses
import datetime
import json
import math
import os
import random
import subprocess
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import ImageFilter, ImageOps
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

from dinolib.batched_augmentation import (  # noqa: F401
    GRAYSCALE_WEIGHTS, SOLARIZE_THRESHOLD, MultiCropGeometry, MultiCropOnDevice, adjust_brightness_batched,
    adjust_hue_batched, gaussian_blur_batched, sample_photometric_params)
from dinolib.checkpoints import (  # noqa: F401
    ATTENTION_FIGURE_BACKBONES, CHECKPOINT_SAFE_GLOBALS, DINOV2_PUBLISHED_URL, OPTIMIZER_IMPLEMENTATION_KEYS,
    PUBLISHED_BACKBONES, PUBLISHED_URL, WEIGHT_NORM_PARAMETRIZATION_KEYS, attention_weights_url, download_weights,
    extract_backbone_state_dict, fitting_vit_archs, legacy_key, load_optimizer_state, load_pretrained_weights,
    load_state_dict_strict, published_linear_weights_url, published_weights_url, restart_from_checkpoint,
    save_on_master, torch_load)
from dinolib.datasets import (  # noqa: F401
    IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, ImageFolderSkipBad, TarImageDataset, _has_image_extension,
    check_image_folder, image_dataset, worker_start_method)
from dinolib.errors import InputError, RankInputError, launch_rank, run_main  # noqa: F401
from dinolib.evaluation import (  # noqa: F401
    ShardedBatchSampler, build_eval_datasets, build_frozen_backbone, eval_transform, extract_features,
    feature_loader, knn_classifier)
from dinolib.flags import (  # noqa: F401
    AT_LEAST_ONE, DISTRIBUTED_FLAG_DOMAINS, EVAL_SIZE_FLAG_DOMAINS, FINITE, FRACTION, MODEL_FLAG_DOMAINS,
    NON_NEGATIVE, POSITIVE, Domain, add_distributed_args, add_eval_size_args, add_model_args, add_weights_args,
    bool_flag, bool_or_auto_flag, check_flag_domains, check_patch_fits, cpu_bf16_units, resolve_patch_size)
from dinolib.ibot_patch_loss import iBOTPatchLoss  # noqa: F401
from dinolib.koleo_loss import KoLeoLoss  # noqa: F401
from dinolib.masking import MaskingGenerator, collate_masks, mask_generator_for  # noqa: F401
from dinolib.optim import (  # noqa: F401
    LARS, build_optimizer, cancel_gradients_last_layer, clip_gradients, fuse_params_groups, get_params_groups,
    get_params_groups_with_decay, get_vit_lr_decay_rate, is_regularized)
from dinolib.pictures import (  # noqa: F401
    PatchPCA, attention_mass_mask, attention_transform, border_patches, build_attention_backbone,
    cls_attention_maps, crop_to_patch_multiple, patch_features, pca_pictures, upsample_patches)
from dinolib.process_group import (  # noqa: F401
    _group_device, all_gather_cat, all_reduce_max, all_reduce_sum, barrier, get_rank, get_world_size,
    is_dist_avail_and_initialized, is_main_process, print_main)
from dinolib.regions import (  # noqa: F401
    NORMALIZATION_FLAG_DOMAINS, REGION_CROPS_SIZE, REGION_FLAG_DOMAINS, REGION_SUFFIX, BadRegion, RegionFeatureDataset,
    RegionMultiCrop, RegionWidthError, add_normalization_args, add_region_args, build_region_backbone,
    build_region_eval_datasets, build_tile_encoder, cell_attention, check_region_pool, embed_tiles,
    hierarchical_attention, is_region_arch, list_region_files, partial_regions, region_grid, region_names,
    resolve_crop_sizes, tile_features_to_grid, tile_image, tile_transform)
from dinolib.sinkhorn_knopp import sinkhorn_knopp  # noqa: F401
from dinolib.tar_index import (  # noqa: F401
    COMPRESSION_MAGIC, TAR_BLOCK, TAR_FILE_TYPES, TAR_NO_DATA_TYPES, TAR_SUFFIXES, TarMember, check_uncompressed_tar,
    infer_entries_command, is_tar_path, iter_tar_members, load_tar_entries, read_file_indices, tar_class_indices,
    tar_entries, tar_prefix, write_tar_entries)


# ============ DDP helpers ============


def _slurm_master_addr() -> str:
    """First host of the Slurm job's node list."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # simple lists ("node1,node2" or one name) need no scontrol
        return nodelist.split(",")[0].split("[")[0]


def slurm_port(job_id: str, restart_count: str = "0") -> int:
    """A port every task of one Slurm job agrees on without talking; it differs between jobs (ids 40,000 apart
    are never on a node together) and between a requeued job and its earlier run, which may still hold its port."""
    return 15000 + (int(job_id) + 7919 * int(restart_count)) % 40000


@dataclasses.dataclass(frozen=True)
class Distributed:
    """What the distributed setup found for this process: its rank, the number of processes, its local rank (its
    GPU on the node) and the device it computes on. The flags stay as they were parsed."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def init_distributed_mode(args) -> Distributed:
    """Find this process's rank, world size and device, join a process group if there are peers, and return them.

    Detects, in order: a launcher's environment (torchrun, torch.distributed.launch:
    RANK/WORLD_SIZE/LOCAL_RANK), a Slurm step (srun, submitit: SLURM_PROCID,
    SLURM_STEP_NUM_TASKS, SLURM_LOCALID), else a single process with no group.
    Backend NCCL on GPUs, gloo on CPU; reads --local_rank and --dist_url.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", args.local_rank))
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"),
                                                     env.get("SLURM_RESTART_COUNT", "0"))))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world_size), str(local_rank)
    else:
        rank, world_size, local_rank = 0, 1, 0

    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RankInputError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=world_size, rank=rank,
                                device_id=device if backend == "nccl" else None)
        barrier()
    print_main(f"| distributed: world size {world_size}, rank {rank}, device {device}")
    return Distributed(rank, world_size, local_rank, device)


def fix_random_seeds(seed: int = 31) -> None:
    """Seed torch, numpy and random; each rank adds its rank so crops differ between processes."""
    seed = seed + get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class LocalWrapper(nn.Module):
    """Stands in for DistributedDataParallel in one process, so `.module` and the `module.` keys are the same."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def wrap_ddp(model: nn.Module, dist_env: Distributed) -> nn.Module:
    """DistributedDataParallel with peers, LocalWrapper alone: either way the state dict keys start with `module.`."""
    if dist_env.world_size > 1:
        cuda = dist_env.device.type == "cuda"
        return DistributedDataParallel(model, device_ids=[dist_env.local_rank] if cuda else None)
    return LocalWrapper(model)


def shutdown_distributed() -> None:
    """Wait for every process, then leave the process group, so no rank exits while a peer still talks to it."""
    if is_dist_avail_and_initialized():
        barrier()
        dist.destroy_process_group()


# ============ schedules ============


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: float = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Per-iteration values: linear warmup from start_warmup_value, then cosine from base_value to final_value.
    warmup_epochs may be a fraction of the epochs (rounded to whole iterations)."""
    warmup_iters = round(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# ============ augmentation ============

class GaussianBlur:
    """PIL Gaussian blur with radius U(radius_min, radius_max), applied with probability p."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """PIL solarization (invert pixels >= 128) with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class DataAugmentationDINO:
    """Multi-crop augmentation of the paper: 2 global crops and local_crops_number local crops per image.

    Global crop 1 is always blurred; global crop 2 is blurred with p=0.1 and solarized
    with p=0.2; local crops are blurred with p=0.5 (BYOL's asymmetric recipe).
    """

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number: int,
                 global_crops_size: int = 224, local_crops_size: int = 96):
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                   p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(1.0), normalize])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(0.1), Solarization(0.2), normalize])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(p=0.5), normalize])

    def __call__(self, image) -> list:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops


# The batched multi-crop (--augmentation gpu), drawn from the same distributions: dinolib/batched_augmentation.py


# ============ loss and teacher ============


class MultiCropWrapper(nn.Module):
    """Backbone over all crops, grouped by resolution, then the head once on every feature.

    Consecutive crops of the same size are concatenated into one backbone batch
    (2 global crops, then the local crops), so each resolution costs one forward pass.
    For DINOv2's objectives it also gives the head's outputs on chosen patch tokens of the
    global crops (iBOT: through `ibot_head` when it has its own, else the same head in the
    same call as the [CLS]) and the backbone's [CLS] features of the global crops (KoLeo).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, ibot_head: nn.Module = None):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()  # no classifier on top of the features
        self.backbone = backbone
        self.head = head
        if ibot_head is not None:  # registered only when iBOT has its own head: the original's keys stay
            self.ibot_head = ibot_head

    def forward(self, x, masks: torch.Tensor = None, patch_index: torch.Tensor = None, backbone_cls: bool = False):
        """The head's outputs on every crop's feature, (n_crops * B, K), as the original; with any keyword, a dict:
        cls (that tensor), patch (the head's outputs on the chosen patch tokens, (M, K'), or None) and backbone_cls
        (the backbone's features of the first resolution's crops, (n_global * B, D), or None).

        masks (n_global * B, N) bool: the first resolution's patches where the backbone takes its mask token
        (iBOT's student). patch_index (M,): positions in the flattened (n_global * B * N) patch tokens of the first
        resolution whose head outputs are wanted (iBOT's masked patches).
        """
        if not isinstance(x, (list, tuple)):
            x = [x]
        backbone, features, head, ibot_head = self.__dict__.get(
            "_compiled", (self.backbone, getattr(self.backbone, "forward_features", None), self.head,
                          getattr(self, "ibot_head", None)))
        dense = masks is not None or patch_index is not None
        sizes = [inp.shape[-1] for inp in x]
        outputs, start, patch_tokens = [], 0, None
        for end in range(1, len(x) + 1):  # group runs of equal resolution
            if end == len(x) or sizes[end] != sizes[start]:
                if dense and start == 0:  # the global crops, with their patch tokens
                    out = features(torch.cat(x[start:end]), masks=masks)
                    outputs.append(out["x_norm_clstoken"])
                    patch_tokens = out["x_norm_patchtokens"]  # (n_global * B, N, D)
                else:
                    out = backbone(torch.cat(x[start:end]))
                    outputs.append(out[0] if isinstance(out, tuple) else out)
                start = end
        cls = torch.cat(outputs)
        if not dense and not backbone_cls:
            return head(cls)
        patch = patch_tokens.flatten(0, 1)[patch_index] if patch_index is not None else None  # (M, D)
        if patch is None:
            cls_out, patch_out = head(cls), None
        elif ibot_head is not None:
            cls_out, patch_out = head(cls), ibot_head(patch)
        else:  # one head call, as DINOv2 batches [CLS] and patches through a shared head
            cls_out, patch_out = head(torch.cat((cls, patch))).split((len(cls), len(patch)))
        return {"cls": cls_out, "patch": patch_out, "backbone_cls": outputs[0] if backbone_cls else None}

    def compile_parts(self, **compile_kwargs) -> None:
        """torch.compile the backbone and the head(s) for this wrapper's forward (state dict keys unchanged).

        Static shapes: batch and crop sizes are fixed during training, so each crop resolution gets its own
        specialised graph instead of one graph with symbolic shapes. `self.backbone` itself stays eager, so the
        k-NN monitoring, which runs it at other batch sizes under inference mode, compiles nothing. The number of
        patches iBOT masks changes every step: the heads, which see them, get automatic dynamic shapes.
        """
        static = dict(compile_kwargs, dynamic=False)
        features = getattr(self.backbone, "forward_features", None)
        ibot_head = getattr(self, "ibot_head", None)
        heads = dict(compile_kwargs)  # dynamic=None: static first, a dynamic graph once a shape changes
        compiled = (torch.compile(self.backbone, **static), features and torch.compile(features, **static),
                    torch.compile(self.head, **heads), ibot_head and torch.compile(ibot_head, **heads))
        self.__dict__["_compiled"] = compiled  # not a submodule: the compiled wrappers share the parameters


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warmup over warmup_teacher_temp_epochs, then constant (a too high
    temperature early makes training unstable)."""
    if warmup_teacher_temp_epochs > epochs:
        raise InputError(f"--warmup_teacher_temp_epochs {warmup_teacher_temp_epochs} is more than --epochs {epochs}")
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                           np.ones(epochs - warmup_teacher_temp_epochs) * teacher_temp))


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over all cross-view pairs.

    The paper's Algorithm 1 in three methods, which DINO.train_step calls in turn: softmax_center_teacher (the
    teacher's centering and sharpening), cross_entropy (the student's loss against it) and update_center (the
    center's EMA). forward composes them, with the temperature of teacher_temp_schedule for the epoch.
    sinkhorn_knopp_teacher is DINOv2's replacement for the first and last (--centering sinkhorn_knopp).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                                           warmup_teacher_temp_epochs, nepochs)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """student_output: (ncrops * B, K); teacher_output: (2 * B, K), global crops only. Updates the center."""
        teacher_probs = self.softmax_center_teacher(teacher_output, self.teacher_temp_schedule[epoch])
        loss = self.cross_entropy(student_output, teacher_probs)
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The teacher's distributions: its outputs centred (minus the center) and sharpened (divided by
        teacher_temp), in fp32. (2 * B, K) in, (2 * B, K) out, no gradient."""
        return F.softmax((teacher_output.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        """DINOv2's alternative to centering: the teacher's distributions as a Sinkhorn-Knopp assignment of the
        batch (all processes together) to the K prototypes, each prototype receiving about B / K of the B images
        and each image's assignment summing to 1. (N, K) in, (N, K) out, fp32, no gradient; the center is unused.
        See dinolib.sinkhorn_knopp for the iterations and what keeps them finite.
        """
        return sinkhorn_knopp(teacher_output, teacher_temp, len(teacher_output) * get_world_size(), n_iterations)

    def cross_entropy(self, student_output: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Mean over the 2 * (ncrops - 1) pairs (teacher crop, every other student crop) of the batch mean of
        sum_k -teacher_probs * log_softmax(student_output / student_temp)."""
        return self.cross_entropy_terms(student_output, teacher_probs)[0]

    def cross_entropy_terms(self, student_output: torch.Tensor, teacher_probs: torch.Tensor) -> tuple:
        """(cross_entropy, {dino_global_crops_loss, dino_local_crops_loss}): the loss, with its gradient, and its
        two parts under DINOv2's names, detached: the pairs whose student crop is global, and those whose student
        crop is local (absent without local crops). The parts sum to the loss."""
        # one log-softmax per student crop, reused for both teacher crops
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)  # (ncrops * B, K)
        teacher_p = teacher_probs.chunk(2)
        # Grouped by teacher crop, the local crops enter both groups only through the sum of their
        # log-probabilities, so the same total takes 2 products over (B, K) instead of 2 * (ncrops - 1).
        batch = len(student_output) // self.ncrops
        logp_global = student_logp[:2 * batch].chunk(2)
        logp_local = student_logp[2 * batch:].unflatten(0, (self.ncrops - 2, batch)).sum(0) if self.ncrops > 2 else 0
        n_pairs = 2 * (self.ncrops - 1)
        total_loss = (torch.sum(-teacher_p[0] * (logp_global[1] + logp_local), dim=-1).mean()
                      + torch.sum(-teacher_p[1] * (logp_global[0] + logp_local), dim=-1).mean()) / n_pairs
        terms = {}
        if self.ncrops > 2:
            with torch.no_grad():
                local = (torch.sum(-teacher_p[0] * logp_local, dim=-1).mean()
                         + torch.sum(-teacher_p[1] * logp_local, dim=-1).mean()) / n_pairs
            terms["dino_local_crops_loss"] = local
        terms = {"dino_global_crops_loss": total_loss.detach() - terms.get("dino_local_crops_loss", 0), **terms}
        return total_loss, terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the batch mean of teacher outputs, the mean taken over every process."""
        batch_center = all_reduce_sum(torch.sum(teacher_output.float(), dim=0, keepdim=True))
        batch_center = batch_center / (len(teacher_output) * get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


# Collapse diagnostics (the quantities of the paper's Sec. 5.3 and Fig. 7). With q the teacher's distribution of an
# image, the loss averages H(q, p) = H(q) + KL(q || p) over cross-view pairs, and every pair of a teacher crop has the
# same H(q): so KL = loss - mean H(q), with no further product. Uniform collapse: every q near uniform, mean H(q) near
# ln(K). One-dimension collapse: every q on the same dimension, so even the batch's mean distribution has an entropy
# near 0. A healthy teacher is sharp per image (low mean H(q)) and spread over the batch (H(mean q) high).


@torch.no_grad()
def teacher_entropies(teacher_p: torch.Tensor) -> torch.Tensor:
    """[mean per-image entropy, entropy of the batch-mean distribution] in nats, of (N, K) distributions."""
    teacher_p = teacher_p.float()
    return torch.stack((torch.special.entr(teacher_p).sum(-1).mean(), torch.special.entr(teacher_p.mean(0)).sum()))


@torch.no_grad()
def teacher_diagnostics(teacher_probs: torch.Tensor, loss: torch.Tensor) -> dict:
    """The collapse diagnostics of one step by name: teacher_entropy (mean per-image entropy), teacher_batch_entropy
    (entropy of the batch-mean distribution) and kl (loss - teacher_entropy, in float64), on the device."""
    entropy, batch_entropy = teacher_entropies(teacher_probs)
    return {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy,
            "kl": loss.detach().double() - entropy.double()}


COLLAPSE_CURES = "lower --teacher_temp, lower --momentum_teacher, or a longer --freeze_last_layer"


class CollapseCounter:
    """Counts an epoch's steps at uniform collapse (the teacher's mean entropy within `near` * ln(out_dim) of
    ln(out_dim)) and at one-dimension collapse (the entropy of its batch-mean distribution below near * ln(out_dim)),
    and words a warning when every step of the epoch, over all processes, sat at one of them."""

    def __init__(self, out_dim: int, near: float = 0.1):
        self.ln_k, self.near = math.log(out_dim), near
        self.steps = self.uniform = self.one_dimension = 0

    def add(self, entropy: float, batch_entropy: float) -> None:
        self.steps += 1
        self.uniform += entropy > (1 - self.near) * self.ln_k
        self.one_dimension += batch_entropy < self.near * self.ln_k

    def warning(self, epoch: int) -> str:
        """The warning line for this epoch, or ''. Every process must call it (one all-reduce of the counts)."""
        steps, uniform, one_dimension = all_reduce_sum(
            torch.tensor([self.steps, self.uniform, self.one_dimension], dtype=torch.float64)).tolist()
        if steps and uniform == steps:
            return (f"warning: uniform collapse in epoch {epoch}: the teacher's mean entropy stayed above "
                    f"{1 - self.near:.0%} of ln(out_dim) = {self.ln_k:.2f} at every step (its outputs are near "
                    f"uniform, the loss sits near ln(out_dim)); usual cures: {COLLAPSE_CURES}")
        if steps and one_dimension == steps:
            return (f"warning: one-dimension collapse in epoch {epoch}: the entropy of the teacher's batch-mean "
                    f"distribution stayed below {self.near:.0%} of ln(out_dim) = {self.ln_k:.2f} at every step "
                    f"(every image on the same few dimensions); usual cures: {COLLAPSE_CURES}")
        return ""


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA of the student's parameters into the teacher's: teacher = m * teacher + (1 - m) * student."""
    s_params = [p.detach() for p in student.parameters()]
    t_params = [p.detach() for p in teacher.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1 - momentum)  # t + (1 - m)(s - t): one kernel per group of tensors


def has_batchnorms(model: nn.Module) -> bool:
    """True if any module is a batch norm (then the teacher needs SyncBatchNorm and DDP too)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ============ logging ============


class SmoothedValue:
    """A series of values with its median and average over a window and globally."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.6f} ({global_avg:.6f})"):
        self.deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over processes (the window stays local)."""
        t = all_reduce_sum(torch.tensor([self.count, self.total], dtype=torch.float64))
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else float("nan")

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else float("nan")

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named SmoothedValues and an iterator wrapper that prints progress, time per iteration and ETA."""

    def __init__(self, delimiter: str = "  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            self.meters[k].update(v.item() if torch.is_tensor(v) else float(v))

    def __getattr__(self, attr):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'MetricLogger' object has no attribute {attr!r}")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq: int, header: str = ""):
        n = len(iterable)
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        width = len(str(n))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i - 1)))
                mem = (f"  max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
                       if torch.cuda.is_available() else "")
                print_main(f"{header} [{i:>{width}}/{n}]  eta: {eta}  {self}  "
                           f"time: {iter_time}  data: {data_time}{mem}")
            end = time.time()
        total = time.time() - start
        print_main(f"{header} Total time: {datetime.timedelta(seconds=int(total))} ({total / max(n, 1):.4f} s / it)")


def logged_epochs(output_dir: str) -> set:
    """The epochs that output_dir/log.txt has a line for (empty without the file)."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isfile(path):
        return set()
    epochs = set()
    with open(path) as f:
        for line in f:
            try:
                epochs.add(json.loads(line)["epoch"])
            except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write, or not ours
                continue
    return epochs


def append_log(output_dir: str, stats: dict) -> None:
    """Append one JSON object to output_dir/log.txt on rank 0."""
    if is_main_process() and output_dir:
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(stats) + "\n")


def git_description() -> str:
    """sha and dirty state of the code, for the log (empty outside a git checkout)."""
    cwd = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD"], cwd=cwd, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"sha: {sha}{', uncommitted changes' if dirty else ''}" if sha else ""

