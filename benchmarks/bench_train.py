"""Training throughput of main_dino.py: the step, the multi-crop augmentation, end to end, k-NN feature extraction.

    # one GPU: ViT-S/16 and ViT-B/16 at batch 64, the original-style step beside ours, fp16 and bf16
    python benchmarks/bench_train.py --arch vit_small vit_base --precision fp16 bf16 --variant lean original
    # only the step, with and without torch.compile
    python benchmarks/bench_train.py --stages step --compile false true
    # the demo's step on a CPU: the original's (fp32) beside ours in fp32, bf16 and compiled bf16, and the speedups
    python benchmarks/bench_train.py --stages step --arch vit_tiny --patch_size 7 --global_crops_size 28 \\
        --local_crops_size 14 --local_crops_number 4 --out_dim 1024 --batch_size_per_gpu 32 \\
        --precision fp32 bf16 --compile false true --variant original lean
    # the training DataLoader from a tar against the same JPEGs as files (run as root to read them from the disk)
    python benchmarks/bench_train.py --stages tar --augmentation gpu cpu --num_workers 8
    # the CPU smoke test (a minute): tiny model, tiny generated JPEGs
    python benchmarks/bench_train.py --arch vit_tiny --patch_size 8 --out_dim 256 --batch_size_per_gpu 4 \\
        --global_crops_size 32 --local_crops_size 16 --local_crops_number 2 --iters 2 --warmup 1 \\
        --num_images 24 --image_size 64 48 --num_workers 1 --knn_batch_size 8

Every measurement prints one JSON line on stdout (everything else goes to stderr):
- step: main_dino.DINO.train_step on random crops already on the device (variant lean), or the original code's step
  written out for comparison (variant original: explicit attention, a log-softmax per crop pair, per-parameter Python
  loops for clipping and EMA with a host sync per parameter, non-fused AdamW, a host sync on the loss every step).
  All configurations of one arch and batch size are built first and timed interleaved (--rounds);
- step_speedup: each lean step's images/s over the original's, measured in the same run, at the original's precision
  for the device (fp16 on CUDA, fp32 on a CPU);
- aug_worker: images/s of one DataLoader worker (one CPU thread) for the cpu pipeline (the original's PIL
  augmentation) and the gpu pipeline (decode and crop only);
- aug_device: the device half of the gpu pipeline on one collated batch (copy to the device included);
- data: the DataLoader of main_dino (workers, pinning, device augmentation) alone; e2e: the same plus the step;
- knn_model: the frozen backbone on random 224 px batches; knn_e2e: utils.extract_features (as eval_knn.py runs
  it) on the JPEG folder;
- tar (only when asked for, --stages tar): main_dino's training DataLoader alone reading the JPEGs as files, then
  the same JPEGs from one tar (utils.TarImageDataset), same workers, the page cache dropped before each (as root;
  the record says whether it was).
images_per_s counts images (not crops); peak_mem_gib is torch.cuda.max_memory_allocated (null on CPU), for a step
configuration less what the configurations built before it hold.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tarfile
import tempfile
import time
from multiprocessing import Pool

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_dino  # noqa: E402  (the benchmark measures the script's own code, not a copy of it)
import utils  # noqa: E402
from vision_transformer import build_model  # noqa: E402

STAGES = ("step", "aug", "e2e", "knn")
OBJECTIVES = {"dino": {}, "ibot": {"ibot_loss_weight": 1.0}, "koleo": {"koleo_loss_weight": 0.1},
              "ibot_koleo": {"ibot_loss_weight": 1.0, "koleo_loss_weight": 0.1}}  # main_dino flags of each


def get_args_parser():
    parser = argparse.ArgumentParser("DINO training benchmark", add_help=False)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES + ("tar",),
                        help="What to measure (tar, which drops the page cache, only when named).")
    parser.add_argument("--arch", nargs="+", default=["vit_small"], help="Architectures (any --arch of main_dino).")
    parser.add_argument("--patch_size", default=16, type=int, help="Patch size of the ViTs.")
    parser.add_argument("--batch_size_per_gpu", nargs="+", default=[64], type=int, help="Batch sizes (images).")
    parser.add_argument("--precision", nargs="+", default=["fp16"], choices=["fp32", "fp16", "bf16"],
                        help="fp16: autocast with GradScaler (main_dino's default); bf16: --use_bf16; fp32: neither.")
    parser.add_argument("--compile", nargs="+", default=[False], type=utils.bool_flag,
                        help="main_dino --compile values to measure the step and end to end with.")
    parser.add_argument("--variant", nargs="+", default=["lean"], choices=["lean", "original"],
                        help="Step implementation: main_dino's, or the original code's written out (step stage).")
    parser.add_argument("--augmentation", nargs="+", default=["gpu"], choices=["gpu", "cpu"],
                        help="main_dino --augmentation values for the data and e2e stages.")
    parser.add_argument("--out_dim", default=65536, type=int, help="DINO head output dimension.")
    parser.add_argument("--use_bn_in_head", default=False, type=utils.bool_flag,
                        help="Batch norm in the DINO head (main_dino's flag; make demo's step has it).")
    parser.add_argument("--centering", default="centering", choices=["centering", "sinkhorn_knopp"],
                        help="main_dino's --centering for our step (make demo's: sinkhorn_knopp); original: centering.")
    parser.add_argument("--objectives", nargs="+", default=["dino"], choices=list(OBJECTIVES), help="""What our step
        optimises, each timed as its own configuration: dino (the original's loss), or with DINOv2's objectives at
        DINOv2's weights: ibot (--ibot_loss_weight 1), koleo (--koleo_loss_weight 0.1), ibot_koleo (both).""")
    parser.add_argument("--global_crops_size", default=224, type=int)
    parser.add_argument("--local_crops_size", default=96, type=int)
    parser.add_argument("--local_crops_number", default=8, type=int)
    parser.add_argument("--iters", default=20, type=int, help="Timed iterations per measurement.")
    parser.add_argument("--warmup", default=5, type=int, help="Untimed iterations before (compilation, autotuning).")
    parser.add_argument("--rounds", default=5, type=int, help="""The step stage interleaves its configurations:
        each runs its share of --iters timed steps per round, in turn, for --rounds rounds (at most --iters).""")
    parser.add_argument("--num_workers", default=max(1, (os.cpu_count() or 2) - 1), type=int,
                        help="DataLoader workers for the data, e2e and knn_e2e stages.")
    parser.add_argument("--data_path", default="", type=str, help="""An ImageFolder of JPEGs to read; empty:
        generate --num_images JPEGs of --image_size under --work_dir.""")
    parser.add_argument("--num_images", default=2048, type=int, help="Images to generate when --data_path is empty.")
    parser.add_argument("--image_size", nargs=2, default=[500, 375], type=int, metavar=("WIDTH", "HEIGHT"),
                        help="Size of the generated JPEGs (500x375 is a typical ImageNet image).")
    parser.add_argument("--work_dir", default="", type=str, help="Where to generate images; empty: a temporary dir.")
    parser.add_argument("--knn_batch_size", default=128, type=int, help="Batch of eval_knn (its default, 128).")
    parser.add_argument("--aug_worker_images", default=100, type=int,
                        help="Images each pipeline transforms in the aug_worker measurement.")
    return parser


# Flags that main_dino.py has too take its domains
FLAG_DOMAINS = {
    **{name: main_dino.FLAG_DOMAINS[name] for name in ("patch_size", "batch_size_per_gpu", "out_dim",
                                                       "global_crops_size", "local_crops_size",
                                                       "local_crops_number", "num_workers", "knn_batch_size")},
    "iters": utils.AT_LEAST_ONE, "rounds": utils.AT_LEAST_ONE, "warmup": utils.NON_NEGATIVE,
    "num_images": utils.AT_LEAST_ONE,
    "image_size": utils.Domain(low=8), "aug_worker_images": utils.AT_LEAST_ONE,
}


def check_args(args) -> None:
    """One-line errors for values that would fail later."""
    utils.check_flag_domains(args, FLAG_DOMAINS)
    crops = ["global_crops_size"] + (["local_crops_size"] if args.local_crops_number else [])
    for arch in args.arch:
        utils.check_patch_fits(args, *crops, arch=arch)
    if args.data_path:
        utils.check_image_folder(args.data_path)


def main(args):
    check_args(args)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    emit = Emitter(sys.stdout, device)
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory() as tmp:
        folder = args.data_path
        if not folder and {"aug", "e2e", "knn", "tar"} & set(args.stages):
            # ============ generating a JPEG ImageFolder ... ============
            folder = generate_jpeg_folder(os.path.join(args.work_dir or tmp, "jpeg"), args.num_images,
                                          tuple(args.image_size), args.num_workers)
        for arch in args.arch:
            for batch_size in args.batch_size_per_gpu:
                # ============ the training step on device tensors ... ============
                if "step" in args.stages:
                    # the original has no torch.compile, nor DINOv2's objectives
                    configs = [(precision, compiled, variant, objectives) for precision in args.precision
                               for compiled in args.compile for variant in args.variant
                               for objectives in (args.objectives if variant == "lean" else ["dino"])
                               if not (variant == "original" and compiled)]
                    steps = bench_steps([training_args(args, arch, batch_size, precision, compiled, device,
                                                       objectives=objectives)
                                         for precision, compiled, _, objectives in configs],
                                        [variant for _, _, variant, _ in configs], args)
                    for record in steps:
                        emit(record, stage="step")
                    for record in speedups(steps, device):
                        emit(record, stage="step_speedup")
                # ============ the augmentation ... ============
                if "aug" in args.stages:
                    train_args = training_args(args, arch, batch_size, "fp32", False, device, folder)
                    for pipeline in ("cpu", "gpu"):
                        emit(bench_aug_worker(train_args, args, folder, pipeline), stage="aug_worker",
                             augmentation=pipeline)
                    emit(bench_aug_device(train_args, args), stage="aug_device", augmentation="gpu")
                # ============ end to end from JPEGs ... ============
                if "e2e" in args.stages:
                    for augmentation in args.augmentation:
                        for precision in args.precision:
                            for compiled in args.compile:
                                train_args = training_args(args, arch, batch_size, precision, compiled, device,
                                                           folder, augmentation)
                                data, e2e = bench_e2e(train_args, args)
                                emit(data, stage="data", augmentation=augmentation)
                                emit(e2e, stage="e2e", augmentation=augmentation)
            # ============ k-NN feature extraction ... ============
            if "knn" in args.stages:
                for precision in args.precision:
                    emit(bench_knn_model(arch, args, precision, device), stage="knn_model")
                emit(bench_knn_e2e(arch, args, folder, device), stage="knn_e2e")
        # ============ the training DataLoader from files and from a tar of them ... ============
        if "tar" in args.stages:
            tar_path = write_tar(folder, os.path.join(args.work_dir or tmp, "tar"))
            for batch_size in args.batch_size_per_gpu:
                for augmentation in args.augmentation:
                    for source, path in (("files", folder), ("tar", tar_path)):
                        train_args = training_args(args, args.arch[0], batch_size, "fp32", False, device, path,
                                                   augmentation)
                        emit(bench_loader(train_args, args), stage="tar", source=source, augmentation=augmentation)


class Emitter:
    """Prints one JSON line per measurement on the real stdout, with the device and torch version."""

    def __init__(self, stream, device):
        self.stream = stream
        self.common = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__}

    def __call__(self, record: dict, **fields) -> None:
        line = {**fields, **record, **self.common}
        print(json.dumps(line), file=self.stream, flush=True)


