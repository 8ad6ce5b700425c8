"""The tables of a benchmarks/device_check.sh run, in Markdown, ready to paste into the README.

    python benchmarks/device_report.py out/device_check
    python benchmarks/device_report.py out/device_check --output out/device_check/report.md

Reads summary.json, step.jsonl, data.jsonl and pretrain_log.txt from the folder; a missing file or an unreadable
line is said in the output, never skipped silently.
"""
import argparse
import json
import os
import statistics


def get_args_parser():
    parser = argparse.ArgumentParser("device check report", add_help=False)
    parser.add_argument("out_dir", type=str, help="The OUT_DIR of benchmarks/device_check.sh.")
    parser.add_argument("--output", default="", type=str, help="Also write the report to this file.")
    return parser


def main(args):
    report = "\n".join(build_report(args.out_dir))
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report + "\n")


def build_report(out_dir: str) -> list:
    """The report's lines: the steps, the training step, the data stages, the Fashion-MNIST pretraining."""
    summary = read_json(os.path.join(out_dir, "summary.json"))
    steps, step_problems = read_json_lines(os.path.join(out_dir, "step.jsonl"))
    data, data_problems = read_json_lines(os.path.join(out_dir, "data.jsonl"))
    log, log_problems = read_json_lines(os.path.join(out_dir, "pretrain_log.txt"))
    first = (steps or data or [{}])[0]
    device = first.get("device") or summary.get("gpu") or "?"
    lines = [f"Device check ({summary.get('mode', '?')} mode): {device}, torch {first.get('torch', '?')}, "
             f"{summary.get('wall_s', '?')} s in all, started {summary.get('started', '?')}",
             "", *table(["step", "status", "exit", "wall s", "budget s", "note"],
                        [[s["name"], s["status"], s.get("exit_code"), s.get("wall_s"), s.get("budget_s"),
                          s.get("reason") or ("below" if s["name"] == "pretrain" else s.get("note"))]
                         for s in summary.get("steps", [])])]

    lines += ["", "Training step on synthetic crops already on the device (step.jsonl):", ""]
    lines += table(["arch", "batch", "crops", "precision", "compile", "variant", "images/s", "peak GiB"],
                   [[r.get("arch"), r.get("batch_size"), r.get("crops"), r.get("precision"), r.get("compile"),
                     r.get("variant"), r.get("images_per_s"), r.get("peak_mem_gib")]
                    for r in steps if r.get("stage") == "step"])
    speedups = [r for r in steps if r.get("stage") == "step_speedup"]
    if speedups:
        lines += ["", "Our step over the original's, same run (at the original's precision on this device):", ""]
        lines += table(["arch", "batch", "crops", "precision", "compile", "speedup"],
                       [[r.get("arch"), r.get("batch_size"), r.get("crops"), r.get("precision"), r.get("compile"),
                         r.get("speedup")] for r in speedups])
    lines += step_problems

    lines += ["", "Augmentation and end to end on generated JPEGs (data.jsonl):", ""]
    lines += table(["stage", "augmentation", "arch", "batch", "crops", "precision", "workers", "images/s", "peak GiB"],
                   [[r.get("stage"), r.get("augmentation"), r.get("arch"), r.get("batch_size"), r.get("crops"),
                     r.get("precision"), r.get("num_workers"), r.get("images_per_s"), r.get("peak_mem_gib")]
                    for r in data])
    lines += data_problems

    lines += ["", "Fashion-MNIST pretraining (pretrain_log.txt):", ""]
    pretrain = next((s for s in summary.get("steps", []) if s["name"] == "pretrain"), {})
    if pretrain.get("note"):
        lines += [f"`{pretrain['note']}`", ""]
    lines += pretrain_table(log) + log_problems
    return lines


def pretrain_table(log: list) -> list:
    if not log:
        return ["no epoch logged"]
    knn = [f"{r['knn_top1']:.2f} (epoch {r['epoch']})" for r in log if "knn_top1" in r]
    init = next((r["knn_top1_init"] for r in log if "knn_top1_init" in r), None)
    last_knn = next((r for r in reversed(log) if "knn_top1" in r), {})
    return table(["epochs", "median s/epoch", "median images/s", "train loss first/last", "k-NN top-1 random weights",
                  "k-NN top-1 after training (top-5)", "k-NN top-1 per measured epoch"],
                 [[len(log), round(statistics.median(r["time"] for r in log), 2),
                   round(statistics.median(r["images_per_s"] for r in log), 1),
                   f"{log[0]['train_loss']:.3f} / {log[-1]['train_loss']:.3f}",
                   init, f"{last_knn.get('knn_top1')} ({last_knn.get('knn_top5')})", ", ".join(knn)]])


def table(header: list, rows: list) -> list:
    if not rows:
        return ["no measurement"]
    cell = lambda v: "" if v is None else str(v)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {"steps": [{"name": os.path.basename(path), "status": "missing"}]}
    with open(path) as f:
        return json.load(f)


def read_json_lines(path: str):
    """(records, problem lines): every line that is not a JSON object is reported by its number."""
    if not os.path.isfile(path):
        return [], [f"({os.path.basename(path)} is missing)"]
    records, problems = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                problems.append(f"({os.path.basename(path)} line {number} is not a JSON object: {line[:80]!r})")
    return records, problems


if __name__ == "__main__":
    parser = argparse.ArgumentParser("device check report", parents=[get_args_parser()])
    main(parser.parse_args())
