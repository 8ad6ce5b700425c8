"""eval_linear.py: the frozen-feature layouts, the classifier's initialisation, a short training whose accuracy rises
and matches one computed here, the learning-rate schedule, exact resume, --evaluate, two processes, and bad input."""
import argparse
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import eval_linear
import utils
from conftest import free_port, run_script
from vision_transformer import build_model

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
N_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 6, 3
IMAGE, RESIZE, CROP = 40, 36, 32
LR, BATCH, EPOCHS = 0.1, 8, 4


def linear_args(*extra):
    parser = argparse.ArgumentParser(parents=[eval_linear.get_args_parser()])
    return parser.parse_args(["--arch", "vit_tiny", "--num_workers", "0", "--resize_size", str(RESIZE),
                              "--crop_size", str(CROP), "--batch_size_per_gpu", str(BATCH), "--lr", str(LR),
                              "--epochs", str(EPOCHS), *map(str, extra)])


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(eval_data):
    """A 6-class dataset, a random vit_tiny/16, and a 4-epoch linear run on its frozen features."""
    root, model = eval_data(N_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, IMAGE)
    eval_linear.main(linear_args("--pretrained_weights", root / "backbone.pth", "--data_path", root / "data",
                                 "--output_dir", root / "run"))
    return root, model


def base_args(root, *extra):
    return linear_args("--pretrained_weights", root / "backbone.pth", "--data_path", root / "data", *extra)


def cls_tokens_by_hand(model, images):
    """Normed token outputs of every block, running the blocks one by one: [(B, 1 + N, D)] * depth."""
    x = model.prepare_tokens(images)
    outs = []
    for blk in model.blocks:
        x = blk(x)
        outs.append(model.norm(x))
    return outs


@torch.no_grad()
def test_frozen_feature_layouts():
    torch.manual_seed(0)
    model = build_model("vit_tiny", patch_size=16).eval()
    images = torch.randn(2, 3, 32, 32)
    outs = cls_tokens_by_hand(model, images)
    D = 192

    def features(n, avgpool):
        args = argparse.Namespace(n_last_blocks=n, avgpool_patchtokens=avgpool, arch="vit_tiny")
        f = eval_linear.frozen_features(model, images, args)
        assert f.shape == (2, eval_linear.check_feature_args(model, args))
        return f

    f = features(4, False)  # ViT-S recipe: [CLS] of blocks 9, 10, 11, 12, block after block
    assert f.shape == (2, 4 * D)
    for j, out in enumerate(outs[-4:]):
        assert torch.allclose(f[:, j * D:(j + 1) * D], out[:, 0], atol=1e-5)
    f = features(1, True)  # ViT-B recipe: the original's element-wise interleaving of [CLS] and patch mean
    assert f.shape == (2, 2 * D)
    assert torch.allclose(f[:, 0::2], outs[-1][:, 0], atol=1e-5)
    assert torch.allclose(f[:, 1::2], outs[-1][:, 1:].mean(dim=1), atol=1e-5)
    f = features(2, True)  # more blocks with the patch mean: appended
    assert torch.allclose(f, torch.cat([outs[-2][:, 0], outs[-1][:, 0], outs[-1][:, 1:].mean(dim=1)], 1), atol=1e-5)

    resnet = build_model("resnet18").eval()
    args = argparse.Namespace(n_last_blocks=4, avgpool_patchtokens=False, arch="resnet18")
    assert eval_linear.check_feature_args(resnet, args) == 512
    assert eval_linear.frozen_features(resnet, images, args).shape == (2, 512)


def test_linear_classifier_init_and_keys():
    torch.manual_seed(0)
    clf = utils.LocalWrapper(eval_linear.LinearClassifier(1536, 1000))
    assert sorted(clf.state_dict()) == ["module.linear.bias", "module.linear.weight"]
    w = clf.module.linear.weight
    assert w.shape == (1000, 1536)
    assert abs(w.std().item() - 0.01) < 2e-4 and abs(w.mean().item()) < 2e-4  # N(0, 0.01): 1.5M draws
    assert torch.count_nonzero(clf.module.linear.bias) == 0


