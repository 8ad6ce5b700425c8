"""Collapse diagnostics: the teacher's entropies and the teacher-student KL against a computation written here, the
warning on constructed uniform and one-dimension collapses (and none on healthy outputs), and the log line."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import utils
from conftest import REPO, make_image_folder


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def test_entropies_and_kl_match_an_independent_computation():
    rng = np.random.default_rng(0)
    B, K, ncrops, teacher_temp, student_temp = 5, 11, 4, 0.07, 0.1
    student, teacher = rng.normal(size=(ncrops * B, K)), rng.normal(size=(2 * B, K))
    center = rng.normal(size=(1, K)) * 0.1
    q = softmax((teacher - center) / teacher_temp)  # the teacher's distributions, one per global crop and image
    p = softmax(student / student_temp)
    # KL(q || p) over the loss's pairs: teacher crop iq against every student crop v != iq, image by image
    kls = [(q[iq * B:(iq + 1) * B] * (np.log(q[iq * B:(iq + 1) * B]) - np.log(p[v * B:(v + 1) * B]))).sum(-1).mean()
           for iq in range(2) for v in range(ncrops) if v != iq]

    loss_fn = utils.DINOLoss(K, ncrops, teacher_temp, teacher_temp, 0, 1, student_temp=student_temp)
    loss_fn.center.copy_(torch.from_numpy(center).float())
    teacher_probs = loss_fn.softmax_center_teacher(torch.from_numpy(teacher).float(), teacher_temp)
    loss = loss_fn.cross_entropy(torch.from_numpy(student).float(), teacher_probs)
    diagnostics = utils.teacher_diagnostics(teacher_probs, loss)
    assert list(diagnostics) == ["teacher_entropy", "teacher_batch_entropy", "kl"]
    assert diagnostics["teacher_entropy"].item() == pytest.approx(entropy(q).mean(), rel=1e-5)
    assert diagnostics["teacher_batch_entropy"].item() == pytest.approx(entropy(q.mean(0)), rel=1e-5)
    assert diagnostics["kl"].item() == pytest.approx(np.mean(kls), rel=1e-4, abs=1e-5)
    assert 0 <= entropy(q).mean() <= entropy(q.mean(0)) <= math.log(K)  # concavity: the bounds the warnings use


def counter_after(teacher_logits: torch.Tensor, out_dim: int, steps: int = 3) -> utils.CollapseCounter:
    counter = utils.CollapseCounter(out_dim)
    for _ in range(steps):
        counter.add(*utils.teacher_entropies(torch.softmax(teacher_logits, -1)).tolist())
    return counter


def test_the_warning_names_uniform_collapse():
    K = 256
    warning = counter_after(torch.randn(64, K) * 1e-3, K).warning(epoch=3)  # every image near uniform
    assert warning.startswith("warning: uniform collapse in epoch 3")
    assert f"ln(out_dim) = {math.log(K):.2f}" in warning
    for cure in ("--teacher_temp", "--momentum_teacher", "--freeze_last_layer"):
        assert cure in warning


def test_the_warning_names_one_dimension_collapse():
    K = 256
    logits = torch.zeros(64, K)
    logits[:, 7] = 50.0  # every image on the same dimension
    warning = counter_after(logits, K).warning(epoch=0)
    assert warning.startswith("warning: one-dimension collapse in epoch 0")
    assert "--teacher_temp" in warning


def test_no_warning_on_healthy_outputs_nor_on_one_collapsed_step_among_healthy_ones():
    K = 256
    logits = torch.full((64, K), -50.0)
    logits[torch.arange(64), torch.randperm(K)[:64]] = 50.0  # sharp per image, spread over the batch
    assert counter_after(logits, K).warning(epoch=0) == ""
    counter = counter_after(logits, K)
    counter.add(math.log(K), math.log(K))  # one uniform step: not a whole epoch
    assert counter_after(torch.zeros(4, K), K, steps=1).warning(0) != ""
    assert counter.warning(epoch=0) == ""


def run_training(tmp_path, name: str, *flags) -> tuple:
    data = tmp_path / "data"
    if not data.exists():
        make_image_folder(data, n_classes=2, per_class=8, size=28)
    out = tmp_path / name
    cmd = [sys.executable, os.path.join(REPO, "main_dino.py"), "--arch", "vit_tiny", "--patch_size", "7",
           "--global_crops_size", "28", "--local_crops_size", "14", "--local_crops_number", "2", "--out_dim", "64",
           "--batch_size_per_gpu", "8", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
           "--data_path", str(data), "--output_dir", str(out), "--saveckp_freq", "0", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, [json.loads(line) for line in open(out / "log.txt")]


@pytest.mark.slow
def test_the_log_line_carries_the_diagnostics_and_a_forced_uniform_collapse_warns(tmp_path):
    # a teacher temperature of 100 flattens every teacher distribution: a uniform collapse by construction (a healthy
    # run, the demo's, stays quiet: tests/test_demo.py)
    stdout, (line,) = run_training(tmp_path, "uniform", "--teacher_temp", "100", "--warmup_teacher_temp", "100")
    assert line["ln_out_dim"] == pytest.approx(math.log(64))
    assert 0 <= line["train_teacher_entropy"] <= line["train_teacher_batch_entropy"] <= math.log(64) + 1e-6
    assert line["train_kl"] == pytest.approx(line["train_loss"] - line["train_teacher_entropy"], abs=1e-4)
    assert line["train_teacher_entropy"] > 0.99 * math.log(64)
    assert "warning: uniform collapse in epoch 0" in stdout
    assert line["train_warning"].startswith("warning: uniform collapse in epoch 0")
