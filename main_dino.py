"""DINO self-supervised training (Caron et al., ICCV 2021).

    # one CPU or one GPU, no launcher
    python main_dino.py --arch vit_small --data_path /path/to/imagenet/train --output_dir /path/to/saving_dir
    # 8 GPUs on one node
    torchrun --nproc_per_node=8 main_dino.py --arch vit_small --data_path /path/to/imagenet/train \
        --output_dir /path/to/saving_dir
    # the 2-minute CPU demo on Fashion-MNIST: see `make demo`
    # HIPT's region-level DINO on folders of tile-feature grids (tools/extract_region_features.py writes them)
    python main_dino.py --arch vit4k_xs --data_path /path/to/region_features --output_dir /path/to/saving_dir

Training resumes from output_dir/checkpoint.pth when it exists.
"""
import argparse
import dataclasses
import datetime
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import utils
from vision_transformer import DINOV2_ARCHS, VIT_ARCHS, DINOHead, build_model

PATCH_SIZE = 16  # --patch_size of the DINO ViTs when not given (DINOv2 archs: 14)
CROPS_SIZE = (224, 96)  # --global_crops_size and --local_crops_size when not given (region archs: 14 and 6 cells)


@dataclasses.dataclass(frozen=True)
class Objectives:
    """What the step optimises beside the original's [CLS] loss: DINOv2's objectives, all off by default.

    centering: how the teacher's outputs become targets, `centering` (the original's) or `sinkhorn_knopp`;
    ibot_loss_weight: iBOT's masked-patch loss, on mask_sample_probability of the global crops with a masked
    share in mask_ratio_min_max; koleo_loss_weight: KoLeo on the student's backbone [CLS] of each global crop.
    """
    centering: str = "centering"
    ibot_loss_weight: float = 0.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple = (0.1, 0.5)
    koleo_loss_weight: float = 0.0

    @classmethod
    def from_args(cls, args) -> "Objectives":
        return cls(args.centering, args.ibot_loss_weight, args.mask_sample_probability,
                   tuple(args.mask_ratio_min_max), args.koleo_loss_weight)

    @property
    def ibot(self) -> bool:
        return self.ibot_loss_weight > 0

    @property
    def koleo(self) -> bool:
        return self.koleo_loss_weight > 0