def training_args(args, arch, batch_size, precision, compiled, device, folder="", augmentation="gpu",
                  objectives="dino"):
    """main_dino's own arguments (its defaults) for one configuration, in one process."""
    train_args = main_dino.get_args_parser().parse_args([])
    vars(train_args).update(OBJECTIVES[objectives])
    train_args.objectives = objectives  # the benchmark's own field
    train_args.arch, train_args.patch_size, train_args.out_dim = arch, args.patch_size, args.out_dim
    train_args.use_bn_in_head, train_args.centering = args.use_bn_in_head, args.centering
    train_args.batch_size_per_gpu = batch_size
    train_args.global_crops_size, train_args.local_crops_size = args.global_crops_size, args.local_crops_size
    train_args.local_crops_number = args.local_crops_number
    train_args.use_fp16, train_args.use_bf16 = precision == "fp16", precision == "bf16"
    train_args.compile, train_args.augmentation = compiled, augmentation
    train_args.data_path, train_args.num_workers = folder, args.num_workers
    train_args.device, train_args.precision = device, precision  # the benchmark's own fields, not main_dino's flags
    return train_args


def one_process(device) -> utils.Distributed:
    """What init_distributed_mode finds in a single process on device."""
    return utils.Distributed(local_rank=device.index or 0, device=device)