@pytest.mark.slow
def test_crops_depend_on_seed_epoch_and_index_only(trained):
    """Persistent workers (started by the fork server) see set_epoch and crop exactly as the main process does."""
    from torchvision import transforms
    root, _ = trained
    dataset = eval_linear.EpochSeeded(utils.ImageFolderSkipBad(
        str(root / "data" / "train"), transforms.Compose([transforms.RandomResizedCrop(8), transforms.ToTensor()])), 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=1, persistent_workers=True,
                                         multiprocessing_context=utils.worker_start_method(1))
    crops = {}
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        in_main = torch.stack([dataset[i][0] for i in range(len(dataset))])
        in_worker = torch.cat([images for images, _ in loader])
        assert torch.equal(in_main, in_worker), epoch
        assert torch.equal(crops.setdefault(epoch, in_main), in_main)  # epoch 0 again: the same crops
    assert not torch.equal(crops[0], crops[1])


@pytest.mark.slow
def test_train_crop_scale(trained):
    """--train_crop_scale 1 1: every training crop is the whole image resized, or its mirror; the original's
    0.08 1 (the default) crops parts of them."""
    root, _ = trained
    normalize = np.array(MEAN, np.float32), np.array(STD, np.float32)
    for scale, whole in (((1, 1), True), ((), False)):
        args = base_args(root, *(("--train_crop_scale", *scale) if scale else ()))
        dataset = eval_linear.build_data_loaders(args, utils.init_distributed_mode(args))[0].dataset
        assert tuple(args.train_crop_scale) == (scale or (0.08, 1.0))
        is_whole = []
        for i, (path, _) in enumerate(dataset.dataset.samples):
            img = Image.open(path).convert("RGB").resize((CROP, CROP), Image.BILINEAR)
            ref = torch.tensor((np.asarray(img, np.float32) / 255 - normalize[0]) / normalize[1]).permute(2, 0, 1)
            crop = dataset[i][0]
            is_whole.append(any(torch.allclose(crop, r, atol=1e-5) for r in (ref, ref.flip(-1))))
        assert all(is_whole) if whole else sum(is_whole) < len(is_whole) / 2


def reference_accuracy(model, root, state_dict):
    """Acc@1 and Acc@5 of the saved classifier on val/, transforms written with PIL + numpy, blocks run by hand."""
    images, labels = [], []
    val = root / "data" / "val"
    for c, cls in enumerate(sorted(os.listdir(val))):
        for name in sorted(os.listdir(val / cls)):
            img = Image.open(val / cls / name).convert("RGB").resize((RESIZE, RESIZE), Image.BICUBIC)
            off = (RESIZE - CROP) // 2
            x = (np.asarray(img, np.float64)[off:off + CROP, off:off + CROP] / 255.0 - MEAN) / STD
            images.append(torch.tensor(x, dtype=torch.float32).permute(2, 0, 1))
            labels.append(c)
    with torch.no_grad():
        outs = cls_tokens_by_hand(model, torch.stack(images))
        feats = torch.cat([o[:, 0] for o in outs[-4:]], dim=1)
        logits = feats @ state_dict["module.linear.weight"].T + state_dict["module.linear.bias"]
    ranking = logits.argsort(dim=1, descending=True)
    labels = torch.tensor(labels)
    return (100.0 * (ranking[:, 0] == labels).float().mean().item(),
            100.0 * (ranking[:, :5] == labels[:, None]).any(1).float().mean().item())