class DINO:
    """What one iteration of the paper's Algorithm 1 updates: the student (by its optimizer), the teacher (by EMA)
    and the losses' centers, with the precision they run in (autocast and the fp16 GradScaler). With DINOv2's
    objectives on, the same step also masks patches of the student's global crops (iBOT) and spreads its [CLS]
    features (KoLeo)."""

    def __init__(self, student, teacher, teacher_without_ddp, dino_loss, optimizer, autocast: dict, fp16_scaler,
                 clip_grad: float, freeze_last_layer: int, objectives: Objectives = Objectives(),
                 ibot_patch_loss: utils.iBOTPatchLoss = None, mask_generator: utils.MaskingGenerator = None):
        self.student, self.teacher, self.teacher_without_ddp = student, teacher, teacher_without_ddp
        self.dino_loss, self.optimizer = dino_loss, optimizer
        self.autocast, self.fp16_scaler = autocast, fp16_scaler
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        self.objectives = objectives
        self.ibot_patch_loss, self.mask_generator = ibot_patch_loss, mask_generator
        self.koleo_loss = utils.KoLeoLoss() if objectives.koleo else None
        self.layout = None  # checkpoint_layout of the flags that built it (DINO.build): what a resume must match

    @classmethod
    def build(cls, args, dist_env: utils.Distributed) -> "DINO":
        """main_dino's networks, losses, optimizer and precision for these flags, on dist_env.device."""
        student, teacher, teacher_without_ddp = build_networks(args, dist_env)
        dino_loss = utils.DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                                   args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs)
        # fused AdamW: one kernel for all parameters (on CUDA, GradScaler then skips inf steps without a host
        # sync; on CPU the foreach update runs one small op per tensor, 15% of vit_tiny/7's step at 28 pixels)
        optimizer = utils.build_optimizer(args.optimizer, build_params_groups(student, args),
                                          fused=dist_env.device.type in ("cuda", "cpu"))
        autocast, fp16_scaler = build_precision(args, dist_env.device)
        objectives = Objectives.from_args(args)
        ibot_patch_loss = mask_generator = None
        if objectives.ibot:
            ibot_patch_loss = utils.iBOTPatchLoss(ibot_out_dim(args)).to(dist_env.device)
            mask_generator = utils.mask_generator_for(args.global_crops_size, args.patch_size)
        dino = cls(student, teacher, teacher_without_ddp, dino_loss.to(dist_env.device), optimizer, autocast,
                   fp16_scaler, args.clip_grad, args.freeze_last_layer, objectives, ibot_patch_loss, mask_generator)
        dino.layout = checkpoint_layout(args)
        return dino

    def train_step(self, images: list, epoch: int, momentum: float, teacher_temp: float) -> dict:
        """One iteration of the paper's Algorithm 1 on crops already on the device. Returns, by name and left on
        the device (no host sync), the loss, each of its weighted terms (they sum to it) and the collapse
        diagnostics (utils.teacher_diagnostics; the iBOT head's beside them)."""
        masks = self.draw_masks(len(images[0]), images[0].device) if self.objectives.ibot else None
        with torch.autocast(**self.autocast):
            with torch.no_grad():
                teacher_probs, teacher_patch_probs = self.teacher_targets(images[:2], masks, teacher_temp)
            loss, terms = self.student_loss(images, masks, teacher_probs, teacher_patch_probs)

        # student update
        self.optimizer.zero_grad(set_to_none=True)
        self.fp16_scaler.scale(loss).backward()
        if self.clip_grad:
            self.fp16_scaler.unscale_(self.optimizer)  # unscale the gradients in place before clipping them
            utils.clip_gradients(self.student, self.clip_grad)
        utils.cancel_gradients_last_layer(epoch, self.student, self.freeze_last_layer)
        self.fp16_scaler.step(self.optimizer)
        self.fp16_scaler.update()

        # EMA update for the teacher
        utils.update_teacher(self.student.module, self.teacher_without_ddp, momentum)
        dino_part = terms["dino_global_crops_loss"] + terms.get("dino_local_crops_loss", 0)
        metrics = {"loss": loss.detach(), **terms, **utils.teacher_diagnostics(teacher_probs, dino_part)}
        if masks is not None:
            entropy, batch_entropy = (utils.teacher_entropies(teacher_patch_probs) if masks["n_masked"] else
                                      teacher_patch_probs.new_zeros(2))  # no masked patch in this step
            metrics.update(ibot_teacher_entropy=entropy, ibot_teacher_batch_entropy=batch_entropy)
        return metrics

    def draw_masks(self, batch_size: int, device: torch.device) -> dict:
        """iBOT's masks of this step's 2 x batch_size global crops (utils.collate_masks, drawn from Python's random
        as DINOv2's collate does), on device; n_masked, the number of masked patches, stays on the host."""
        grid = self.mask_generator.get_shape()
        objectives = self.objectives
        masks = utils.collate_masks(2 * batch_size, grid[0] * grid[1], objectives.mask_ratio_min_max,
                                    objectives.mask_sample_probability, self.mask_generator)
        n_masked = len(masks["mask_indices_list"])
        pin = device.type == "cuda"  # pinned: the copies do not wait for the GPU
        masks = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in masks.items()}
        return {**masks, "n_masked": n_masked}

    @torch.no_grad()
    def teacher_targets(self, global_crops: list, masks: dict, teacher_temp: float) -> tuple:
        """The teacher's [CLS] distributions of the 2 global crops and, with iBOT, its patch distributions at the
        positions the student's masks hide (None without): centred and sharpened (the centers then move on), or
        Sinkhorn-Knopp's. The teacher sees the crops unmasked."""
        if masks is None:
            cls, patch = self.teacher(global_crops), None  # only the 2 global views pass through the teacher
        else:
            out = self.teacher(global_crops, patch_index=masks["mask_indices_list"])
            cls, patch = out["cls"], out["patch"]
        if self.objectives.centering == "sinkhorn_knopp":
            probs = self.dino_loss.sinkhorn_knopp_teacher(cls, teacher_temp)
            patch_probs = None if patch is None else self.ibot_patch_loss.sinkhorn_knopp_teacher(
                patch, teacher_temp, masks["n_masked_patches"])
            return probs, patch_probs
        # the original's: centre, then sharpen; the centers' EMA then takes in this batch
        probs = self.dino_loss.softmax_center_teacher(cls, teacher_temp)
        self.dino_loss.update_center(cls)
        patch_probs = None
        if patch is not None:
            patch_probs = self.ibot_patch_loss.softmax_center_teacher(patch, teacher_temp)
            self.ibot_patch_loss.update_center(patch)
        return probs, patch_probs

    def student_loss(self, images: list, masks: dict, teacher_probs, teacher_patch_probs) -> tuple:
        """(the loss to minimise, its terms by DINOv2's names, detached). The [CLS] term is the original's mean over
        (teacher crop, other student crop) pairs; iBOT's and KoLeo's add with DINOv2's factors and the flags'
        weights."""
        objectives = self.objectives
        inputs = {}
        if masks is not None:  # the student's global crops masked, its patch outputs where they are
            inputs.update(masks=masks["collated_masks"], patch_index=masks["mask_indices_list"])
        if objectives.koleo:
            inputs["backbone_cls"] = True
        out = self.student(images, **inputs)
        student_cls = out["cls"] if inputs else out
        loss, terms = self.dino_loss.cross_entropy_terms(student_cls, teacher_probs)
        if objectives.koleo:
            # per global crop, among the process's images: DINOv2 does not compare the 2 crops of an image
            koleo = objectives.koleo_loss_weight * sum(self.koleo_loss(c) for c in out["backbone_cls"].chunk(2))
            loss = loss + koleo
            terms["koleo_loss"] = koleo.detach()
        if masks is not None:
            # DINOv2 scales the masked-patch loss by 2 (both global crops in one call) and by 1 / 2 (per global
            # crop): a factor of 1. forward_masked already averages over the 2 x B crops.
            ibot = objectives.ibot_loss_weight * self.ibot_patch_loss.forward_masked(
                out["patch"], teacher_patch_probs, student_masks_flat=masks["collated_masks"],
                masks_weight=masks["masks_weight"])
            loss = loss + ibot
            terms["ibot_loss"] = ibot.detach()
        return loss, terms

    @property
    def precision(self) -> str:
        """What the step computes in: 'bf16' (autocast), 'fp16' (autocast and loss scaling) or 'fp32'."""
        if not self.autocast["enabled"]:
            return "fp32"
        return "bf16" if self.autocast["dtype"] == torch.bfloat16 else "fp16"

    def state_dict(self) -> dict:
        """The checkpoint's student, teacher, optimizer, dino_loss and, with fp16, fp16_scaler entries; with iBOT,
        ibot_patch_loss (its center)."""
        state = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "dino_loss": self.dino_loss.state_dict()}
        if self.fp16_scaler.is_enabled():
            state["fp16_scaler"] = self.fp16_scaler.state_dict()
        if self.ibot_patch_loss is not None:
            state["ibot_patch_loss"] = self.ibot_patch_loss.state_dict()
        return state

    def resume(self, ckp_path: str) -> dict:
        """Load the networks, optimizer, loss scale and center from ckp_path if it exists; return the checkpoint.

        Checkpoints of the original code load too (its parameter order, `args` as a Namespace). A change of
        precision or device is accepted and said; another architecture or out_dim is one line naming the shapes,
        a change of the options that shape the checkpoint (iBOT, its head, LayerScale) one line naming the flag.
        """
        scaler_on = self.fp16_scaler.is_enabled()
        checkpoint = utils.restart_from_checkpoint(
            ckp_path, optional=("fp16_scaler",), check=self.check_layout, student=self.student,
            teacher=self.teacher, optimizer=self.optimizer, params_of=("student", self.student),
            fp16_scaler=self.fp16_scaler if scaler_on else None, dino_loss=self.dino_loss,
            ibot_patch_loss=self.ibot_patch_loss)
        if not checkpoint:
            return checkpoint
        device = self.dino_loss.center.device
        precision = self.precision
        if "fp16_scaler" in checkpoint and not scaler_on:
            utils.print_main(f"{ckp_path} was trained with fp16 loss scaling; this run trains in {precision} on "
                             f"{device.type}, without it")
        elif "fp16_scaler" not in checkpoint and scaler_on:
            utils.print_main(f"{ckp_path} was trained without fp16 loss scaling (CPU, bf16 or fp32); this run uses "
                             f"it, from the initial loss scale")
        saved_args = vars(checkpoint["args"]) if isinstance(checkpoint.get("args"), argparse.Namespace) \
            else checkpoint.get("args") or {}
        saved_device = str(saved_args.get("device", "cuda"))  # the original trained on GPUs only
        if saved_device.split(":")[0] != device.type:
            utils.print_main(f"{ckp_path} was written on {saved_device}; resuming on {device}")
        return checkpoint

    def check_layout(self, checkpoint: dict) -> None:
        """InputError when the checkpoint was trained with options that give it other keys than this run's."""
        if self.layout is None:
            return
        saved = checkpoint_layout(saved_args_of(checkpoint))
        for option, value in self.layout.items():
            if saved[option] != value:
                raise utils.InputError(
                    f"checkpoint.pth in this --output_dir was trained with {option} {saved[option]}, this run has "
                    f"{value}: its networks have other keys; resume with its flags, or give another --output_dir")


