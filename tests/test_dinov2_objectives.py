"""DINOv2's training objectives in main_dino.py, against formulas written here: Sinkhorn-Knopp centering
(--centering sinkhorn_knopp), its marginals, 2 processes equal 1, and the default left as the original's."""
import json

import pytest
import torch

import main_dino
import utils
from conftest import make_image_folder, run_in_gloo_processes, run_script


def sinkhorn_knopp_written_out(teacher_output, temp, n_iterations):
    """DINOv2's Sinkhorn-Knopp on one process, as its paper writes it: Q = exp(t / temp)^T (K x B) scaled to sum 1,
    then n_iterations of (rows to 1/K, columns to 1/B), and the columns scaled back to sum 1."""
    q = torch.exp(teacher_output.double() / temp).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def loss_fn(out_dim=32):
    return utils.DINOLoss(out_dim, 2, 0.04, 0.04, 0, 10)


def test_sinkhorn_knopp_follows_the_written_out_iterations():
    torch.manual_seed(0)
    teacher = torch.randn(48, 32) * 0.3
    for n in (1, 3):
        q = loss_fn().sinkhorn_knopp_teacher(teacher, 0.07, n_iterations=n)
        assert q.dtype == torch.float32 and q.shape == (48, 32)
        torch.testing.assert_close(q.double(), sinkhorn_knopp_written_out(teacher, 0.07, n), rtol=1e-5, atol=1e-8)


def test_sinkhorn_knopp_marginals():
    """Every image's assignment sums to 1; every prototype receives about B/K images, exactly once converged."""
    torch.manual_seed(1)
    teacher = torch.randn(64, 16)
    q = loss_fn(16).sinkhorn_knopp_teacher(teacher, 0.1)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))
    per_prototype = q.sum(dim=0)
    assert per_prototype.sum().item() == pytest.approx(64, rel=1e-5)
    assert (per_prototype - 64 / 16).abs().max() < 64 / 16  # about B/K after 3 iterations ...
    converged = loss_fn(16).sinkhorn_knopp_teacher(teacher, 0.1, n_iterations=500)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((16,), 64 / 16), rtol=1e-3, atol=0)  # ... then B/K
    # the teacher's ranking survives: each image's most likely prototype is the one it scored highest, mostly
    assert (converged.argmax(dim=1) == teacher.argmax(dim=1)).float().mean() > 0.5


def test_sinkhorn_knopp_does_not_overflow_where_the_written_out_form_does():
    """logits / temp above 88 overflow exp in fp32; the maximum subtracted first changes nothing else."""
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 2.0]])
    assert not torch.isfinite(torch.exp(teacher / 0.02)).all()
    q = loss_fn(3).sinkhorn_knopp_teacher(teacher, 0.02)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), sinkhorn_knopp_written_out(teacher.double() - 2.0, 0.02, 3))
    # an image whose every logit lies 150 x temp under the batch's best: exp(-150) is 0 even as an fp32 subnormal, so
    # its column would be all zeros (0 / 0); raised to the smallest normal, the image still gets an assignment
    far = torch.tensor([[1.0, 0.9, 0.8], [-2.0, -2.0, -2.0]])
    assert (torch.exp(far / 0.02 - 50.0)[1] == 0).all()
    q = loss_fn(3).sinkhorn_knopp_teacher(far, 0.02)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(2))


def test_sinkhorn_knopp_leaves_the_center_alone():
    args = main_dino.get_args_parser().parse_args(["--centering", "sinkhorn_knopp"])
    vars(args).update(arch="vit_tiny", patch_size=16, out_dim=32, global_crops_size=32, local_crops_size=16,
                      local_crops_number=2, use_fp16=False)
    dino = main_dino.DINO.build(args, utils.Distributed())
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
    metrics = dino.train_step(images, epoch=0, momentum=0.996, teacher_temp=0.04)
    assert torch.isfinite(metrics["loss"]) and torch.equal(dino.dino_loss.center, torch.zeros(1, 32))


def test_centering_default_is_the_originals():
    assert main_dino.get_args_parser().parse_args([]).centering == "centering"


def _sinkhorn_knopp_of_rank(rank):
    torch.manual_seed(0)
    teacher = torch.randn(2 * 6, 8)  # the same 12 images on every rank; each takes its half
    return loss_fn(8).sinkhorn_knopp_teacher(teacher.chunk(2)[rank], 0.1)


@pytest.mark.slow
def test_sinkhorn_knopp_in_2_processes_equals_1():
    """DINOv2 sums Q, its rows (per prototype) and the image count over all processes: 2 halves give the whole."""
    halves = torch.cat(run_in_gloo_processes(_sinkhorn_knopp_of_rank))
    torch.manual_seed(0)
    whole = loss_fn(8).sinkhorn_knopp_teacher(torch.randn(2 * 6, 8), 0.1)
    torch.testing.assert_close(halves, whole)


@pytest.mark.slow
def test_unknown_centering_is_one_line(tmp_path):
    make_image_folder(str(tmp_path / "images"), per_class=2)
    proc = run_script(["main_dino.py", "--centering", "sinkhorn", "--data_path", str(tmp_path / "images"),
                       "--output_dir", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2 and "--centering" in proc.stderr and "sinkhorn_knopp" in proc.stderr
    assert not (tmp_path / "out" / "log.txt").exists()


@pytest.mark.slow
def test_a_sinkhorn_knopp_run_logs_and_resumes(tmp_path):
    make_image_folder(str(tmp_path / "images"), per_class=4)
    cmd = ["main_dino.py", "--arch", "vit_tiny", "--patch_size", "16", "--global_crops_size", "32",
           "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4",
           "--num_workers", "0", "--warmup_epochs", "0", "--centering", "sinkhorn_knopp",
           "--data_path", str(tmp_path / "images"),
           "--output_dir", str(tmp_path / "out")]
    run_script(cmd + ["--epochs", "1"])
    run_script(cmd + ["--epochs", "2"])
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.txt")]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["train_loss"] > 0 for r in log)
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert torch.equal(checkpoint["dino_loss"]["center"], torch.zeros(1, 64))