@pytest.mark.slow
def test_training_accuracy_rises_checkpoint_and_schedule(trained):
    root, model = trained
    log = read_log(root / "run")
    assert [entry["epoch"] for entry in log] == list(range(EPOCHS))
    acc = [entry["test_acc1"] for entry in log]
    assert acc[-1] > acc[0] and acc[-1] >= 80, acc  # separable colours, random backbone
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    base_lr = LR * BATCH / 256  # one process
    for entry in log:  # cosine annealing to 0 over the epochs, one value per epoch
        assert entry["train_lr"] == pytest.approx(base_lr * (1 + math.cos(math.pi * entry["epoch"] / EPOCHS)) / 2)
    ckp = torch.load(root / "run" / "checkpoint.pth.tar", weights_only=True)
    assert set(ckp) == {"epoch", "state_dict", "optimizer", "scheduler", "best_acc"}
    assert ckp["epoch"] == EPOCHS and ckp["best_acc"] == max(acc)
    assert ckp["state_dict"]["module.linear.weight"].shape == (N_CLASSES, 4 * 192)
    assert ckp["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert ckp["optimizer"]["param_groups"][0]["weight_decay"] == 0
    acc1, acc5 = reference_accuracy(model, root, ckp["state_dict"])
    assert log[-1]["test_acc1"] == pytest.approx(acc1) and log[-1]["test_acc5"] == pytest.approx(acc5)
    assert log[-1]["test_n"] == N_CLASSES * VAL_PER_CLASS


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(trained, tmp_path, monkeypatch, capsys):
    root, _ = trained
    real_train = eval_linear.train

    def train_then_stop(model, linear_classifier, optimizer, loader, epoch, args):
        if epoch == 2:
            raise KeyboardInterrupt  # killed during epoch 2: the checkpoint holds epochs 0 and 1
        return real_train(model, linear_classifier, optimizer, loader, epoch, args)

    monkeypatch.setattr(eval_linear, "train", train_then_stop)
    with pytest.raises(KeyboardInterrupt):
        eval_linear.main(base_args(root, "--output_dir", tmp_path))
    assert torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(eval_linear, "train", real_train)
    capsys.readouterr()
    eval_linear.main(base_args(root, "--output_dir", tmp_path))
    out = capsys.readouterr().out
    assert "Found checkpoint" in out and "Epoch: [1/" not in out and "Epoch: [2/" in out
    resumed = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    uninterrupted = torch.load(root / "run" / "checkpoint.pth.tar", weights_only=True)
    for k, v in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], v), k
    strip = [{k: v for k, v in e.items() if k != "time"} for e in read_log(tmp_path)]
    assert strip == [{k: v for k, v in e.items() if k != "time"} for e in read_log(root / "run")]


@pytest.mark.slow
def test_evaluate_local_linear_weights_with_val_only(trained, tmp_path, capsys):
    root, _ = trained
    shutil.copytree(root / "data" / "val", tmp_path / "data" / "val")  # --evaluate needs no train/
    (tmp_path / "data" / "val" / "class3" / "broken.png").write_bytes(b"not a png")
    capsys.readouterr()
    eval_linear.main(base_args(root, "--evaluate", "--linear_weights", root / "run" / "checkpoint.pth.tar",
                               "--data_path", tmp_path / "data", "--output_dir", tmp_path))
    out = capsys.readouterr()
    acc = read_log(root / "run")[-1]["test_acc1"]
    assert f"Accuracy of the network on the {N_CLASSES * VAL_PER_CLASS} test images: {acc:.1f}%" in out.out
    assert "broken.png" in out.err  # warned, skipped and not counted
    assert not os.path.exists(tmp_path / "checkpoint.pth.tar")  # nothing trained, nothing written