def saved_args_of(checkpoint: dict) -> dict:
    """The flags a checkpoint was trained with, as a dict (the original's pickle an argparse.Namespace)."""
    args = checkpoint.get("args")
    return vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})


def checkpoint_layout(args) -> dict:
    """The options that decide a checkpoint's keys beyond --arch and --out_dim, as words, for flags args (a
    Namespace or the dict of a checkpoint; a flag the original did not have takes its default, off)."""
    get = args.get if isinstance(args, dict) else lambda name, default: getattr(args, name, default)
    ibot = float(get("ibot_loss_weight", 0)) > 0
    separate = ibot and bool(get("ibot_separate_head", False))
    dinov2 = get("arch", "") in DINOV2_ARCHS  # the published layout: LayerScale always
    return {"iBOT (--ibot_loss_weight > 0: a mask_token and the patch loss's center)": "on" if ibot else "off",
            "--ibot_separate_head": "true" if separate else "false",
            "--ibot_out_dim": (get("ibot_out_dim", None) or get("out_dim", 65536)) if separate else "(none)",
            "LayerScale (--layerscale > 0)": "on" if dinov2 or float(get("layerscale", 0)) > 0 else "off"}


def build_networks(args, dist_env: utils.Distributed):
    """Student and teacher: same backbone and DINO head (and iBOT head, when it has its own), the teacher a copy
    of the student that gets no gradient. With --pretrained_weights, the backbones start from that file."""
    options = dict(layerscale=args.layerscale, drop_path_uniform=args.drop_path_uniform,
                   mask_token=args.ibot_loss_weight > 0,  # only iBOT's student masks patches: DINO keeps its keys
                   region_in_dim=args.region_in_dim)
    student = build_model(args.arch, patch_size=args.patch_size, drop_path_rate=args.drop_path_rate, **options)
    teacher = build_model(args.arch, patch_size=args.patch_size, **options)
    if args.pretrained_weights:
        load_pretrained_backbone(student, args)
    embed_dim = student.embed_dim
    student = utils.MultiCropWrapper(student, DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                                                       norm_last_layer=args.norm_last_layer),
                                     ibot_head=build_ibot_head(embed_dim, args, norm_last_layer=args.norm_last_layer))
    teacher = utils.MultiCropWrapper(teacher, DINOHead(embed_dim, args.out_dim, args.use_bn_in_head),
                                     ibot_head=build_ibot_head(embed_dim, args))
    student, teacher = student.to(dist_env.device), teacher.to(dist_env.device)

    if utils.has_batchnorms(student):
        if dist_env.world_size > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        teacher = utils.wrap_ddp(teacher, dist_env)  # the teacher's batch norms need synchronising too
        teacher_without_ddp = teacher.module
    else:
        teacher_without_ddp = teacher
    student = utils.wrap_ddp(student, dist_env)  # DDP, or a stand-in with the same `module.` keys
    teacher_without_ddp.load_state_dict(student.module.state_dict())  # teacher and student start equal
    for p in teacher.parameters():
        p.requires_grad = False
    if args.compile:
        for model in (student.module, teacher_without_ddp):
            model.compile_parts()
    utils.print_main(f"Student and Teacher are built: they are both {args.arch} network.")
    return student, teacher, teacher_without_ddp


def ibot_out_dim(args) -> int:
    """Prototypes of iBOT's patch loss: --ibot_out_dim with a head of its own, else the shared head's --out_dim."""
    return (args.ibot_out_dim or args.out_dim) if args.ibot_separate_head else args.out_dim


def build_ibot_head(embed_dim: int, args, norm_last_layer: bool = True):
    """iBOT's own head (--ibot_separate_head: a DINO head of --ibot_out_dim prototypes), or None: the DINO head
    serves the patches too, as DINOv2's default."""
    if args.ibot_loss_weight > 0 and args.ibot_separate_head:
        return DINOHead(embed_dim, ibot_out_dim(args), use_bn=args.use_bn_in_head, norm_last_layer=norm_last_layer)
    return None


def load_pretrained_backbone(backbone: nn.Module, args) -> None:
    """--pretrained_weights into the student's backbone before the teacher copies it (a fresh run only: a resumed
    run takes its checkpoint). The file holds a backbone (published weights, or a checkpoint's --checkpoint_key):
    the heads start fresh, and iBOT's mask token from zeros where the file has none."""
    if os.path.isfile(os.path.join(args.output_dir, "checkpoint.pth")):
        utils.print_main(f"--pretrained_weights {args.pretrained_weights} not loaded: the run resumes from "
                         f"{os.path.join(args.output_dir, 'checkpoint.pth')}")
        return
    state_dict = utils.extract_backbone_state_dict(utils.torch_load(args.pretrained_weights), args.checkpoint_key,
                                                   args.pretrained_weights)
    fresh = []
    if getattr(backbone, "mask_token", None) is not None and "mask_token" not in state_dict:
        state_dict["mask_token"] = backbone.mask_token.detach().clone()
        fresh.append("iBOT's mask_token")
    utils.load_state_dict_strict(backbone, state_dict, f"--pretrained_weights {args.pretrained_weights}")
    fresh = ", ".join(["the DINO head"] + (["the iBOT head"] if build_ibot_head(1, args) else []) + fresh)
    utils.print_main(f"Backbone weights loaded from {args.pretrained_weights} (key {args.checkpoint_key!r}); it "
                     f"holds a backbone only: {fresh} start from scratch")


def build_params_groups(student: nn.Module, args) -> list:
    """The optimizer's parameter groups: the original's two (get_params_groups: weights with weight decay, then
    biases and 1-D parameters without) unless --layerwise_decay or --patch_embed_lr_mult ask for DINOv2's
    per-parameter multipliers, fused into one group per (lr, wd multiplier, last layer)."""
    if args.layerwise_decay == 1 and args.patch_embed_lr_mult == 1:
        return utils.get_params_groups(student)
    return utils.fuse_params_groups(utils.get_params_groups_with_decay(
        student.module, lr_decay_rate=args.layerwise_decay, patch_embed_lr_mult=args.patch_embed_lr_mult))


