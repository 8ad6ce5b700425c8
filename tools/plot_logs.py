"""Plot the log.txt files of DINO runs (main_dino.py, eval_linear.py) as PNG curves, several runs on one figure.

    python tools/plot_logs.py output/demo/log.txt --output curves.png
    python tools/plot_logs.py runA/log.txt runB/log.txt --labels A B --output compare.png

Each log.txt holds one JSON object per epoch. Every numeric key present in any run
(train_loss, train_lr, knn_top1, ...) gets its own panel, plotted against `epoch`. The collapse diagnostics
(train_teacher_entropy, train_teacher_batch_entropy, train_kl) and the loss are drawn with ln(out_dim), their
value at uniform collapse, as a dashed line.
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

PREFERRED_ORDER = ["train_loss", "train_lr", "train_wd", "knn_top1", "knn_top5", "knn_student_top1",
                   "knn_student_top5", "train_teacher_entropy", "train_teacher_batch_entropy", "train_kl",
                   "test_acc1", "test_acc5"]
SKIPPED = {"epoch", "time", "images_per_s", "skipped_images", "n_parameters", "ln_out_dim", "knn_top1_init",
           "knn_top5_init"}
# k-NN panels and their random-weights baseline (main_dino's knn_*_init), drawn dotted
BASELINES = {"knn_top1": "knn_top1_init", "knn_student_top1": "knn_top1_init", "knn_top5": "knn_top5_init",
             "knn_student_top5": "knn_top5_init"}
WITH_LN_OUT_DIM = {"train_loss", "train_teacher_entropy", "train_teacher_batch_entropy", "train_kl"}


def get_args_parser():
    parser = argparse.ArgumentParser("Plot DINO logs", add_help=False)
    parser.add_argument("logs", nargs="+", type=str, help="log.txt files (one JSON object per line)")
    parser.add_argument("--labels", nargs="+", type=str, default=None,
                        help="One legend label per log (default: the log's folder name)")
    parser.add_argument("--keys", nargs="+", type=str, default=None,
                        help="Keys to plot (default: every numeric key but epoch, time and throughput)")
    parser.add_argument("--output", default="curves.png", type=str, help="PNG file to write")
    return parser


def read_log(path: str) -> list:
    if not os.path.isfile(path):
        sys.exit(f"error: {path}: no such file")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    sys.exit(f"error: {path} line {n}: not a JSON object")
    if not records:
        sys.exit(f"error: {path}: empty log")
    return records


def numeric_keys(runs: list) -> list:
    keys = {k for records in runs for r in records for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SKIPPED}
    return [k for k in PREFERRED_ORDER if k in keys] + sorted(keys - set(PREFERRED_ORDER))


def main(args):
    runs = [read_log(p) for p in args.logs]
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.logs]
    if len(labels) != len(runs):
        sys.exit(f"error: --labels has {len(labels)} names for {len(runs)} logs")
    keys = args.keys or numeric_keys(runs)
    if not keys:
        sys.exit("error: no numeric values to plot in these logs")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for records, label in zip(runs, labels):
            points = [(r.get("epoch", i), r[key]) for i, r in enumerate(records) if key in r]
            if points:
                line, = ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=label)
                ln_k = next((r["ln_out_dim"] for r in records if "ln_out_dim" in r), None)
                if key in WITH_LN_OUT_DIM and ln_k is not None:
                    ax.axhline(ln_k, color=line.get_color(), linestyle="--", linewidth=1)
                init = next((r[BASELINES[key]] for r in records if BASELINES.get(key) in r), None)
                if init is not None:
                    ax.axhline(init, color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_title(key + (" (dashed: ln(out_dim))" if key in WITH_LN_OUT_DIM and any(
            "ln_out_dim" in r for records in runs for r in records) else "") + (" (dotted: random weights)" if any(
            BASELINES.get(key) in r for records in runs for r in records) else ""), fontsize=9)
        ax.set_xlabel("epoch")
        if key.endswith("_lr"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output} ({len(keys)} panels, {len(runs)} runs)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Plot DINO logs", parents=[get_args_parser()])
    main(parser.parse_args())
