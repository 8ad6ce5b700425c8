"""Collectives under NCCL's device rule, emulated on the CPU: training, k-NN and linear evaluation in 2 processes whose
process group, like NCCL, serves no CPU tensor (tests/nccl_emulation); and no collective outside utils' helpers."""
import ast
import glob
import json
import os
import re

import numpy as np
import pytest

from conftest import REPO, free_port, make_image_folder, run_script, script_env, write_split

EMULATION = os.path.join(REPO, "tests", "nccl_emulation")
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "gather_object", "scatter", "scatter_object_list", "barrier",
               "monitored_barrier", "send", "recv", "isend", "irecv"}
HELPERS = {"_all_reduce", "all_gather_cat", "barrier"}  # process_group.py: the only functions that call a collective


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A training ImageFolder, and train/ + val/ splits of 3 colour classes with a random vit_tiny/16 backbone."""
    import torch

    from vision_transformer import build_model
    root = tmp_path_factory.mktemp("nccl")
    make_image_folder(str(root / "images"), per_class=8)
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 226, size=(3, 3))
    write_split(str(root / "split" / "train"), colours, 6, rng, 32)
    write_split(str(root / "split" / "val"), colours, 3, rng, 32)
    torch.manual_seed(0)
    torch.save(build_model("vit_tiny", patch_size=16).state_dict(), root / "backbone.pth")
    return root


def run_emulated(args):
    """`torchrun --nproc_per_node=2 <args>` with the NCCL emulation in every worker; returns the CompletedProcess."""
    env = script_env(PYTHONPATH=EMULATION)
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *args],
                      env=env)
    assert proc.stdout.count("nccl emulation: the process group serves lazy tensors only") == 2  # both ranks
    assert "world size 2" in proc.stdout
    return proc


@pytest.mark.slow
def test_training_with_knn_monitoring_under_nccls_device_rule(data, tmp_path):
    """Training steps (center, loss check), the epoch's averaged stats and the k-NN monitoring all communicate."""
    out = tmp_path / "out"
    run_emulated(["main_dino.py", "--arch", "vit_tiny", "--patch_size", 8, "--global_crops_size", 32,
                  "--local_crops_size", 16, "--local_crops_number", 2, "--out_dim", 256, "--batch_size_per_gpu", 4,
                  "--epochs", 2, "--warmup_epochs", 1, "--num_workers", 0, "--log_freq", 1,
                  "--data_path", data / "images", "--output_dir", out, "--knn_data_path", data / "split",
                  "--knn_k", 5, "--resize_size", 32, "--crop_size", 32])
    log = [json.loads(line) for line in open(out / "log.txt")]
    assert [r["epoch"] for r in log] == [0, 1]
    assert all(np.isfinite(r["train_loss"]) and "knn_top1" in r for r in log) and "knn_top1_init" in log[0]


@pytest.mark.slow
def test_knn_evaluation_under_nccls_device_rule_equals_one_process(data):
    """Feature extraction gathers every batch and the vote sums its counts: the result is the one-process result."""
    common = ["eval_knn.py", "--arch", "vit_tiny", "--pretrained_weights", data / "backbone.pth", "--data_path",
              data / "split", "--num_workers", 0, "--resize_size", 32, "--crop_size", 32, "--batch_size_per_gpu", 4,
              "--nb_knn", 1, 3, 10]
    two = run_emulated(common)
    one = run_script(common)
    results = [re.findall(r"\d+-NN classifier result: .*", p.stdout) for p in (two, one)]
    assert len(results[0]) == 3 and results[0] == results[1]


@pytest.mark.slow
def test_linear_evaluation_under_nccls_device_rule(data, tmp_path):
    """The linear classifier's training stats and the validation sums communicate."""
    run_emulated(["eval_linear.py", "--arch", "vit_tiny", "--pretrained_weights", data / "backbone.pth",
                  "--data_path", data / "split", "--num_workers", 0, "--resize_size", 32, "--crop_size", 32,
                  "--batch_size_per_gpu", 4, "--epochs", 2, "--output_dir", tmp_path])
    log = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert [r["epoch"] for r in log] == [0, 1] and all(0 <= r["test_acc1"] <= 100 for r in log)


def test_no_collective_outside_the_helpers():
    """Every torch.distributed collective in the code is one of dinolib.process_group's helpers, which put tensors on the group's
    device: a new collective written elsewhere would pass the gloo tests and stop a GPU run."""
    calls = []
    for path in glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "*", "*.py")):
        if os.sep + "tests" + os.sep in path:
            continue
        tree = ast.parse(open(path).read())
        for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)] + [tree]:
            for node in ast.walk(func) if func is not tree else ast.iter_child_nodes(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in COLLECTIVES and ast.unparse(node.func.value) in ("dist",
                                                                                             "torch.distributed"):
                    calls.append((os.path.relpath(path, REPO), getattr(func, "name", "<module>")))
    assert calls and all(path == os.path.join("dinolib", "process_group.py") and name in HELPERS
                         for path, name in calls), calls


def test_a_cpu_tensor_goes_to_this_processs_gpu_under_nccl(monkeypatch):
    """Under NCCL ("cuda:nccl") a CPU tensor is reduced on this process's GPU; under gloo where it lives."""
    import torch
    import torch.distributed as dist

    import utils
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "get_backend_config", lambda: "cuda:nccl")
    assert utils._group_device(torch.device("cpu")) == torch.device("cuda", 3)
    assert utils._group_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend_config", lambda: "cpu:gloo,cuda:gloo")
    assert utils._group_device(torch.device("cpu")) == torch.device("cpu")