def build_precision(args, device: torch.device):
    """torch.autocast's arguments and the GradScaler: bf16 (no scaling), fp16 with scaling (CUDA only) or fp32."""
    on_cuda = device.type == "cuda"
    use_bf16 = args.use_bf16
    if use_bf16 == "auto":
        units = ("bfloat16 support" if torch.cuda.is_bf16_supported() else "") if on_cuda else utils.cpu_bf16_units()
        use_bf16 = bool(units)
        utils.print_main(f"--use_bf16 auto: {device.type} " + (f"has {units}: training in bf16" if use_bf16 else
                         "has no bfloat16 matrix units: bf16 would be slower, --use_bf16 false"))
    if use_bf16 and on_cuda and not torch.cuda.is_bf16_supported():
        raise utils.InputError("--use_bf16 true: this GPU has no bfloat16 support; use --use_fp16 true instead")
    if use_bf16 and not on_cuda and not utils.cpu_bf16_units():
        utils.print_main("--use_bf16 true: this CPU has no bfloat16 matrix units (AMX, AVX512-BF16): bf16 is emulated "
                         "and may train slower than fp32")
    if args.use_fp16 and not use_bf16 and not on_cuda:
        utils.print_main("--use_fp16 applies to CUDA only: training in fp32 on CPU")
    autocast = dict(device_type=device.type, dtype=torch.bfloat16 if use_bf16 else torch.float16,
                    enabled=use_bf16 or (args.use_fp16 and on_cuda))
    fp16_scaler = torch.amp.GradScaler("cuda", enabled=args.use_fp16 and not use_bf16 and on_cuda)
    return autocast, fp16_scaler


class Schedules:
    """Per-iteration values of the paper's schedules: learning rate (linear warmup, then cosine; scaled by the
    total batch / 256), weight decay (cosine), teacher momentum (cosine to 1, or --momentum_teacher_end) and
    teacher temperature (linear warmup over --warmup_teacher_temp_epochs, then constant; one value per epoch)."""

    def __init__(self, lr, weight_decay, momentum, teacher_temp):
        self.lr, self.weight_decay, self.momentum, self.teacher_temp = lr, weight_decay, momentum, teacher_temp

    @classmethod
    def build(cls, args, world_size: int, niter_per_epoch: int) -> "Schedules":
        lr = utils.cosine_scheduler(args.lr * (args.batch_size_per_gpu * world_size) / 256., args.min_lr,
                                    args.epochs, niter_per_epoch, warmup_epochs=args.warmup_epochs)
        weight_decay = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter_per_epoch)
        # momentum parameter is increased to 1. (--momentum_teacher_end) during training with a cosine schedule
        momentum = utils.cosine_scheduler(args.momentum_teacher, args.momentum_teacher_end, args.epochs,
                                          niter_per_epoch)
        teacher_temp = np.repeat(utils.teacher_temp_schedule(args.warmup_teacher_temp, args.teacher_temp,
                                                             args.warmup_teacher_temp_epochs, args.epochs),
                                 niter_per_epoch)
        return cls(lr, weight_decay, momentum, teacher_temp)

    def apply(self, optimizer, it: int) -> tuple:
        """Set iteration it's learning rate and weight decay in the optimizer; return its (teacher momentum,
        teacher temperature). The original's groups: the weight decay in the first only (the other is not
        regularized). DINOv2's groups: both times each group's lr_multiplier and wd_multiplier. Python floats:
        the checkpoint stays weights_only-loadable."""
        lr, weight_decay = float(self.lr[it]), float(self.weight_decay[it])
        for j, param_group in enumerate(optimizer.param_groups):
            if "lr_multiplier" in param_group:
                param_group["lr"] = lr * param_group["lr_multiplier"]
                param_group["weight_decay"] = weight_decay * param_group["wd_multiplier"]
                continue
            param_group["lr"] = lr
            if j == 0:
                param_group["weight_decay"] = weight_decay
        return float(self.momentum[it]), float(self.teacher_temp[it])


def train_one_epoch(dino: DINO, data_loader, crops_of, schedules: Schedules, epoch: int, args) -> dict:
    """One epoch of DINO steps; returns the epoch's average of every value train_step names (the loss and the
    collapse diagnostics, see utils.teacher_diagnostics), then lr and weight decay, over all processes."""
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = f"Epoch: [{epoch}/{args.epochs}]"
    pending = []  # step values stay on the device until the next log line: no host sync per step
    collapse = utils.CollapseCounter(args.out_dim)
    last = len(data_loader) - 1
    for i, (images, _) in enumerate(metric_logger.log_every(data_loader, args.log_freq, header)):
        it = len(data_loader) * epoch + i  # global training iteration
        momentum, teacher_temp = schedules.apply(dino.optimizer, it)
        pending.append(dino.train_step(crops_of(images), epoch, momentum, teacher_temp))

        if i % args.log_freq == 0 or i == last:
            names = list(pending[0])
            values = torch.stack([torch.stack([step[k].double() for k in names]) for step in pending])
            check_losses_finite(values[:, names.index("loss")], args)
            for row in values.tolist():  # one host sync for the steps since the last log line
                step = dict(zip(names, row))
                metric_logger.update(**step)
                collapse.add(step["teacher_entropy"], step["teacher_batch_entropy"])
            pending.clear()
            # the schedules' values: with --layerwise_decay the first group's lr is that of the decayed embeddings
            metric_logger.update(lr=schedules.lr[it], wd=schedules.weight_decay[it])
    metric_logger.synchronize_between_processes()
    utils.print_main("Averaged stats:", metric_logger)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    warning = collapse.warning(epoch)
    if warning:
        utils.print_main(warning)
        stats["warning"] = warning
    return stats


def check_losses_finite(losses: torch.Tensor, args) -> None:
    """Stop every process if any recent loss is not finite; no checkpoint is written for this epoch."""
    bad = utils.all_reduce_sum((~torch.isfinite(losses)).sum().reshape(1).float())
    if bad.item() > 0:
        values = losses.tolist()
        utils.print_main(f"Loss is {values[-1]} (non-finite in {int(bad.item())} recent steps), stopping training; "
                         f"the last checkpoint in {args.output_dir} is left as it was")
        sys.exit(1)


