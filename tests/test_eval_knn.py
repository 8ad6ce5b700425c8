"""eval_knn.py: the k-NN vote against a slow reference, the whole script on generated images against features and
accuracies computed here, checkpoint layouts, dump/load, one process vs two under torchrun, and bad input."""
import argparse
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import eval_knn
import utils
from conftest import free_port, run_script
from vision_transformer import build_model

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
N_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 5, 6, 3  # 5 classes (not 1000), 15 test images (fewer than 100)
IMAGE, RESIZE, CROP = 40, 36, 32


@pytest.fixture(scope="module")
def setup(eval_data):
    """train/ and val/ of a 5-class dataset and the weights of a random vit_tiny/16."""
    return eval_data(N_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, IMAGE)


def knn_args(root, *extra):
    parser = argparse.ArgumentParser(parents=[eval_knn.get_args_parser()])
    return parser.parse_args(["--arch", "vit_tiny", "--data_path", str(root / "data"), "--num_workers", "0",
                              "--resize_size", str(RESIZE), "--crop_size", str(CROP), "--batch_size_per_gpu", "4",
                              "--nb_knn", "1", "3", "10", *map(str, extra)])


def parse_results(text):
    """{k: (top1, top5)} from the script's result lines."""
    return {int(k): (float(a), float(b)) for k, a, b in
            re.findall(r"(\d+)-NN classifier result: Top1: ([\d.]+), Top5: ([\d.]+)", text)}


