"""Where main_dino's training step spends its time: torch.profiler over a few steps of our step on random crops,
the operators grouped (matrix products, attention, normalisation and activations, optimizer, the rest).

    # the benchmark configuration of the README's Speed table, fp32, on the CPU
    python benchmarks/profile_step.py --arch vit_tiny --patch_size 7 --global_crops_size 28 --local_crops_size 14 \\
        --local_crops_number 4 --out_dim 1024 --batch_size_per_gpu 32 --precision fp32

Prints one JSON line: the seconds per step, each group's share of the operators' self time, the matrix products'
GFLOP/s, and the ten operators of largest self time. The step is built by bench_train.Trainer (main_dino's own
functions); the first --warmup steps are not profiled.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_train  # noqa: E402
import utils  # noqa: E402

GROUPS = {  # operator name fragments of each group, first match wins
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "convolution"),
    "attention and softmax": ("attention", "softmax"),
    "norms and activations": ("layer_norm", "gelu", "batch_norm", "native_norm"),
    "optimizer": ("adam", "_foreach", "lerp"),
}


def get_args_parser():
    parser = argparse.ArgumentParser("Profile of the DINO training step", add_help=False)
    parser.add_argument("--arch", default="vit_tiny", type=str)
    parser.add_argument("--patch_size", default=7, type=int)
    parser.add_argument("--global_crops_size", default=28, type=int)
    parser.add_argument("--local_crops_size", default=14, type=int)
    parser.add_argument("--local_crops_number", default=4, type=int)
    parser.add_argument("--out_dim", default=1024, type=int)
    parser.add_argument("--batch_size_per_gpu", default=32, type=int)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", default=5, type=int, help="Profiled steps.")
    parser.add_argument("--warmup", default=3, type=int, help="Steps before the profiled ones.")
    return parser


FLAG_DOMAINS = {"patch_size": utils.AT_LEAST_ONE, "global_crops_size": utils.AT_LEAST_ONE,
                "local_crops_size": utils.AT_LEAST_ONE, "local_crops_number": utils.NON_NEGATIVE,
                "out_dim": utils.AT_LEAST_ONE, "batch_size_per_gpu": utils.AT_LEAST_ONE,
                "steps": utils.AT_LEAST_ONE, "warmup": utils.NON_NEGATIVE}


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    utils.check_flag_domains(args, FLAG_DOMAINS)


def group_of(name: str) -> str:
    """The group of GROUPS an operator belongs to."""
    lowered = name.lower()
    return next((group for group, parts in GROUPS.items() if any(p in lowered for p in parts)), "the rest")


def main(args):
    check_args(args)
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # what the training code prints: stdout holds the JSON line alone
        record = profile_steps(args)
    print(json.dumps(record), file=real_stdout)


def profile_steps(args) -> dict:
    """The step's time and the operators' shares, as main prints them."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    bench_args = bench_train.get_args_parser().parse_args([])
    vars(bench_args).update(patch_size=args.patch_size, out_dim=args.out_dim, global_crops_size=args.global_crops_size,
                            local_crops_size=args.local_crops_size, local_crops_number=args.local_crops_number)
    train_args = bench_train.training_args(bench_args, args.arch, args.batch_size_per_gpu, args.precision, False,
                                           device)
    trainer = bench_train.Trainer(train_args)
    crops = bench_train.random_crops(train_args, device)
    for _ in range(args.warmup):
        trainer.lean_step(crops)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_flops=True) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.lean_step(crops)
        bench_train.synchronize(device)
        seconds = (time.perf_counter() - start) / args.steps
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    shares = {}
    for e in events:
        shares[group_of(e.key)] = shares.get(group_of(e.key), 0) + e.self_cpu_time_total
    matmul = [e for e in events if group_of(e.key) == "matrix products"]
    flops = sum(e.flops or 0 for e in matmul)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    return {
        "config": {k: v for k, v in vars(args).items()}, "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "seconds_per_step": round(seconds, 4),
        "images_per_s": round(args.batch_size_per_gpu / seconds, 1),
        "share_of_operator_time": {k: round(v / total, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
        "matrix_products_gflop_per_s": round(flops / (sum(e.self_cpu_time_total for e in matmul) / 1e6) / 1e9, 1)
        if matmul else None,
        "top_operators_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / args.steps, 1) for e in top},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Profile of the DINO training step", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