def main(args):
    args = utils.resolve_patch_size(args, PATCH_SIZE)  # the arch's own when not given
    args = utils.resolve_crop_sizes(args, CROPS_SIZE)  # in cells for a region arch
    check_args(args)  # before the rendezvous: a typo must not wait for every process of the job to connect
    dist_env = utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    # batching the per-pixel augmentation steps pays where a GPU runs them; region grids have no per-pixel steps
    augmentation = args.augmentation if args.augmentation != "auto" else \
        "gpu" if dist_env.device.type == "cuda" and not utils.is_region_arch(args.arch) else "cpu"
    utils.print_main(utils.git_description())
    utils.print_main("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    utils.print_main(f"augmentation on: {augmentation}")
    torch.backends.cudnn.benchmark = True
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # ============ preparing data ... ============
    data_loader = build_data_loader(args, dist_env, augmentation)
    crops_of = crops_to_device(augmentation, dist_env.device)
    knn_loaders = build_knn_loaders(args, dist_env)

    # ============ building student and teacher networks, loss, optimizer and precision ... ============
    dino = DINO.build(args, dist_env)

    # ============ init schedulers ... ============
    schedules = Schedules.build(args, dist_env.world_size, len(data_loader))
    utils.print_main("Loss, optimizer and schedulers ready.")

    # ============ optionally resume training ... ============
    checkpoint = dino.resume(os.path.join(args.output_dir, "checkpoint.pth"))
    start_epoch = checkpoint.get("epoch", 0)
    append_missing_log_line(checkpoint, knn_loaders, dino, args, dist_env)

    start_time = time.time()
    knn_init = {}
    if knn_loaders and start_epoch == 0:  # the same backbone with its random weights: the baseline to beat
        knn_init = {f"{k}_init": v for k, v in
                    knn_monitor(dino.teacher_without_ddp.backbone, knn_loaders, args, dist_env).items()}
    utils.print_main("Starting DINO training !")
    for epoch in range(start_epoch, args.epochs):
        data_loader.sampler.set_epoch(epoch)

        # ============ training one epoch of DINO ... ============
        epoch_start = time.time()
        train_stats = train_one_epoch(dino, data_loader, crops_of, schedules, epoch, args)
        epoch_time = time.time() - epoch_start

        # ============ writing logs ... ============
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "ln_out_dim": math.log(args.out_dim),
                     "epoch": epoch, "precision": dino.precision,
                     "time": round(epoch_time, 2),
                     "images_per_s": round(len(data_loader) * args.batch_size_per_gpu * dist_env.world_size /
                                           epoch_time, 1),
                     "skipped_images": data_loader.dataset.num_skipped(), **knn_init}
        knn_init = {}
        save_dict = {
            **dino.state_dict(),
            "epoch": epoch + 1,
            "args": checkpoint_args(args, dist_env),
            "log": log_stats,  # the epoch's log line so far: a run stopped before it reaches log.txt writes it
        }
        utils.save_on_master(save_dict, os.path.join(args.output_dir, "checkpoint.pth"))
        if args.saveckp_freq and epoch % args.saveckp_freq == 0:
            utils.save_on_master(save_dict, os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"))
        if knn_due(epoch, knn_loaders, args):
            log_stats.update(knn_monitoring(dino, knn_loaders, args, dist_env))
        utils.append_log(args.output_dir, log_stats)

    total_time = time.time() - start_time
    utils.print_main(f"Training time {datetime.timedelta(seconds=int(total_time))}")
    utils.print_main(f"Checkpoint: {os.path.join(args.output_dir, 'checkpoint.pth')}  "
                     f"log: {os.path.join(args.output_dir, 'log.txt')}")
    utils.shutdown_distributed()


def build_data_loader(args, dist_env: utils.Distributed, augmentation: str):
    """Workers yield crops ready for the network (augmentation cpu) or uint8 crops and their random parameters,
    which utils.MultiCropOnDevice turns into the same crops on the device (augmentation gpu). A region arch reads
    grids of tile features and crops them as HIPT does (utils.RegionMultiCrop)."""
    if utils.is_region_arch(args.arch):
        transform = utils.RegionMultiCrop(args.global_crops_size, args.local_crops_size, args.local_crops_number)
        crops = [args.global_crops_size] + ([args.local_crops_size] if args.local_crops_number else [])
        dataset = utils.RegionFeatureDataset(args.data_path, args.region_in_dim, transform, min_side=max(crops))
    else:
        crop_args = (args.global_crops_scale, args.local_crops_scale, args.local_crops_number, args.global_crops_size,
                     args.local_crops_size)
        if augmentation == "gpu":
            transform = utils.MultiCropGeometry(*crop_args)
        else:
            transform = utils.DataAugmentationDINO(*crop_args)
        dataset = utils.image_dataset(args.data_path, transform=transform)  # an ImageFolder, or a tar with its entries
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist_env.world_size, rank=dist_env.rank,
                                                  shuffle=True, seed=args.seed)
    data_loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
        pin_memory=dist_env.device.type == "cuda", drop_last=True, persistent_workers=args.num_workers > 0)
    if len(data_loader) == 0:
        raise utils.InputError(f"--data_path {args.data_path} has {len(dataset)} images, fewer than one batch "
                               f"(--batch_size_per_gpu {args.batch_size_per_gpu} x {dist_env.world_size} processes)")
    utils.print_main(f"Data loaded: there are {len(dataset)} images.")
    return data_loader


def crops_to_device(augmentation: str, device: torch.device):
    """What turns a batch of the loader into the list of crops on the device."""
    if augmentation == "gpu":  # (uint8 crops, their random parameters) from the workers
        augment = utils.MultiCropOnDevice(device)
        return lambda images: augment(*images)
    return lambda images: [im.to(device, non_blocking=True) for im in images]


def build_knn_loaders(args, dist_env: utils.Distributed):
    """(train, val) feature loaders of --knn_data_path for the k-NN monitoring, or None when it is off. Their
    workers persist between epochs: starting them again each time would cost more than a small split's pass."""
    if not args.knn_data_path:
        return None
    if utils.is_region_arch(args.arch):  # the region [CLS] of whole grids
        datasets = utils.build_region_eval_datasets(args.knn_data_path, args.region_in_dim)
    else:
        transform = utils.eval_transform(args.resize_size, args.crop_size)
        datasets = utils.build_eval_datasets(args.knn_data_path, transform, transform)
    return tuple(utils.feature_loader(dataset, args.knn_batch_size, args.num_workers, dist_env.device, persistent=True)
                 for dataset in datasets)


def knn_due(epoch: int, knn_loaders, args) -> bool:
    """Whether the k-NN monitoring runs after this epoch: every --knn_freq epochs and after the last."""
    return bool(knn_loaders) and ((epoch + 1) % args.knn_freq == 0 or epoch == args.epochs - 1)


def knn_monitor(backbone, knn_loaders, args, dist_env: utils.Distributed, who: str = "teacher") -> dict:
    """Weighted k-NN top-1/top-5 (percent) of the backbone's features on --knn_data_path, as eval_knn.py computes."""
    train, val = knn_loaders
    was_training = backbone.training
    backbone.eval()
    device = dist_env.device
    bank, bank_labels = utils.extract_features(backbone, train, device, device)
    queries, labels = utils.extract_features(backbone, val, device, device)
    backbone.train(was_training)
    results = utils.knn_classifier(bank, bank_labels, queries, labels, [args.knn_k], args.knn_temperature,
                                   len(train.dataset.classes), rank=dist_env.rank, world_size=dist_env.world_size)
    top1, top5 = results[args.knn_k]
    utils.print_main(f"k-NN monitoring of the {who} ({args.knn_k}-NN on {args.knn_data_path}): top-1 {top1:.2f}, "
                     f"top-5 {top5:.2f}")
    return {"knn_top1": top1, "knn_top5": top5}


