"""Resuming main_dino.py from the checkpoints the original wrote and ours: parameter order, precision and device
changes, refusals of what does not fit; a kill during the k-NN monitoring; flags checked before the rendezvous;
NumPy 1 pickles; the compiled teacher and the k-NN monitoring."""
import argparse
import io
import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main_dino
import utils
from conftest import REPO, free_port, make_image_folder, run_script, script_env
from vision_transformer import build_model

OUT_DIM = 64


class OriginalHead(nn.Module):
    """The original's DINOHead as it registers its parameters: MLP, then torch's weight_norm (weight_g, then
    weight_v); with previous_release, weight_v before weight_g, as our releases before this fix did."""

    def __init__(self, in_dim, norm_last_layer, previous_release=False):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(),
                                 nn.Linear(2048, 256))
        layer = nn.Linear(256, OUT_DIM, bias=False)
        if previous_release:
            self.last_layer = nn.Module()
            self.last_layer.weight_v = nn.Parameter(layer.weight.detach().clone())
            self.last_layer.weight_g = nn.Parameter(torch.ones(OUT_DIM, 1))
        else:
            with warnings.catch_warnings():  # deprecated, but it is what the original used
                warnings.simplefilter("ignore", FutureWarning)
                self.last_layer = nn.utils.weight_norm(layer)
            self.last_layer.weight_g.data.fill_(1)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        lay = self.last_layer
        return F.linear(x, lay.weight_v * lay.weight_g / lay.weight_v.norm(dim=1, keepdim=True))


class OriginalStudent(nn.Module):
    """MultiCropWrapper as the original built it, under DDP's `module.`: backbone, then head."""

    def __init__(self, norm_last_layer, previous_release=False):
        super().__init__()
        self.module = nn.Module()
        self.module.backbone = build_model("vit_tiny", patch_size=8)
        self.module.head = OriginalHead(192, norm_last_layer, previous_release)

    def forward(self, x):
        return self.module.head(self.module.backbone(x))


def original_checkpoint(path, norm_last_layer, previous_release=False, fp16_scaler=True):
    """A full checkpoint in the original's format after 3 AdamW steps in the original's parameter order. Returns
    {parameter name: its exp_avg} to check where the moments land."""
    torch.manual_seed(0)
    student = OriginalStudent(norm_last_layer, previous_release)
    groups = utils.get_params_groups(student)  # the original's rule: biases and 1-D parameters undecayed
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        student(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean().backward()
        optimizer.step()
    for group in optimizer.param_groups:  # the original's schedules write numpy floats
        group["lr"], group["weight_decay"] = np.float64(1e-4), np.float64(group["weight_decay"])
    teacher = {k.removeprefix("module."): v for k, v in student.state_dict().items()}
    checkpoint = {"student": student.state_dict(), "teacher": teacher, "optimizer": optimizer.state_dict(),
                  "epoch": 1, "dino_loss": {"center": torch.randn(1, OUT_DIM)},
                  "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=OUT_DIM,
                                             norm_last_layer=norm_last_layer, use_fp16=fp16_scaler)}
    if fp16_scaler:
        checkpoint["fp16_scaler"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                     "growth_interval": 2000, "_growth_tracker": 7}
    torch.save(checkpoint, path)
    return {name: optimizer.state[p]["exp_avg"].clone() for name, p in student.named_parameters()
            if p in optimizer.state}


def training_args(out, **overrides):
    args = main_dino.get_args_parser().parse_args([])
    args.arch, args.patch_size, args.out_dim, args.drop_path_rate = "vit_tiny", 8, OUT_DIM, 0.0
    args.global_crops_size, args.local_crops_size, args.local_crops_number = 32, 16, 2
    args.output_dir = str(out)
    vars(args).update(overrides)
    return args


def resume_in_process(out, scaler_enabled=False, **overrides):
    """main_dino's networks, optimizer, loss scaler and loss, resumed from out/checkpoint.pth."""
    args = training_args(out, **overrides)
    dino = main_dino.DINO.build(args, utils.Distributed())
    if scaler_enabled:  # what build_precision gives with --use_fp16 on a GPU
        dino.fp16_scaler = torch.amp.GradScaler("cpu", enabled=True)
    checkpoint = dino.resume(os.path.join(out, "checkpoint.pth"))
    return dino.student, dino.optimizer, dino.fp16_scaler, dino.dino_loss, checkpoint