def config(train_args) -> dict:
    autocast, _ = main_dino.build_precision(train_args, train_args.device)
    return {"arch": train_args.arch, "patch_size": train_args.patch_size, "batch_size": train_args.batch_size_per_gpu,
            "crops": crop_sizes(train_args), "precision": train_args.precision,
            "autocast": str(autocast["dtype"]).removeprefix("torch.") if autocast["enabled"] else None,
            "compile": train_args.compile, "objectives": train_args.objectives}


def crop_sizes(train_args) -> str:
    return f"2x{train_args.global_crops_size}+{train_args.local_crops_number}x{train_args.local_crops_size}"


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def timed(fn, warmup: int, iters: int, device) -> float:
    """Seconds per call of fn over iters calls, after warmup calls, the device drained before and after."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def random_crops(train_args, device) -> list:
    """Normalised-looking random crops on the device, as the DataLoader and augmentation would hand them over."""
    b = train_args.batch_size_per_gpu
    sizes = [train_args.global_crops_size] * 2 + [train_args.local_crops_size] * train_args.local_crops_number
    return [torch.randn(b, 3, s, s, device=device) for s in sizes]


class Trainer:
    """Networks, loss, optimizer and precision built by main_dino's own functions for one configuration.

    fused: main_dino's optimizer (fused AdamW on CUDA); the original's is AdamW's default (foreach on CUDA).
    """

    def __init__(self, train_args, fused: bool = True):
        device = train_args.device
        self.args = train_args
        self.dino = main_dino.DINO.build(train_args, one_process(device))
        if not fused:
            self.dino.optimizer = utils.build_optimizer("adamw", utils.get_params_groups(self.dino.student))
        # epoch 1: past the first epoch, where the head's last layer is frozen (the usual step)
        self.epoch = 1
        for j, group in enumerate(self.dino.optimizer.param_groups):
            group["lr"] = train_args.lr * train_args.batch_size_per_gpu / 256
            if j == 0:
                group["weight_decay"] = train_args.weight_decay
        self.student, self.teacher, self.teacher_without_ddp = (self.dino.student, self.dino.teacher,
                                                                self.dino.teacher_without_ddp)
        self.dino_loss, self.optimizer = self.dino.dino_loss, self.dino.optimizer
        self.autocast, self.fp16_scaler = self.dino.autocast, self.dino.fp16_scaler

    def lean_step(self, images):
        return self.dino.train_step(images, self.epoch, 0.996, self.dino_loss.teacher_temp_schedule[self.epoch])

    def original_step(self, images):
        """The original code's step, written out: same mathematics, its kernels and host synchronisations."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        args, student, teacher = self.args, self.student, self.teacher
        with sdpa_kernel(SDPBackend.MATH), torch.autocast(**self.autocast):  # softmax(q k^T) v written out
            teacher_output = teacher(images[:2])
            student_output = student(images)
            loss = pairwise_dino_loss(student_output, teacher_output, self.dino_loss)
        if not math.isfinite(loss.item()):  # the original checks the loss on the host every step
            raise RuntimeError("non-finite loss")
        self.optimizer.zero_grad()
        self.fp16_scaler.scale(loss).backward()
        self.fp16_scaler.unscale_(self.optimizer)
        for p in student.parameters():  # per-parameter clipping, one host sync per parameter
            if p.grad is not None:
                clip_coef = args.clip_grad / (p.grad.norm(2).item() + 1e-6)
                if clip_coef < 1:
                    p.grad.mul_(clip_coef)
        self.fp16_scaler.step(self.optimizer)
        self.fp16_scaler.update()
        with torch.no_grad():  # per-parameter EMA
            for p_s, p_t in zip(student.module.parameters(), self.teacher_without_ddp.parameters()):
                p_t.mul_(0.996).add_((1 - 0.996) * p_s.detach())
        synchronize(args.device)  # the original synchronises before logging every step
        return loss.detach()