def knn_monitoring(dino: DINO, knn_loaders, args, dist_env: utils.Distributed) -> dict:
    """The teacher's k-NN (knn_top1, knn_top5) and, with --knn_student, the student's (knn_student_top1, ...)."""
    stats = knn_monitor(dino.teacher_without_ddp.backbone, knn_loaders, args, dist_env)
    if args.knn_student:
        student = knn_monitor(dino.student.module.backbone, knn_loaders, args, dist_env, who="student")
        stats.update({k.replace("knn_", "knn_student_"): v for k, v in student.items()})
    return stats


def append_missing_log_line(checkpoint: dict, knn_loaders, dino: DINO, args, dist_env: utils.Distributed) -> None:
    """Write the log line of the checkpoint's epoch if log.txt lacks it (a run stopped after its checkpoint).

    The checkpoint keeps the line as it was before the k-NN monitoring; the monitoring is run again on the
    checkpoint's networks, which are the ones it would have measured. Every process takes part in the k-NN, so
    rank 0's reading of log.txt decides for all.
    """
    line = checkpoint.get("log")
    if not line:
        return
    missing = utils.is_main_process() and line["epoch"] not in utils.logged_epochs(args.output_dir)
    if not utils.all_reduce_sum(torch.tensor([float(missing)])).item():
        return
    line = dict(line)
    if knn_due(line["epoch"], knn_loaders, args):
        line.update(knn_monitoring(dino, knn_loaders, args, dist_env))
    utils.append_log(args.output_dir, line)
    utils.print_main(f"log.txt had no line for epoch {line['epoch']} (the run stopped after its checkpoint): "
                     f"written from the checkpoint")


def checkpoint_args(args, dist_env: utils.Distributed) -> dict:
    """The flags, and what the run found (rank, world_size, gpu, device, as the original's args held), as a plain
    dict of builtins, so the checkpoint loads with weights_only=True."""
    found = {"rank": dist_env.rank, "world_size": dist_env.world_size, "gpu": dist_env.local_rank,
             "device": str(dist_env.device)}
    return {k: (v if isinstance(v, (int, float, str, bool, list, tuple, type(None))) else str(v))
            for k, v in {**vars(args), **found}.items()}