def slow_knn(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """The weighted vote written out, one query at a time, in float64."""
    train_f, test_f = np.asarray(train_features, np.float64), np.asarray(test_features, np.float64)
    top1 = top5 = 0
    for q, target in zip(test_f, np.asarray(test_labels)):
        sims = sorted(((float(q @ t), j) for j, t in enumerate(train_f)), reverse=True)[:k]
        votes = [0.0] * num_classes
        for s, j in sims:
            votes[int(train_labels[j])] += math.exp(s / T)
        ranking = sorted(range(num_classes), key=lambda c: -votes[c])  # stable: ties go to the lower class
        top1 += ranking[0] == target
        top5 += target in ranking[:min(5, k, num_classes)]
    n = len(test_f)
    return 100.0 * top1 / n, 100.0 * top5 / n


def reference_features(model, split_root):
    """[CLS] features of every image, in ImageFolder order, with PIL + numpy instead of torchvision transforms."""
    images, labels = [], []
    for c, cls in enumerate(sorted(os.listdir(split_root))):
        for name in sorted(os.listdir(os.path.join(split_root, cls))):
            img = Image.open(os.path.join(split_root, cls, name)).convert("RGB").resize((RESIZE, RESIZE),
                                                                                        Image.BICUBIC)
            off = (RESIZE - CROP) // 2
            x = (np.asarray(img, np.float64)[off:off + CROP, off:off + CROP] / 255.0 - MEAN) / STD
            images.append(torch.tensor(x, dtype=torch.float32).permute(2, 0, 1))
            labels.append(c)
    with torch.no_grad():
        feats = model(torch.stack(images))
    return feats / feats.norm(dim=1, keepdim=True), torch.tensor(labels)


@pytest.mark.parametrize("num_classes,n_test,chunks", [(7, 23, (4, 16)), (3, 5, (0, 2**17)), (12, 1, (1, 7))])
def test_knn_classifier_matches_slow_reference(num_classes, n_test, chunks):
    g = torch.Generator().manual_seed(num_classes)
    train = torch.nn.functional.normalize(torch.randn(60, 16, generator=g), dim=1)
    test = torch.nn.functional.normalize(torch.randn(n_test, 16, generator=g), dim=1)
    train_labels = torch.randint(0, num_classes, (60,), generator=g)
    test_labels = torch.randint(0, num_classes, (n_test,), generator=g)
    nb_knn = [1, 3, 10, 20, 60]
    got = utils.knn_classifier(train, train_labels, test, test_labels, nb_knn, 0.07, num_classes,
                                  test_chunk=chunks[0], train_chunk=chunks[1])
    for k in nb_knn:
        want = slow_knn(train, train_labels, test, test_labels, k, 0.07, num_classes)
        assert got[k] == pytest.approx(want, abs=1e-9), k


def test_knn_classifier_skips_k_larger_than_bank(capsys):
    feats = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    got = utils.knn_classifier(feats, torch.tensor([0, 1, 0, 1]), feats, torch.tensor([0, 1, 0, 1]), [1, 5], 0.07, 2)
    assert list(got) == [1] and got[1] == (100.0, 100.0)  # each query finds itself
    assert "skipping k = 5: only 4 training images" in capsys.readouterr().out
    with pytest.raises(utils.InputError, match="every k is more than the 4 training images"):
        utils.knn_classifier(feats, torch.zeros(4, dtype=torch.long), feats, torch.zeros(4, dtype=torch.long),
                                [10], 0.07, 2)


def test_script_accuracy_and_dump_load_round_trip(setup, tmp_path, capsys):
    root, model = setup
    eval_knn.main(knn_args(root, "--pretrained_weights", root / "backbone.pth", "--dump_features", tmp_path / "f"))
    out = capsys.readouterr().out
    train_f, train_l = reference_features(model, root / "data" / "train")
    test_f, test_l = reference_features(model, root / "data" / "val")
    assert torch.allclose(torch.load(tmp_path / "f" / "trainfeat.pth"), train_f, atol=1e-5)
    assert torch.allclose(torch.load(tmp_path / "f" / "testfeat.pth"), test_f, atol=1e-5)
    assert torch.equal(torch.load(tmp_path / "f" / "trainlabels.pth"), train_l)
    assert torch.equal(torch.load(tmp_path / "f" / "testlabels.pth"), test_l)
    results = parse_results(out)
    assert list(results) == [1, 3, 10]
    for k, got in results.items():
        assert got == pytest.approx(slow_knn(train_f, train_l, test_f, test_l, k, 0.07, N_CLASSES), abs=1e-9)
    assert results[1][0] > 60  # separable colours: far above the 20% of chance even with a random backbone

    # the dumped features give the same numbers without a backbone, and any other k
    eval_knn.main(knn_args(root, "--load_features", tmp_path / "f", "--nb_knn", "1", "3", "10", "20"))
    again = parse_results(capsys.readouterr().out)
    assert {k: again[k] for k in results} == results
    assert again[20] == pytest.approx(slow_knn(train_f, train_l, test_f, test_l, 20, 0.07, N_CLASSES), abs=1e-9)


def test_checkpoint_layouts_and_keys(setup, tmp_path, capsys):
    """Our checkpoint.pth (teacher and student), the original's full checkpoint (args as a Namespace)."""
    root, teacher = setup
    torch.manual_seed(1)
    student = build_model("vit_tiny", patch_size=16).eval()
    head = {"head.mlp.0.weight": torch.zeros(2, 192), "head.last_layer.weight_g": torch.ones(3, 1)}
    ours = {"teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
            "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                        **{f"module.{k}": v for k, v in head.items()}},
            "epoch": 3, "args": {"arch": "vit_tiny"}, "optimizer": {}}
    torch.save(ours, tmp_path / "checkpoint.pth")
    torch.save({**ours, "args": argparse.Namespace(arch="vit_tiny")}, tmp_path / "full_checkpoint.pth")
    val = root / "data" / "val"
    for path, key, model in ((tmp_path / "checkpoint.pth", "teacher", teacher),
                             (tmp_path / "checkpoint.pth", "student", student),
                             (tmp_path / "full_checkpoint.pth", "teacher", teacher)):
        eval_knn.main(knn_args(root, "--pretrained_weights", path, "--checkpoint_key", key,
                               "--dump_features", tmp_path / key))
        assert torch.allclose(torch.load(tmp_path / key / "testfeat.pth"), reference_features(model, val)[0],
                              atol=1e-5), (path, key)
    capsys.readouterr()


@pytest.mark.slow
def test_two_processes_equal_one(setup, tmp_path):
    """torchrun with 2 processes (uneven batch counts, one unreadable image) gives the one-process features."""
    root, _ = setup
    shutil.copytree(root / "data", tmp_path / "data")
    (tmp_path / "data" / "train" / "class2" / "broken.jpg").write_bytes(b"not a jpeg")
    common = ["--arch", "vit_tiny", "--pretrained_weights", root / "backbone.pth", "--data_path", tmp_path / "data",
              "--resize_size", RESIZE, "--crop_size", CROP, "--batch_size_per_gpu", 7, "--nb_knn", 1, 3, 10]
    one = run_script(["eval_knn.py", *common, "--num_workers", 0, "--dump_features", tmp_path / "one"])
    # a loader worker per process: the unreadable image is flagged in a worker and counted in the main process
    two = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                      "eval_knn.py", *common, "--num_workers", 1, "--dump_features", tmp_path / "two"])
    for name in eval_knn.FEATURE_FILES:
        a, b = torch.load(tmp_path / "one" / name), torch.load(tmp_path / "two" / name)
        assert torch.equal(a, b), name
    assert len(torch.load(tmp_path / "one" / "trainfeat.pth")) == N_CLASSES * TRAIN_PER_CLASS  # broken one left out
    assert parse_results(one.stdout) == parse_results(two.stdout) and len(parse_results(one.stdout)) == 3
    assert "1 unreadable images" in one.stdout and "broken.jpg" in one.stderr
    assert "1 unreadable images" in two.stdout and "broken.jpg" in two.stderr
    assert "world size 2" in two.stdout