@pytest.mark.slow
def test_published_linear_weights_by_default_offline_error(trained, tmp_path, monkeypatch, capsys):
    root, _ = trained
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.save(build_model("vit_small", patch_size=16).state_dict(), tmp_path / "vits16.pth")
    url = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_linearweights.pth"
    with pytest.raises(utils.InputError, match=f"could not download {re.escape(url)} .*with --linear_weights$"):
        eval_linear.main(linear_args("--arch", "vit_small", "--evaluate", "--data_path", root / "data",
                                     "--pretrained_weights", tmp_path / "vits16.pth"))
    assert f"No --linear_weights given: using the published linear weights {url}" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_train_then_one_process_evaluates_the_same(trained, tmp_path):
    root, _ = trained
    common = ["--arch", "vit_tiny", "--pretrained_weights", root / "backbone.pth", "--data_path", root / "data",
              "--num_workers", 0, "--resize_size", RESIZE, "--crop_size", CROP, "--batch_size_per_gpu", 5]
    two = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                      "eval_linear.py", *common, "--epochs", 2, "--lr", LR, "--output_dir", tmp_path])
    assert "world size 2" in two.stdout
    log = read_log(tmp_path)
    assert [e["epoch"] for e in log] == [0, 1]
    assert log[0]["train_lr"] == pytest.approx(LR * 5 * 2 / 256)  # lr scaled by the total batch of 2 x 5
    one = run_script(["eval_linear.py", *common, "--evaluate", "--linear_weights", tmp_path / "checkpoint.pth.tar"])
    assert f"test images: {log[-1]['test_acc1']:.1f}%" in one.stdout
    assert f"* Acc@1 {log[-1]['test_acc1']:.3f} Acc@5 {log[-1]['test_acc5']:.3f}" in one.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case,match", [
    ("no_train", r"no train/ folder"),
    ("num_labels", r"--num_labels 7: .* has 6 classes"),
    ("blocks", r"--n_last_blocks 13: vit_tiny has 12 blocks"),
    ("resume", r"checkpoint.pth.tar does not fit this model: shapes differ: module.linear.weight \[6, 768\] in "
               r"file vs \[6, 192\] in model; it was written by a run with other flags"),
    ("linear_shape", r"shapes differ: module.linear.weight \[6, 768\] in file vs \[6, 384\] in model"),
    ("linear_missing", r"--linear_weights .*nope.pth.tar: no such file"),
    ("linear_key", r"no 'state_dict' and not a state dict; it has: teacher"),
    ("crop_scale", r"--train_crop_scale 0.5 0.2: expected two numbers 0 < min <= max <= 1"),
])
def test_bad_input(trained, tmp_path, case, match):
    root, model = trained
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    extra = ["--output_dir", tmp_path / "out"]
    if case == "no_train":
        shutil.rmtree(data / "train")
    elif case == "num_labels":
        extra += ["--num_labels", 7]
    elif case == "blocks":
        extra += ["--n_last_blocks", 13]
    elif case == "resume":  # a run of 4 blocks continued with 1 block in the same folder
        shutil.copytree(root / "run", tmp_path / "out")
        extra += ["--n_last_blocks", 1]
    elif case == "linear_shape":
        extra += ["--evaluate", "--linear_weights", root / "run" / "checkpoint.pth.tar", "--n_last_blocks", 2]
    elif case == "linear_missing":
        extra += ["--evaluate", "--linear_weights", tmp_path / "nope.pth.tar"]
    elif case == "crop_scale":
        extra += ["--train_crop_scale", 0.5, 0.2]
    elif case == "linear_key":
        torch.save({"teacher": {"x": {}}}, tmp_path / "ckp.pth")
        extra += ["--evaluate", "--linear_weights", tmp_path / "ckp.pth"]
    with pytest.raises(utils.InputError, match=match):
        eval_linear.main(base_args(root, "--data_path", data, *extra))
    if case == "resume":  # the earlier run's checkpoint is left as it was
        assert torch.load(tmp_path / "out" / "checkpoint.pth.tar", weights_only=True)["epoch"] == EPOCHS


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root / "data" / "train", tmp_path / "data" / "train")
    proc = run_script(["eval_linear.py", "--arch", "vit_tiny", "--pretrained_weights", root / "backbone.pth",
                       "--data_path", tmp_path / "data", "--output_dir", tmp_path / "out"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --data_path {tmp_path / 'data'}: no val/ folder (it must hold train/ and val/ ImageFolders, "
        f"one subfolder per class, or train.tar and val.tar)"]