def pairwise_dino_loss(student_output, teacher_output, dino_loss):
    """The DINO loss as the original computes it: a log-softmax for every (teacher crop, student crop) pair."""
    student_out = (student_output.float() / dino_loss.student_temp).chunk(dino_loss.ncrops)
    temp = dino_loss.teacher_temp_schedule[1]
    teacher_out = F.softmax((teacher_output.float() - dino_loss.center) / temp, dim=-1).detach().chunk(2)
    total, terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v != iq:
                total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                terms += 1
    dino_loss.update_center(teacher_output)
    return total / terms


def bench_steps(configs: list, variants: list, args) -> list:
    """The step of every configuration, interleaved: after each one's warmup, --rounds rounds in which every
    configuration runs its share of --iters in turn, so that a machine's drift (clock, neighbours) falls on all of
    them alike. images_per_s is over all --iters timed steps; the record also gives each round's, to show the
    spread."""
    device = configs[0].device
    reset_memory(device)
    torch._dynamo.reset()
    steps, peaks = [], []
    for train_args, variant in zip(configs, variants):
        # each configuration's own peak: its networks, optimizer state and warmup steps over what was there before
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        reset_memory(device)
        trainer = Trainer(train_args, fused=variant == "lean")
        crops = random_crops(train_args, device)
        step = trainer.lean_step if variant == "lean" else trainer.original_step
        steps.append(lambda step=step, crops=crops: step(crops))
        for _ in range(args.warmup):
            steps[-1]()
        synchronize(device)
        peak = peak_memory_gib(device)
        peaks.append(None if peak is None else round(peak - before / 2**30, 2))
    rounds = min(args.rounds, args.iters)
    per_round = [args.iters // rounds + (r < args.iters % rounds) for r in range(rounds)]  # --iters in all
    seconds = [[0.0] * rounds for _ in configs]
    for r, iters in enumerate(per_round):
        for c, step in enumerate(steps):
            seconds[c][r] = timed(step, 0, iters, device) * iters
    records = []
    for train_args, variant, round_seconds, peak in zip(configs, variants, seconds, peaks):
        b = train_args.batch_size_per_gpu
        records.append({**config(train_args), "variant": variant,
                        "images_per_s": round(b * sum(per_round) / sum(round_seconds), 1),
                        "rounds_images_per_s": [round(b * n / t, 1) for n, t in zip(per_round, round_seconds)],
                        "peak_mem_gib": peak, "iters": sum(per_round)})
    return records


def speedups(steps: list, device) -> list:
    """Each lean step's images/s over the original's at the precision the original trains in on this device (fp16
    on CUDA, its --use_fp16 default; fp32 on a CPU, where its autocast is off), when both were measured."""
    original_precision = "fp16" if device.type == "cuda" else "fp32"
    base = next((r for r in steps if r["variant"] == "original" and r["precision"] == original_precision), None)
    if base is None:
        return []
    return [{"arch": r["arch"], "batch_size": r["batch_size"], "crops": r["crops"], "precision": r["precision"],
             "compile": r["compile"], "objectives": r["objectives"], "original_precision": original_precision,
             "speedup": round(r["images_per_s"] / base["images_per_s"], 2)}
            for r in steps if r["variant"] == "lean"]


def bench_aug_worker(train_args, args, folder, pipeline) -> dict:
    """One worker's throughput: decode and augment images one by one on one CPU thread."""
    crop_args = (train_args.global_crops_scale, train_args.local_crops_scale, train_args.local_crops_number,
                 train_args.global_crops_size, train_args.local_crops_size)
    transform = utils.MultiCropGeometry(*crop_args) if pipeline == "gpu" else utils.DataAugmentationDINO(*crop_args)
    dataset = utils.ImageFolderSkipBad(folder, transform=transform)
    n = min(args.aug_worker_images, len(dataset))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        dataset[0]  # imports and first-call costs
        start = time.perf_counter()
        for i in range(n):
            dataset[i]
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"crops": crop_sizes(train_args), "images_per_s": round(n / seconds, 1), "num_workers": 1, "images": n}