def test_published_weights_by_default_offline_error(setup, tmp_path, monkeypatch, capsys):
    root, _ = setup
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    url = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    with pytest.raises(utils.InputError, match=f"could not download {re.escape(url)}"):
        eval_knn.main(knn_args(root, "--arch", "vit_small"))
    assert f"No --pretrained_weights given: using the published DINO weights {url}" in capsys.readouterr().out


@pytest.mark.parametrize("case,match", [
    ("no_val", r"no val/ folder"),
    ("no_train", r"no train/ folder"),
    ("classes", r"val/ has other classes than train/ \(train/ 6, val/ 5; only in train/: class5; only in val/: -\)"),
    ("missing_weights", r"--pretrained_weights .*nope.pth: no such file"),
    ("key", r"no key 'teacherr' in the checkpoint; it has: teacher, student, epoch"),
    ("arch", r"shapes differ: cls_token \[1, 1, 192\] in file vs \[1, 1, 384\] in model"),
    ("patch", r"shapes differ: pos_embed \[1, 197, 192\] in file vs \[1, 785, 192\] in model; "
              r"patch_embed.proj.weight \[192, 3, 16, 16\] in file vs \[192, 3, 8, 8\] in model"),
    ("load_features", r"--load_features .*: no testfeat.pth"),
    ("nb_knn", r"--nb_knn 10 0: each value must be >= 1"),
])
def test_bad_input(setup, tmp_path, case, match):
    root, model = setup
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    weights = root / "backbone.pth"
    extra = []
    if case == "no_val":
        shutil.rmtree(data / "val")
    elif case == "no_train":
        shutil.rmtree(data / "train")
    elif case == "classes":
        shutil.copytree(data / "train" / "class0", data / "train" / "class5")
    elif case == "missing_weights":
        weights = tmp_path / "nope.pth"
    elif case == "key":
        torch.save({"teacher": model.state_dict(), "student": model.state_dict(), "epoch": 1}, tmp_path / "c.pth")
        weights, extra = tmp_path / "c.pth", ["--checkpoint_key", "teacherr"]
    elif case == "arch":
        extra = ["--arch", "vit_small"]
    elif case == "patch":
        extra = ["--patch_size", "8", "--crop_size", "224"]
    elif case == "load_features":
        os.makedirs(tmp_path / "f")
        torch.save(torch.zeros(3, 4), tmp_path / "f" / "trainfeat.pth")
        extra = ["--load_features", tmp_path / "f"]
    elif case == "nb_knn":
        extra = ["--nb_knn", "10", "0"]
    args = knn_args(root, "--pretrained_weights", weights, *extra)
    args.data_path = str(data)
    with pytest.raises(utils.InputError, match=match):
        eval_knn.main(args)


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path):
    root, _ = setup
    proc = run_script(["eval_knn.py", "--arch", "vit_tiny", "--pretrained_weights", tmp_path / "typo.pth",
                       "--data_path", root / "data"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --pretrained_weights {tmp_path / 'typo.pth'}: no such file"
    assert "k-NN classifier result" not in proc.stdout  # never a silent fallback to the published weights
