"""benchmarks/device_check.sh --small on the CPU: every step recorded, valid JSON lines, a pretraining with k-NN."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, script_env

STEPS = ["gpu_tests", "step_eager", "step_compiled", "data", "fashion_mnist_export", "pretrain"]
OUTPUTS = {"summary.json", "gpu_tests.xml", "gpu_tests.log", "step.jsonl", "data.jsonl", "pretrain_log.txt",
           "steps.log", "report.md"}


def read_json_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_small_device_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", str(out), "--small"], cwd=REPO,
                          env=script_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what the device tool brings back: at most 8 plain files, flat, with plain names
    assert set(os.listdir(out)) == OUTPUTS

    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["mode"] == "small"
    steps = {s["name"]: s for s in summary["steps"]}
    assert set(STEPS) <= set(steps) <= set(STEPS) | {"generate_images"}
    for name, step in steps.items():
        assert step["status"] in ("ok", "skipped"), step
        assert step["wall_s"] >= 0
        assert (step["exit_code"] == 0) == (step["status"] == "ok"), step
    assert steps["step_compiled"]["status"] == "skipped" and "CPU" in steps["step_compiled"]["reason"]
    if steps["fashion_mnist_export"]["status"] == "skipped":  # no idx files here: the generated folder stands in
        assert steps["generate_images"]["status"] == "ok"
    assert steps["pretrain"]["status"] == "ok"

    # the gpu tests ran and, without CUDA, were all skipped
    with open(out / "gpu_tests.xml") as f:
        junit = f.read()
    assert 'errors="0"' in junit and 'failures="0"' in junit and "<testcase" in junit

    records = read_json_lines(out / "step.jsonl")
    step_records = [r for r in records if r["stage"] == "step"]
    assert {(r["precision"], r["variant"]) for r in step_records} == {
        ("fp32", "lean"), ("fp32", "original"), ("bf16", "lean"), ("bf16", "original")}
    # each of our steps over the original's fp32 step (its CPU precision), from the same run
    speedups = {r["precision"]: r["speedup"] for r in records if r["stage"] == "step_speedup"}
    assert set(speedups) == {"fp32", "bf16"} and all(v > 0 for v in speedups.values())
    data_records = read_json_lines(out / "data.jsonl")
    assert {r["stage"] for r in data_records} == {"aug_worker", "aug_device", "data", "e2e"}
    for record in step_records + data_records:
        assert record["images_per_s"] > 0 and record["device"] == "cpu", record

    log = read_json_lines(out / "pretrain_log.txt")
    assert "knn_top1_init" in log[0] and "knn_top1" in log[-1]
    assert 0 <= log[-1]["knn_top1"] <= 100

    # the table printed at the end is the report written beside the results
    with open(out / "report.md") as f:
        report = f.read()
    assert report.strip() in proc.stdout
    assert "| step | status |" in report and "| vit_tiny | 4 |" in report
