"""main_dino.py run for real on small generated data: flags, checkpoints, launchers, kill and resume, bad input."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, free_port, make_image_folder, run_script, script_env

REFERENCE_DEFAULTS = {
    "arch": "vit_small", "patch_size": 16, "out_dim": 65536, "norm_last_layer": True, "momentum_teacher": 0.996,
    "use_bn_in_head": False, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
    "use_fp16": True, "weight_decay": 0.04, "weight_decay_end": 0.4, "clip_grad": 3.0, "batch_size_per_gpu": 64,
    "epochs": 100, "freeze_last_layer": 1, "lr": 0.0005, "warmup_epochs": 10, "min_lr": 1e-06, "optimizer": "adamw",
    "drop_path_rate": 0.1, "global_crops_scale": (0.4, 1.0), "local_crops_number": 8,
    "local_crops_scale": (0.05, 0.4), "data_path": "/path/to/imagenet/train/", "output_dir": ".", "saveckp_freq": 20,
    "seed": 0, "num_workers": 10, "dist_url": "env://", "local_rank": 0}


def tiny_args(data, out, epochs=2, **overrides):
    args = {"arch": "vit_tiny", "patch_size": 8, "global_crops_size": 32, "local_crops_size": 16,
            "local_crops_number": 2, "out_dim": 256, "batch_size_per_gpu": 8, "epochs": epochs, "warmup_epochs": 1,
            "num_workers": 0, "data_path": data, "output_dir": out}
    args.update(overrides)
    return ["main_dino.py"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def test_flags_and_defaults_are_the_originals():
    import main_dino
    parsed = main_dino.get_args_parser().parse_args([])
    assert parsed.patch_size is None  # "not given": the arch's own, 16 for the original's vit_small
    args = main_dino.utils.resolve_patch_size(parsed, main_dino.PATCH_SIZE)  # what main runs with
    for name, default in REFERENCE_DEFAULTS.items():
        assert getattr(args, name) == default, name


def test_teacher_momentum_schedule_ends_at_one_or_at_momentum_teacher_end():
    """The original's cosine from --momentum_teacher to 1 by default; --momentum_teacher_end moves its end."""
    import math

    import main_dino
    parser = main_dino.get_args_parser()
    niter, epochs = 5, 3
    n = niter * epochs
    for flags, end in (([], 1.0), (["--momentum_teacher_end", "0.96"], 0.96),
                       (["--momentum_teacher_end", "0.99"], 0.99)):
        args = parser.parse_args(["--momentum_teacher", "0.96", "--epochs", str(epochs), "--warmup_epochs", "1",
                                  *flags])
        momentum = main_dino.Schedules.build(args, 1, niter).momentum
        expected = [end + 0.5 * (0.96 - end) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
        assert momentum == pytest.approx(expected, abs=1e-12)  # no warmup: the lr's 1 epoch is not the momentum's
    args = parser.parse_args(["--momentum_teacher_end", "1.5"])
    with pytest.raises(main_dino.utils.InputError, match="--momentum_teacher_end 1.5: must be"):
        main_dino.check_args(args)


def test_teacher_temperature_comes_from_the_schedules_with_the_others():
    """Schedules.apply returns each iteration's momentum and the teacher temperature of its epoch."""
    import main_dino
    args = main_dino.get_args_parser().parse_args(["--warmup_teacher_temp", "0.04", "--teacher_temp", "0.07",
                                                   "--warmup_teacher_temp_epochs", "2", "--epochs", "4",
                                                   "--warmup_epochs", "1"])
    niter = 3
    schedules = main_dino.Schedules.build(args, 1, niter)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    temps = [schedules.apply(optimizer, it)[1] for it in range(4 * niter)]
    assert temps == [0.04] * niter + [0.07] * (3 * niter)
    assert all(type(t) is float for t in temps)  # the checkpoint stays weights_only-loadable
    momentum, _ = schedules.apply(optimizer, 5)
    assert momentum == float(schedules.momentum[5])


@pytest.mark.slow
def test_help_is_fast_and_offline(monkeypatch):
    """Building, formatting and parsing the flags open no connection (the autouse no_network fixture) and call no
    torch.hub function: what a time limit on `--help` stood for, without a wall clock that a busy machine breaks."""
    import main_dino

    def no_hub(*args, **kwargs):
        raise AssertionError("torch.hub called while building or parsing the flags")

    for name in ("list", "help", "load", "load_state_dict_from_url", "download_url_to_file"):
        monkeypatch.setattr(torch.hub, name, no_hub)
    parser = main_dino.get_args_parser()
    help_text = parser.format_help()
    assert parser.parse_args([]).arch == REFERENCE_DEFAULTS["arch"]
    proc = run_script(["main_dino.py", "--help"])
    for flag in REFERENCE_DEFAULTS:
        assert f"--{flag}" in help_text and f"--{flag}" in proc.stdout


@pytest.mark.slow
def test_two_epochs_write_the_reference_checkpoint_layout(image_folder, tmp_path):
    out = str(tmp_path / "out")
    proc = run_script(tiny_args(image_folder, out, saveckp_freq=1))
    assert "world size 1" in proc.stdout and "fp32 on CPU" in proc.stdout
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "checkpoint0000.pth", "checkpoint0001.pth", "log.txt"]
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)  # args is a plain dict
    # no fp16_scaler on CPU; "log": the epoch's log line, for a run stopped before it reaches log.txt
    assert set(ckpt) == {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", "log"}
    assert ckpt["epoch"] == 2 and ckpt["args"]["arch"] == "vit_tiny"
    assert ckpt["dino_loss"]["center"].shape == (1, 256)
    student, teacher = ckpt["student"], ckpt["teacher"]
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in student)
    assert all(k.startswith(("backbone.", "head.")) for k in teacher)
    assert {"module." + k for k in teacher} == set(student)
    assert teacher["head.last_layer.weight_g"].shape == (256, 1)
    assert teacher["head.last_layer.weight_v"].shape == (256, 256)
    assert teacher["head.mlp.0.weight"].shape == (2048, 192)
    assert teacher["backbone.pos_embed"].shape == (1, 1 + (224 // 8) ** 2, 192)  # the published layout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1] and ckpt["log"] == log[1]
    for record in log:
        assert {"train_loss", "train_lr", "train_wd", "time", "images_per_s", "skipped_images"} <= set(record)
        assert record["train_loss"] > 0 and record["skipped_images"] == 0


@pytest.mark.slow
def test_original_code_layout_loads_back_for_evaluation(image_folder, tmp_path):
    """A checkpoint of ours, read the way the original's evaluation reads it: key, strip module., strip backbone."""
    import utils
    from vision_transformer import build_model
    out = str(tmp_path / "out")
    run_script(tiny_args(image_folder, out, epochs=1))
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    for key in ("teacher", "student"):
        sd = {k.replace("module.", "").replace("backbone.", ""): v for k, v in ckpt[key].items()}
        model = build_model("vit_tiny", patch_size=8)
        result = model.load_state_dict(sd, strict=False)
        assert result.missing_keys == [] and all(k.startswith("head.") for k in result.unexpected_keys)
        utils.load_pretrained_weights(build_model("vit_tiny", patch_size=8), os.path.join(out, "checkpoint.pth"),
                                      key, "vit_tiny", 8)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(image_folder, tmp_path):
    out = str(tmp_path / "out")
    args = tiny_args(image_folder, out, epochs=1, batch_size_per_gpu=4)
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *args])
    assert "world size 2" in proc.stdout
    log = read_log(out)
    assert len(log) == 1 and log[0]["images_per_s"] > 0
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["args"]["world_size"] == 2 and ckpt["epoch"] == 1
    assert all(k.startswith("module.") for k in ckpt["student"])