def get_args_parser():
    parser = argparse.ArgumentParser("DINO", add_help=False)

    # Model parameters
    utils.add_model_args(parser, patch_size=PATCH_SIZE)
    utils.add_region_args(parser)
    parser.add_argument("--out_dim", default=65536, type=int, help="""Output size of the DINO head (number of
        prototypes). Large values such as 65536 suit large, varied datasets like ImageNet; small ones need fewer.""")
    parser.add_argument("--norm_last_layer", default=True, type=utils.bool_flag, help="""Fix the norm of the
        head's last (weight-normalised) layer to 1. Leaving it free gives better features but may destabilise
        training; the paper's runs free it for vit_small and keep it fixed for vit_base.""")
    parser.add_argument("--momentum_teacher", default=0.996, type=float, help="""Starting EMA momentum of the
        teacher; it rises to 1 along a cosine over training. Use a higher value with small total batches
        (e.g. 0.9995 for a batch of 256).""")
    parser.add_argument("--momentum_teacher_end", default=1.0, type=float, help="""EMA momentum of the teacher
        at the end of training, reached along the same cosine (1: the original's schedule, the teacher stops
        moving at the end). In a run of a few hundred steps the last fifth of them barely moves a teacher headed
        for 1; ending at --momentum_teacher keeps it following the student to the end.""")
    parser.add_argument("--use_bn_in_head", default=False, type=utils.bool_flag,
                        help="Batch norms in the projection head's MLP (off by default).")

    # Temperature teacher parameters
    parser.add_argument("--warmup_teacher_temp", default=0.04, type=float, help="""Teacher temperature at the
        start of its linear warmup. 0.04 is a good value in most cases; lower it if the loss does not go down.""")
    parser.add_argument("--teacher_temp", default=0.04, type=float, help="""Teacher temperature after the
        warmup. Values above about 0.07 tend to be unstable; start from 0.04 and raise it slightly if needed.""")
    parser.add_argument("--warmup_teacher_temp_epochs", default=0, type=int,
                        help="Epochs of linear warmup of the teacher temperature (the paper's long runs use 30).")
    parser.add_argument("--centering", default="centering", choices=["centering", "sinkhorn_knopp"],
                        help="""How the teacher's outputs become its targets: `centering` (the original's:
        minus an EMA center, then softmax at the teacher temperature) or DINOv2's `sinkhorn_knopp` (3 Sinkhorn-Knopp
        iterations over the batch of all processes, which spread the images evenly over the prototypes; the center
        stays as it is).""")

    # DINOv2's objectives (Oquab et al. 2023, Sec. 4; every default leaves the original's run unchanged)
    parser.add_argument("--ibot_loss_weight", default=0.0, type=float, help="""Weight of iBOT's masked-patch loss
        (0: off, the original's; DINOv2 uses 1). The student sees some patches of its global crops replaced by a
        learnt mask token and predicts, through the head, the teacher's output for those patches of the unmasked
        crops. Needs a ViT.""")
    parser.add_argument("--mask_sample_probability", default=0.5, type=float,
                        help="Share of the global crops that get masks with iBOT (DINOv2: 0.5).")
    parser.add_argument("--mask_ratio_min_max", default=(0.1, 0.5), type=float, nargs=2, help="""Range of the share
        of patches masked in a masked crop; a batch's masked crops get shares spread evenly over it (DINOv2:
        0.1 0.5). Masks are unions of random rectangles, each at most half the patches.""")
    parser.add_argument("--ibot_separate_head", default=False, type=utils.bool_flag, help="""Give iBOT's patches a
        head of their own (with --ibot_out_dim prototypes) instead of sharing the DINO head, DINOv2's default.""")
    parser.add_argument("--ibot_out_dim", default=None, type=int, help="""Prototypes of iBOT's own head
        (--ibot_separate_head true); default: --out_dim.""")
    parser.add_argument("--koleo_loss_weight", default=0.0, type=float, help="""Weight of the KoLeo regulariser
        (0: off; DINOv2 uses 0.1), which spreads the student's backbone [CLS] features of each global crop over the
        sphere, per process, by pushing every feature away from its nearest neighbour in the batch.""")
    parser.add_argument("--layerwise_decay", default=1.0, type=float, help="""Layer-wise learning-rate decay of
        ViTs: block i of L trains at lr x decay^(L - i), the embeddings at decay^(L + 1), the rest (final norm,
        heads) at lr (1: off, the original's; DINOv2 uses 0.9).""")
    parser.add_argument("--patch_embed_lr_mult", default=1.0, type=float, help="""Extra learning-rate factor of
        the patch embedding (1: off; DINOv2 uses 0.2).""")
    parser.add_argument("--layerscale", default=0.0, type=float, help="""Starting value of a learnt per-channel
        scale of every residual branch of DINO's ViTs (0: none, the original's layout; DINOv2 uses 1e-5). The dinov2
        archs always have it, as published (from 1e-5 unless given).""")
    parser.add_argument("--drop_path_uniform", default=False, type=utils.bool_flag, help="""The same stochastic
        depth rate (--drop_path_rate) in every block, as DINOv2, instead of one growing linearly with depth.""")
    parser.add_argument("--pretrained_weights", default="", type=str, help="""Backbone weights to start from (a
        published file, e.g. DINOv2's for --arch dinov2_vits14, or a checkpoint, whose --checkpoint_key is read);
        the heads start fresh. Empty: from scratch. A run that resumes from its checkpoint.pth ignores it.""")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help="Key of --pretrained_weights to read when it is a full checkpoint.")

    # Training/Optimization parameters
    parser.add_argument("--use_fp16", type=utils.bool_flag, default=True, help="""Mixed precision (float16
        autocast with loss scaling) on CUDA; CPU runs are fp32. Faster and lighter, but it can make training
        unstable and cost a little accuracy: turn it off if the loss misbehaves, for smaller patches or larger ViTs.""")
    parser.add_argument("--use_bf16", type=utils.bool_or_auto_flag, default=False, help="""Autocast to bfloat16
        instead of float16 (no loss scaling needed; Ampere GPUs and newer, or CPUs). Takes precedence over
        --use_fp16. auto: bfloat16 where the hardware has bfloat16 matrix units (a GPU that supports it, a CPU with
        AMX or AVX512-BF16; on CPUs with AMX it trains about 2x faster than fp32), else as --use_fp16 says.""")
    parser.add_argument("--weight_decay", type=float, default=0.04, help="""Weight decay at the start of
        training; ViTs do well with a small value early on.""")
    parser.add_argument("--weight_decay_end", type=float, default=0.4, help="""Weight decay at the end of
        training, reached along a cosine; a larger final value helps ViTs.""")
    parser.add_argument("--clip_grad", type=float, default=3.0, help="""Clip each parameter's gradient to this
        norm (0 disables). Values between 0.3 and 1.0 can help larger ViTs.""")
    parser.add_argument("--batch_size_per_gpu", default=64, type=int,
                        help="Images per process (per GPU) in each batch.")
    parser.add_argument("--epochs", default=100, type=int, help="Number of epochs of training.")
    parser.add_argument("--freeze_last_layer", default=1, type=int, help="""Epochs at the start during which
        the head's last layer is not updated; increase it if the loss does not go down.""")
    parser.add_argument("--lr", default=0.0005, type=float, help="""Peak learning rate, reached at the end of the
        linear warmup, for a total batch of 256: it is scaled linearly with the total batch size.""")
    parser.add_argument("--warmup_epochs", default=10, type=float, help="""Epochs of linear learning-rate
        warmup; a fraction such as 0.5 serves short runs (the warmup is counted in iterations).""")
    parser.add_argument("--min_lr", type=float, default=1e-6, help="""Learning rate at the end of training,
        reached along a cosine after the warmup.""")
    parser.add_argument("--optimizer", default="adamw", type=str, choices=["adamw", "sgd", "lars"],
                        help="Optimizer; adamw for ViTs.")
    parser.add_argument("--drop_path_rate", type=float, default=0.1, help="Stochastic depth rate of the student.")
    parser.add_argument("--compile", type=utils.bool_flag, default=False, help="""torch.compile the student's
        and the teacher's backbone and head (static shapes: one graph per crop resolution). Costs a minute or two
        of compilation at the start of the run.""")

    # Multi-crop parameters
    parser.add_argument("--global_crops_scale", type=float, nargs="+", default=(0.4, 1.), help="""Range of the
        area fraction of the image covered by the 2 global crops before resizing. Without local crops
        (--local_crops_number 0) a wider range such as 0.14 1 works better. Images only: the crops of a region
        arch's grids are of fixed size (--global_crops_size), not a share of the grid.""")
    parser.add_argument("--local_crops_number", type=int, default=8, help="""Number of small local crops per
        image (multi-crop); 0 disables multi-crop.""")
    parser.add_argument("--local_crops_scale", type=float, nargs="+", default=(0.05, 0.4), help="""Range of the
        area fraction of the image covered by each local crop before resizing. Images only: it does not apply to a
        region arch's grids, whose crops are of fixed size (--local_crops_size).""")
    parser.add_argument("--global_crops_size", type=int, default=None, help=f"""Side in pixels of the global crops
        (default {CROPS_SIZE[0]}, ImageNet's; smaller for small images). For a region arch (vit4k_xs), in grid cells:
        default {utils.REGION_CROPS_SIZE[0]}, HIPT's crop of its 16 x 16 grids.""")
    parser.add_argument("--local_crops_size", type=int, default=None, help=f"""Side in pixels of the local crops
        (default {CROPS_SIZE[1]}, ImageNet's). For a region arch, in grid cells: default {utils.REGION_CROPS_SIZE[1]},
        HIPT's.""")
    parser.add_argument("--augmentation", default="auto", choices=["auto", "gpu", "cpu"], help="""Where the
        multi-crop augmentation runs. cpu: the original per-image PIL pipeline in the DataLoader workers. gpu:
        workers only decode and cut the crops; flip, colour jitter, grayscale, blur, solarization and normalisation
        run batched on the training device (on a machine without GPU, in the main process). auto: gpu on CUDA,
        cpu otherwise.""")

    # k-NN monitoring
    parser.add_argument("--knn_data_path", default="", type=str, help="""Folder with train/ and val/
        ImageFolders (e.g. a held-out split). Every --knn_freq epochs, and once before training, the teacher's
        backbone is evaluated with the weighted k-NN of eval_knn.py (train/ as the bank, val/ as the queries) and
        knn_top1/knn_top5 are written to log.txt. Off when empty.""")
    parser.add_argument("--knn_freq", default=1, type=int, help="k-NN monitoring every x epochs.")
    parser.add_argument("--knn_student", default=False, type=utils.bool_flag, help="""The k-NN monitoring also
        scores the student's backbone, logged as knn_student_top1/knn_student_top5. In short runs the teacher can
        lag the student (too slow an EMA: lower --momentum_teacher); only the two side by side show it.""")
    parser.add_argument("--knn_k", default=20, type=int, help="Neighbours of the k-NN monitoring.")
    parser.add_argument("--knn_temperature", default=0.07, type=float, help="Temperature of the k-NN vote.")
    parser.add_argument("--knn_batch_size", default=256, type=int, help="Batch size of the k-NN feature extraction.")
    utils.add_eval_size_args(parser)

    # Misc
    parser.add_argument("--data_path", default="/path/to/imagenet/train/", type=str,
                        help="""Folder of training images, one subfolder per class (the classes are not used), or an
        uncompressed .tar of them indexed by tools/infer_entries.py (D/pretrain_dataset.tar). For a region arch, a
        folder of region files ([n_tiles, --region_in_dim] tensors, tools/extract_region_features.py), with or
        without class subfolders.""")
    parser.add_argument("--output_dir", default=".", type=str, help="Where checkpoints and log.txt are written.")
    parser.add_argument("--saveckp_freq", default=20, type=int,
                        help="Keep a copy of the checkpoint every x epochs (0: never).")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    parser.add_argument("--log_freq", default=10, type=int,
                        help="Print (and check the loss is finite) every x iterations.")
    utils.add_distributed_args(parser)
    return parser