def bench_aug_device(train_args, args) -> dict:
    """The device half on one pinned batch: copies, flip, jitter, grayscale, blur, solarization, normalisation."""
    device = train_args.device
    reset_memory(device)
    geometry = utils.MultiCropGeometry(train_args.global_crops_scale, train_args.local_crops_scale,
                                       train_args.local_crops_number, train_args.global_crops_size,
                                       train_args.local_crops_size)
    rng = np.random.default_rng(0)
    w, h = args.image_size
    samples = [geometry(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
               for _ in range(train_args.batch_size_per_gpu)]
    crops, params = torch.utils.data.default_collate(samples)  # as the DataLoader collates them
    if device.type == "cuda":
        crops, params = [c.pin_memory() for c in crops], {k: v.pin_memory() for k, v in params.items()}
    augment = utils.MultiCropOnDevice(device)
    seconds = timed(lambda: augment(crops, params), args.warmup, args.iters, device)
    b = train_args.batch_size_per_gpu
    return {"crops": crop_sizes(train_args), "batch_size": b, "images_per_s": round(b / seconds, 1),
            "peak_mem_gib": peak_memory_gib(device), "iters": args.iters}


def bench_e2e(train_args, args):
    """main_dino's DataLoader (and device augmentation) alone, then with the training step: two records."""
    device = train_args.device
    reset_memory(device)
    torch._dynamo.reset()
    data_loader = main_dino.build_data_loader(train_args, one_process(device), train_args.augmentation)
    augment = utils.MultiCropOnDevice(device) if train_args.augmentation == "gpu" else None
    trainer = Trainer(train_args)
    batches = endless(data_loader)

    def next_images():
        images, _ = next(batches)
        return augment(*images) if augment is not None else [im.to(device, non_blocking=True) for im in images]

    data_seconds = timed(next_images, args.warmup, args.iters, device)
    e2e_seconds = timed(lambda: trainer.lean_step(next_images()), args.warmup, args.iters, device)
    b = train_args.batch_size_per_gpu
    common = {**config(train_args), "num_workers": train_args.num_workers, "iters": args.iters}
    data = {**common, "images_per_s": round(b / data_seconds, 1), "peak_mem_gib": None}
    e2e = {**common, "images_per_s": round(b / e2e_seconds, 1), "peak_mem_gib": peak_memory_gib(device)}
    return data, e2e


def endless(data_loader):
    """Batches of the loader, epoch after epoch (workers persist between epochs)."""
    epoch = 0
    while True:
        data_loader.sampler.set_epoch(epoch)
        yield from data_loader
        epoch += 1


def bench_knn_model(arch, args, precision, device) -> dict:
    """The frozen backbone alone on random 224 px batches (eval_knn runs it in fp32; fp16/bf16 autocast shown too)."""
    reset_memory(device)
    model = build_model(arch, patch_size=args.patch_size).to(device).eval().requires_grad_(False)
    x = torch.randn(args.knn_batch_size, 3, 224, 224, device=device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    enabled = precision == "bf16" or (precision == "fp16" and device.type == "cuda")

    @torch.inference_mode()
    def forward():
        with torch.autocast(device.type, dtype=dtype if enabled else torch.bfloat16, enabled=enabled):
            model(x)

    seconds = timed(forward, args.warmup, args.iters, device)
    return {"arch": arch, "patch_size": args.patch_size, "batch_size": args.knn_batch_size, "precision": precision,
            "autocast": str(dtype).removeprefix("torch.") if enabled else None,
            "images_per_s": round(args.knn_batch_size / seconds, 1), "peak_mem_gib": peak_memory_gib(device)}


def bench_knn_e2e(arch, args, folder, device) -> dict:
    """utils.extract_features, as eval_knn runs it, over the JPEG folder: decode, Resize 256, CenterCrop 224, fp32."""
    reset_memory(device)
    model = build_model(arch, patch_size=args.patch_size).to(device).eval().requires_grad_(False)
    dataset = utils.ImageFolderSkipBad(folder, transform=utils.eval_transform(256, 224))
    start = time.perf_counter()
    utils.extract_features(model, utils.feature_loader(dataset, args.knn_batch_size, args.num_workers, device), device,
                           storage=device)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"arch": arch, "patch_size": args.patch_size, "batch_size": args.knn_batch_size, "precision": "fp32",
            "images_per_s": round(len(dataset) / seconds, 1), "peak_mem_gib": peak_memory_gib(device),
            "images": len(dataset), "num_workers": args.num_workers}


def bench_loader(train_args, args) -> dict:
    """main_dino's training DataLoader alone (its workers read, decode and augment; nothing runs on the device),
    the page cache dropped first where this process may, so that the images come from the disk."""
    cache_dropped = drop_page_cache()
    data_loader = main_dino.build_data_loader(train_args, one_process(train_args.device), train_args.augmentation)
    batches = endless(data_loader)
    seconds = timed(lambda: next(batches), args.warmup, args.iters, torch.device("cpu"))
    b = train_args.batch_size_per_gpu
    # reads past the first epoch (warmup + iters > batches_per_epoch) come from the page cache again
    return {"batch_size": b, "crops": crop_sizes(train_args), "num_workers": train_args.num_workers,
            "images_per_s": round(b / seconds, 1), "page_cache_dropped": cache_dropped, "iters": args.iters,
            "warmup": args.warmup, "batches_per_epoch": len(data_loader), "images": len(data_loader.dataset)}


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only); say so on stderr when it cannot be dropped."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        print(f"page cache not dropped ({e}): the images may be read from memory", file=sys.stderr)
        return False