@pytest.mark.slow
def test_legacy_launcher_passes_local_rank(image_folder, tmp_path):
    out = str(tmp_path / "out")
    args = tiny_args(image_folder, out, epochs=1)
    proc = run_script(["-m", "torch.distributed.launch", "--nproc_per_node=1", f"--master_port={free_port()}", *args])
    assert "world size 1" in proc.stdout and os.path.isfile(os.path.join(out, "checkpoint.pth"))


@pytest.mark.slow
def test_sigkill_then_resume_from_last_completed_epoch(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class=16)
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, *tiny_args(data, out, epochs=4)], cwd=REPO, env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = os.path.join(out, "log.txt")
    deadline = time.time() + 300
    while not (os.path.exists(log_path) and open(log_path).read().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, "training ended or hung before its first epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_log(out))
    assert 1 <= done < 4, "killed too late to test resuming"
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["epoch"] >= done
    resumed = run_script(tiny_args(data, out, epochs=4))
    assert "Found checkpoint" in resumed.stdout
    epochs = [r["epoch"] for r in read_log(out)]
    assert epochs == list(range(4)), epochs  # nothing repeated, nothing missing


@pytest.mark.slow
def test_corrupt_image_is_skipped_and_counted(image_folder, tmp_path):
    with open(os.path.join(image_folder, "class0", "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    out = str(tmp_path / "out")
    proc = run_script(tiny_args(image_folder, out, epochs=1, batch_size_per_gpu=5))  # 25 files: none dropped
    assert "skipping unreadable image" in proc.stderr and "corrupt.jpg" in proc.stderr
    assert read_log(out)[0]["skipped_images"] == 1


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(image_folder, tmp_path):
    out = str(tmp_path / "out")
    run_script(tiny_args(image_folder, out, epochs=1))
    path = os.path.join(out, "checkpoint.pth")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    # a teacher temperature of 1e-40 overflows the softmax: the loss becomes NaN in the first step of epoch 1
    proc = run_script(tiny_args(image_folder, out, epochs=2, teacher_temp=1e-40, warmup_teacher_temp=1e-40),
                      check=False)
    assert proc.returncode == 1
    assert "stopping training" in proc.stdout
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    assert len(read_log(out)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("case,expected", [
    ("missing", "data folder .*missing: does not exist"),
    ("empty", "data folder .*empty: no class subfolders"),
    ("no_images", "no images"),
    ("unknown_arch", "unknown --arch 'vit_gigantic'"),
    ("warmup_temp", "--warmup_teacher_temp_epochs 5 is more than --epochs 2"),
    ("small_dataset", "has 24 images, fewer than one batch .*--batch_size_per_gpu 64"),
])
def test_bad_input_is_one_clear_line(image_folder, tmp_path, case, expected):
    import re
    data = image_folder
    extra = {}
    if case == "missing":
        data = str(tmp_path / "missing")
    elif case == "empty":
        data = str(tmp_path / "empty")
        os.makedirs(data)
    elif case == "no_images":
        data = str(tmp_path / "text")
        os.makedirs(os.path.join(data, "a"))
        open(os.path.join(data, "a", "readme.txt"), "w").close()
    elif case == "unknown_arch":
        extra["arch"] = "vit_gigantic"
    elif case == "warmup_temp":
        extra["warmup_teacher_temp_epochs"] = 5
    elif case == "small_dataset":
        extra["batch_size_per_gpu"] = 64
    proc = run_script(tiny_args(data, str(tmp_path / "out"), **extra), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(expected, lines[0]), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_knn_monitoring_logs_the_teachers_accuracy(tmp_path):
    """The k-NN written to log.txt equals a weighted k-NN computed here from the final teacher's features."""
    import numpy as np
    from PIL import Image

    import utils
    from vision_transformer import build_model
    data = make_image_folder(str(tmp_path / "data"))
    knn_root = tmp_path / "knn"
    make_image_folder(str(knn_root / "train"), per_class=6, seed=1)
    make_image_folder(str(knn_root / "val"), per_class=3, seed=2)
    out = str(tmp_path / "out")
    run_script(tiny_args(data, out, epochs=2, knn_data_path=knn_root, knn_k=5, resize_size=32, crop_size=32))
    log = read_log(out)
    assert "knn_top1_init" in log[0] and all("knn_top1" in r and 0 <= r["knn_top1"] <= 100 for r in log)

    model = build_model("vit_tiny", patch_size=8).eval()
    utils.load_pretrained_weights(model, os.path.join(out, "checkpoint.pth"), "teacher", "vit_tiny", 8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def features(split):
        feats, labels = [], []
        for c in range(3):
            folder = knn_root / split / f"class{c}"
            for name in sorted(os.listdir(folder)):  # 32x32 images: resize 32 and crop 32 leave them as they are
                x = (np.asarray(Image.open(folder / name).convert("RGB")) / 255.0 - mean) / std
                with torch.no_grad():
                    f = model(torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None])[0]
                feats.append(f / f.norm())
                labels.append(c)
        return torch.stack(feats), labels

    bank, bank_labels = features("train")
    queries, query_labels = features("val")
    correct = 0
    for q, label in zip(queries, query_labels):
        sim = bank @ q
        top = sim.topk(5)
        votes = [sum(float(torch.exp(s / 0.07)) for s, i in zip(top.values, top.indices) if bank_labels[i] == c)
                 for c in range(3)]
        correct += int(np.argmax(votes) == label)
    assert log[-1]["knn_top1"] == pytest.approx(100.0 * correct / len(query_labels))