def test_parameter_order_is_the_originals():
    """named_parameters() order, which optimizer state follows, as the original's modules register them."""
    student = main_dino.build_networks(training_args("."), utils.Distributed())[0]
    names = [n.removeprefix("module.") for n, _ in student.named_parameters()]
    block = [f"{m}.{w}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for w in ("weight", "bias")]
    expected = ["backbone." + n for n in ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
                + [f"blocks.{i}.{n}" for i in range(12) for n in block] + ["norm.weight", "norm.bias"]]
    expected += [f"head.mlp.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]
    expected += ["head.last_layer.weight_g", "head.last_layer.weight_v"]  # torch's weight_norm: g, then v
    assert names == expected
    assert names == [n.removeprefix("module.") for n, _ in OriginalStudent(True).named_parameters()]


@pytest.mark.parametrize("norm_last_layer", [False, True])
@pytest.mark.parametrize("previous_release", [False, True], ids=["original", "previous_release"])
def test_moments_land_on_their_parameters(tmp_path, norm_last_layer, previous_release):
    expected = original_checkpoint(tmp_path / "checkpoint.pth", norm_last_layer, previous_release)
    student, optimizer, _, dino_loss, checkpoint = resume_in_process(tmp_path, norm_last_layer=norm_last_layer)
    assert checkpoint["epoch"] == 1
    landed = {name: optimizer.state[p]["exp_avg"] for name, p in student.named_parameters()
              if p in optimizer.state}
    assert set(landed) == set(expected) and len(landed) == len(list(student.parameters())) - norm_last_layer
    for name, exp_avg in expected.items():
        torch.testing.assert_close(landed[name], exp_avg, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(dino_loss.center, checkpoint["dino_loss"]["center"])
    # and it trains on: an AdamW step with these moments
    optimizer.zero_grad()
    student([torch.randn(2, 3, 32, 32)]).logsumexp(-1).mean().backward()
    optimizer.step()


@pytest.mark.slow
@pytest.mark.parametrize("norm_last_layer", [False, True])
def test_original_full_checkpoint_trains_on(tmp_path, norm_last_layer):
    """The script resumes the original's checkpoint (fp16 scaler included, here on the CPU) and trains epoch 1."""
    out = tmp_path / "out"
    out.mkdir()
    original_checkpoint(out / "checkpoint.pth", norm_last_layer)
    data = make_image_folder(str(tmp_path / "data"))
    proc = run_script(["main_dino.py", "--arch", "vit_tiny", "--patch_size", 8, "--out_dim", OUT_DIM,
                       "--global_crops_size", 32, "--local_crops_size", 16, "--local_crops_number", 2,
                       "--batch_size_per_gpu", 8, "--epochs", 2, "--warmup_epochs", 1, "--num_workers", 0,
                       "--norm_last_layer", norm_last_layer, "--data_path", data, "--output_dir", out])
    assert "was trained with fp16 loss scaling; this run trains in fp32 on cpu" in proc.stdout
    assert "was written on cuda; resuming on cpu" in proc.stdout
    log = [json.loads(line) for line in open(out / "log.txt")]
    assert [r["epoch"] for r in log] == [1] and np.isfinite(log[0]["train_loss"])


def test_precision_change_is_accepted_and_said(tmp_path, capsys):
    """A CPU/bf16 checkpoint (no fp16_scaler) resumes with fp16 loss scaling on, and the other way round."""
    original_checkpoint(tmp_path / "checkpoint.pth", True, fp16_scaler=False)
    _, _, scaler, _, _ = resume_in_process(tmp_path, scaler_enabled=True, norm_last_layer=True)
    assert scaler.get_scale() == 65536.0  # the initial scale
    assert "trained without fp16 loss scaling (CPU, bf16 or fp32); this run uses it" in capsys.readouterr().out
    original_checkpoint(tmp_path / "checkpoint.pth", True, fp16_scaler=True)
    assert resume_in_process(tmp_path, scaler_enabled=True, norm_last_layer=True)[2].get_scale() == 1024.0
    resume_in_process(tmp_path, scaler_enabled=False, norm_last_layer=True, use_bf16=True)
    assert "was trained with fp16 loss scaling; this run trains in bf16 on cpu" in capsys.readouterr().out


@pytest.mark.parametrize("overrides,message", [
    ({"out_dim": 32}, r"checkpoint.pth \(key 'student'\) does not fit this model: shapes differ: "
                      r"module.head.last_layer.weight_g \[64, 1\] in file vs \[32, 1\] in model"),
    ({"arch": "vit_small"}, r"shapes differ: module.backbone.cls_token \[1, 1, 192\] in file vs \[1, 1, 384\]"),
    ({"patch_size": 16}, r"shapes differ: module.backbone.pos_embed \[1, 785, 192\] in file vs \[1, 197, 192\]"),
])
def test_what_does_not_fit_is_one_line_naming_the_shapes(tmp_path, overrides, message):
    original_checkpoint(tmp_path / "checkpoint.pth", True)
    with pytest.raises(utils.InputError, match=message):
        resume_in_process(tmp_path, norm_last_layer=True, **overrides)


def test_moments_of_another_shape_are_refused(tmp_path):
    """An optimizer state whose moments do not fit their parameters (written by other code) is refused, naming it."""
    original_checkpoint(tmp_path / "checkpoint.pth", False)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    state = checkpoint["optimizer"]["state"]
    state[0], state[1] = state[1], state[0]  # the moments of the first two weights swapped
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with pytest.raises(utils.InputError, match=r"the optimizer's 'exp_avg' of module.backbone.cls_token is "
                                               r"\[1, 785, 192\] in the file, the parameter is \[1, 1, 192\]"):
        resume_in_process(tmp_path, norm_last_layer=False)


def test_numpy_1_pickles_load(tmp_path):
    """The original's checkpoints were pickled by NumPy 1, whose scalars live in numpy.core (numpy._core in 2)."""
    buf = io.BytesIO()
    torch.save({"lr": np.float64(0.5), "w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    spelling = b"numpy._core.multiarray" if b"numpy._core.multiarray" in raw else b"numpy.core.multiarray"
    for module in (b"numpy.core.multiarray", b"numpy._core.multiarray"):
        path = tmp_path / "np.pth"
        path.write_bytes(raw.replace(spelling, module))
        loaded = utils.torch_load(str(path))
        assert loaded["lr"] == 0.5 and type(loaded["lr"]) is np.float64


# ============ a kill during the k-NN monitoring ============

KILL_DURING_KNN = """
import os, signal, sys
import main_dino, utils
calls = []
real = main_dino.knn_monitor
def knn_monitor(*args):
    calls.append(1)
    if len(calls) == 2:  # the first is the baseline before training; the second comes after epoch 0's checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
main_dino.knn_monitor = knn_monitor
parser = main_dino.argparse.ArgumentParser(parents=[main_dino.get_args_parser()])
main_dino.main(parser.parse_args(sys.argv[1:]))
"""


def knn_run_args(data, knn, out):
    return ["--arch", "vit_tiny", "--patch_size", 8, "--global_crops_size", 32, "--local_crops_size", 16,
            "--local_crops_number", 2, "--out_dim", 128, "--batch_size_per_gpu", 8, "--epochs", 2,
            "--warmup_epochs", 1, "--num_workers", 0, "--data_path", data, "--output_dir", out,
            "--knn_data_path", knn, "--knn_k", 5, "--resize_size", 32, "--crop_size", 32]


@pytest.mark.slow
def test_kill_during_knn_monitoring_loses_no_log_line(tmp_path):
    data = make_image_folder(str(tmp_path / "data"))
    knn = tmp_path / "knn"
    make_image_folder(str(knn / "train"), per_class=6, seed=0)
    make_image_folder(str(knn / "val"), per_class=3, seed=0)
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_KNN, *map(str, knn_run_args(data, knn, killed))],
                          cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(killed / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert not os.path.exists(killed / "log.txt")  # killed between epoch 0's checkpoint and its log line

    resumed = run_script(["main_dino.py", *knn_run_args(data, knn, killed)])
    assert "log.txt had no line for epoch 0" in resumed.stdout
    run_script(["main_dino.py", *knn_run_args(data, knn, reference)])  # the same run, never interrupted
    log, ref = ([json.loads(line) for line in open(d / "log.txt")] for d in (killed, reference))
    assert [r["epoch"] for r in log] == [0, 1]
    timing = {"time", "images_per_s"}
    assert {k: v for k, v in log[0].items() if k not in timing} == {k: v for k, v in ref[0].items()
                                                                    if k not in timing}
    assert "knn_top1_init" in log[0] and "knn_top1" in log[0] and "knn_top1" in log[1]


# ============ flags before the rendezvous ============

@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_bad_flags_fail_before_the_rendezvous_and_print_once(tmp_path, rank):
    """Process `rank` of a 2-process job whose peer never comes: a bad flag ends it at once (it would wait for
    the peer if the flags were checked after joining the group); only rank 0 prints the error."""
    env = script_env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    proc = run_script(["main_dino.py", "--epochs", 2, "--warmup_epochs", 1, "--warmup_teacher_temp_epochs", 5,
                       "--data_path",
                       tmp_path / "nowhere"], env=env, check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == (["error: --warmup_teacher_temp_epochs 5 is more than --epochs 2"] if rank == 0 else [])


# ============ --compile with the k-NN monitoring ============

def test_knn_monitoring_of_a_compiled_teacher_compiles_nothing(tmp_path):
    """The compiled teacher runs the training crops; the k-NN monitoring, at other batch sizes and under inference
    mode, runs the eager backbone and so triggers no compilation."""
    from torch._dynamo.utils import counters
    knn = tmp_path / "knn"
    make_image_folder(str(knn / "train"), per_class=3, seed=0)
    make_image_folder(str(knn / "val"), per_class=2, seed=0)
    args = training_args(tmp_path, knn_data_path=str(knn), knn_k=3, knn_batch_size=5, resize_size=32, crop_size=32,
                         num_workers=0)
    torch._dynamo.reset()
    teacher = main_dino.build_networks(args, utils.Distributed())[2]
    teacher.compile_parts(backend="aot_eager")
    with torch.no_grad():
        teacher([torch.randn(4, 3, 32, 32)] * 2)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    main_dino.knn_monitor(teacher.backbone, main_dino.build_knn_loaders(args, utils.Distributed()), args,
                          utils.Distributed())
    assert counters["stats"]["unique_graphs"] == compiled
