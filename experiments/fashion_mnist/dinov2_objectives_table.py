"""The table of experiments/fashion_mnist/dinov2_objectives.sh: one row per configuration, its seeds side by side.

    python experiments/fashion_mnist/dinov2_objectives_table.py output/dinov2_objectives

Reads each <config>_s<seed>/log.txt (the teacher's 20-NN with random weights and after the last epoch, the training
time, the last epoch's loss terms) and patch_knn.txt (the k-NN of the mean patch token); prints Markdown.
"""
import argparse
import glob
import json
import os
import re
import statistics


def read_run(folder: str) -> dict:
    """What one run's files say: init and final [CLS] 20-NN, gain, patch-mean 20-NN, training seconds, terms."""
    lines = [json.loads(line) for line in open(os.path.join(folder, "log.txt"))]
    init = next(x for x in lines if "knn_top1_init" in x)["knn_top1_init"]
    last = lines[-1]
    run = {"init": init, "final": last["knn_top1"], "gain": last["knn_top1"] - init,
           "train_s": sum(x["time"] for x in lines), "loss": last["train_loss"],
           "ibot": last.get("train_ibot_loss"), "koleo": last.get("train_koleo_loss")}
    patch_file = os.path.join(folder, "patch_knn.txt")
    if os.path.isfile(patch_file):
        run.update(json.loads(open(patch_file).read().strip().splitlines()[-1]))
    return run


def main(args):
    runs = {}
    for folder in sorted(glob.glob(os.path.join(args.folder, "*_s*"))):
        match = re.fullmatch(r"(.+)_s(\d+)", os.path.basename(folder))
        if match and os.path.isfile(os.path.join(folder, "log.txt")):
            runs.setdefault(match.group(1), {})[int(match.group(2))] = read_run(folder)
    print("| configuration | seeds | [CLS] 20-NN after (random weights) | gain | mean gain | patch-mean 20-NN | "
          "last epoch's ibot / koleo terms | training (s, per run) |")
    print("|---|---|---|---|---|---|---|---|")
    for config, seeds in runs.items():
        rows = [seeds[s] for s in sorted(seeds)]
        cells = [
            ", ".join(str(s) for s in sorted(seeds)),
            ", ".join(f"{r['final']:.1f} ({r['init']:.1f})" for r in rows),
            ", ".join(f"{r['gain']:+.1f}" for r in rows),
            f"{statistics.mean(r['gain'] for r in rows):+.1f}",
            ", ".join(f"{r.get('patch_mean_20nn_top1', float('nan')):.1f}" for r in rows),
            ", ".join("/".join("-" if r[k] is None else f"{r[k]:.2f}" for k in ("ibot", "koleo")) for r in rows),
            ", ".join(f"{r['train_s']:.0f}" for r in rows),
        ]
        print(f"| {config} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    parser = argparse.ArgumentParser("Table of the DINOv2 objectives runs")
    parser.add_argument("folder", help="OUT of dinov2_objectives.sh")
    main(parser.parse_args())