FLAG_DOMAINS = {
    **utils.MODEL_FLAG_DOMAINS, **utils.EVAL_SIZE_FLAG_DOMAINS, **utils.DISTRIBUTED_FLAG_DOMAINS,
    **utils.REGION_FLAG_DOMAINS,
    "out_dim": utils.AT_LEAST_ONE, "momentum_teacher": utils.Domain(0, 1),
    "momentum_teacher_end": utils.Domain(0, 1),
    "warmup_teacher_temp": utils.POSITIVE, "teacher_temp": utils.POSITIVE,
    "warmup_teacher_temp_epochs": utils.NON_NEGATIVE, "weight_decay": utils.NON_NEGATIVE,
    "weight_decay_end": utils.NON_NEGATIVE, "clip_grad": utils.NON_NEGATIVE,
    "batch_size_per_gpu": utils.AT_LEAST_ONE, "epochs": utils.AT_LEAST_ONE, "freeze_last_layer": utils.NON_NEGATIVE,
    "lr": utils.POSITIVE, "warmup_epochs": utils.NON_NEGATIVE, "min_lr": utils.NON_NEGATIVE,
    "drop_path_rate": utils.Domain(0, 1, high_inclusive=False),  # a rate of 1 would drop every residual branch
    "global_crops_scale": utils.FRACTION, "local_crops_scale": utils.FRACTION,
    "local_crops_number": utils.NON_NEGATIVE, "global_crops_size": utils.AT_LEAST_ONE,
    "local_crops_size": utils.AT_LEAST_ONE, "knn_freq": utils.AT_LEAST_ONE, "knn_k": utils.AT_LEAST_ONE,
    "knn_temperature": utils.POSITIVE, "knn_batch_size": utils.AT_LEAST_ONE, "saveckp_freq": utils.NON_NEGATIVE,
    "seed": utils.NON_NEGATIVE, "log_freq": utils.AT_LEAST_ONE,
    "ibot_loss_weight": utils.NON_NEGATIVE, "mask_sample_probability": utils.Domain(0, 1),
    "mask_ratio_min_max": utils.Domain(0, 1), "ibot_out_dim": utils.AT_LEAST_ONE,
    "koleo_loss_weight": utils.NON_NEGATIVE, "layerwise_decay": utils.Domain(0, 1, low_inclusive=False),
    "patch_embed_lr_mult": utils.NON_NEGATIVE, "layerscale": utils.NON_NEGATIVE,
}


def check_args(args) -> None:
    """One-line errors for flag values that would otherwise fail deep inside training."""
    args = utils.resolve_crop_sizes(utils.resolve_patch_size(args, PATCH_SIZE), CROPS_SIZE)
    utils.check_flag_domains(args, FLAG_DOMAINS)
    if utils.is_region_arch(args.arch) and args.augmentation == "gpu":
        raise utils.InputError(f"--augmentation gpu: {args.arch} trains on grids of tile features, which have no "
                               f"per-pixel steps; their crops and flips are cut in the data-loading workers")
    for name in ("global_crops_scale", "local_crops_scale"):
        scale = getattr(args, name)
        if len(scale) != 2 or not scale[0] <= scale[1]:
            raise utils.InputError(f"--{name} {' '.join(map(str, scale))}: expected two numbers 0 < min <= max <= 1")
    if args.warmup_teacher_temp_epochs > args.epochs:
        raise utils.InputError(f"--warmup_teacher_temp_epochs {args.warmup_teacher_temp_epochs} is more than "
                         f"--epochs {args.epochs}")
    if args.warmup_epochs > args.epochs:
        raise utils.InputError(f"--warmup_epochs {args.warmup_epochs:g} is more than --epochs {args.epochs}")
    check_objectives(args)
    if args.pretrained_weights and not os.path.isfile(args.pretrained_weights):
        raise utils.InputError(f"--pretrained_weights {args.pretrained_weights}: no such file")
    crops = ["global_crops_size"]
    if args.local_crops_number:
        crops.append("local_crops_size")
    if args.knn_data_path:  # the k-NN monitoring feeds the backbone --crop_size crops
        crops.append("crop_size")
    utils.check_patch_fits(args, *crops)


def check_objectives(args) -> None:
    """One-line errors for DINOv2's objectives asked of what cannot serve them."""
    low, high = args.mask_ratio_min_max
    if low > high:
        raise utils.InputError(f"--mask_ratio_min_max {low:g} {high:g}: expected min <= max")
    vit = args.arch in VIT_ARCHS or args.arch in DINOV2_ARCHS
    if args.ibot_loss_weight > 0:
        if not vit:
            raise utils.InputError(f"--ibot_loss_weight {args.ibot_loss_weight:g}: iBOT masks patch tokens, which "
                                   f"--arch {args.arch} does not have (use a ViT)")
        n_crops = 2 * args.batch_size_per_gpu
        n_tokens = (args.global_crops_size // args.patch_size) ** 2
        if int(n_crops * args.mask_sample_probability) < 1:
            raise utils.InputError(f"--mask_sample_probability {args.mask_sample_probability:g}: masks none of the "
                                   f"{n_crops} global crops of a batch (int({n_crops} x p) = 0); raise it or the batch")
        if int(n_tokens * high) < 1:
            raise utils.InputError(f"--mask_ratio_min_max {low:g} {high:g}: masks no patch of the {n_tokens} of a "
                                   f"global crop (int({n_tokens} x {high:g}) = 0)")
    if args.koleo_loss_weight > 0 and args.batch_size_per_gpu < 2:
        raise utils.InputError(f"--koleo_loss_weight {args.koleo_loss_weight:g}: KoLeo compares each image with its "
                               f"nearest neighbour in the batch; --batch_size_per_gpu 1 has none")
    if args.layerwise_decay != 1 and not vit:
        raise utils.InputError(f"--layerwise_decay {args.layerwise_decay:g}: decays the lr over the blocks of DINO's "
                               f"and DINOv2's ViTs; --arch {args.arch} is not one of them")
    if args.layerscale and not vit:
        raise utils.InputError(f"--layerscale {args.layerscale:g}: a ViT option; --arch {args.arch} is not a ViT")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("DINO", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