def write_tar(folder: str, root: str) -> str:
    """folder's files (class folders kept) as root/pretrain_dataset.tar, and its entries beside it, as
    tools/infer_entries.py writes them."""
    os.makedirs(root, exist_ok=True)
    tar_path = os.path.join(root, "pretrain_dataset.tar")
    with tarfile.open(tar_path, "w") as tar:
        tar.add(folder, arcname=".")
    entries, names = utils.tar_entries(tar_path)
    utils.write_tar_entries(root, utils.tar_prefix(tar_path), entries, names)
    return tar_path


def generate_jpeg_folder(root: str, num_images: int, size: tuple, num_workers: int) -> str:
    """num_images JPEGs (quality 90) of smooth colour fields with noise, in 10 class folders; kept if present."""
    jobs = [(os.path.join(root, f"class{i % 10}", f"img{i:06}.jpg"), size, i) for i in range(num_images)]
    for c in range(min(10, num_images)):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
    todo = [job for job in jobs if not os.path.isfile(job[0])]
    if todo:
        with Pool(max(1, num_workers)) as pool:
            pool.starmap(write_jpeg, todo, chunksize=16)
    return root


def write_jpeg(path: str, size: tuple, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    field = Image.fromarray(rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8))
    pixels = np.asarray(field.resize((w, h), Image.BICUBIC)).astype(np.int16) + rng.integers(-20, 20, (h, w, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


if __name__ == "__main__":
    parser = argparse.ArgumentParser("DINO training benchmark", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
