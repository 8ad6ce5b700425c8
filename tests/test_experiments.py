"""experiments/fashion_mnist: the raw-pixel k-NN baseline and the random-weights backbone."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_script, write_split
from vision_transformer import build_model


def numpy_weighted_knn(train, train_labels, test, test_labels, k, T, n_classes):
    """Top-1 of the weighted k-NN written out: cosine similarity, k nearest, votes exp(sim / T) per class."""
    sims = test @ train.T
    top1 = 0
    for i in range(len(test)):
        nearest = np.argsort(-sims[i])[:k]
        votes = np.zeros(n_classes)
        np.add.at(votes, train_labels[nearest], np.exp(sims[i, nearest] / T))
        top1 += votes.argmax() == test_labels[i]
    return 100.0 * top1 / len(test)


def write_pattern_split(root, per_class, rng):
    """3 classes of 8x8 greyscale images: a bright band in rows 0-2, 3-5 or 5-7 under heavy noise, so the classes
    overlap a little (cosine similarity ignores overall brightness: a layout is what raw pixels can tell apart)."""
    for c, rows in enumerate((slice(0, 3), slice(3, 6), slice(5, 8))):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 220, size=(8, 8)).astype(np.float64)
            img[rows] += 45
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).convert("RGB").save(
                os.path.join(root, f"class{c}", f"img{i}.png"))


def read_split(root):
    rows, labels = [], []
    for label, cls in enumerate(sorted(os.listdir(root))):
        for name in sorted(os.listdir(os.path.join(root, cls))):
            with Image.open(os.path.join(root, cls, name)) as img:
                rows.append(np.asarray(img.convert("L"), dtype=np.float64).ravel())
            labels.append(label)
    x = np.stack(rows)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.array(labels)


@pytest.mark.slow
def test_raw_pixel_knn_matches_a_written_out_classifier(tmp_path):
    rng = np.random.default_rng(0)
    write_pattern_split(tmp_path / "data" / "train", 12, rng)
    write_pattern_split(tmp_path / "data" / "val", 10, rng)
    out = run_script(["experiments/fashion_mnist/knn_raw_pixels.py", "--data_path", tmp_path / "data",
                      "--nb_knn", "1", "5"]).stdout
    assert "36 train and 30 val images of 64 pixels" in out
    train, train_labels = read_split(tmp_path / "data" / "train")
    test, test_labels = read_split(tmp_path / "data" / "val")
    for k in (1, 5):
        top1 = float(re.search(rf"^{k}-NN classifier result on raw pixels: Top1: ([\d.]+)", out, re.M).group(1))
        expected = numpy_weighted_knn(train, train_labels, test, test_labels, k, 0.07, 3)
        assert abs(top1 - expected) < 1e-3, (k, top1, expected)
    assert 40 < top1 < 100  # informative but not perfect, so the comparison above is not trivial


@pytest.mark.slow
def test_raw_pixel_knn_needs_one_image_size(tmp_path):
    rng = np.random.default_rng(0)
    colours = [np.array([60, 60, 60]), np.array([200, 200, 200])]
    write_split(str(tmp_path / "data" / "train"), colours, 2, rng, size=8)
    write_split(str(tmp_path / "data" / "val"), colours, 2, rng, size=8)
    Image.new("RGB", (9, 9)).save(tmp_path / "data" / "train" / "class0" / "odd.png")
    proc = run_script(["experiments/fashion_mnist/knn_raw_pixels.py", "--data_path", tmp_path / "data"], check=False)
    assert proc.returncode == 2
    assert "images of different sizes" in proc.stderr and str(tmp_path / "data" / "train") in proc.stderr


@pytest.mark.slow
def test_random_init_is_the_seeded_initialisation(tmp_path):
    out = tmp_path / "random.pth"
    run_script(["experiments/fashion_mnist/random_init.py", "--arch", "vit_tiny", "--patch_size", "7",
                "--seed", "3", "--output", out])
    saved = torch.load(out, map_location="cpu", weights_only=True)
    torch.manual_seed(3)
    expected = build_model("vit_tiny", patch_size=7).state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    torch.manual_seed(4)
    other = build_model("vit_tiny", patch_size=7).state_dict()
    assert not torch.equal(saved["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])

    proc = run_script(["experiments/fashion_mnist/random_init.py", "--arch", "vit_tiny", "--output",
                       tmp_path / "missing" / "random.pth"], check=False)
    assert proc.returncode == 2 and "--output" in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.slow
def test_patch_knn_scores_the_cls_and_the_mean_patch_token(tmp_path):
    """patch_knn.py's two k-NNs against the written-out classifier on features computed here: the [CLS] and the mean
    of the last layer's patch tokens of a random vit_tiny/4 on 8x8 images (4 patches)."""
    import utils
    rng = np.random.default_rng(0)
    write_pattern_split(tmp_path / "data" / "train", 12, rng)
    write_pattern_split(tmp_path / "data" / "val", 10, rng)
    torch.manual_seed(0)
    model = build_model("vit_tiny", patch_size=4).eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    out = run_script(["experiments/fashion_mnist/patch_knn.py", "--arch", "vit_tiny", "--patch_size", "4",
                      "--pretrained_weights", tmp_path / "backbone.pth", "--data_path", tmp_path / "data",
                      "--resize_size", "8", "--crop_size", "8", "--nb_knn", "1", "5", "--num_workers", "0"]).stdout
    transform = utils.eval_transform(8, 8)

    def features(split):
        x, labels = [], []
        for label, cls in enumerate(sorted(os.listdir(split))):
            for name in sorted(os.listdir(os.path.join(split, cls))):
                with Image.open(os.path.join(split, cls, name)) as img:
                    x.append(transform(img.convert("RGB")))
                labels.append(label)
        with torch.no_grad():
            tokens = model.forward_features(torch.stack(x))
        cls, patch = tokens["x_norm_clstoken"].double().numpy(), tokens["x_norm_patchtokens"].mean(1).double().numpy()
        unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731
        return unit(cls), unit(patch), np.array(labels)

    train_cls, train_patch, train_labels = features(tmp_path / "data" / "train")
    val_cls, val_patch, val_labels = features(tmp_path / "data" / "val")
    for name, train, val in (("cls", train_cls, val_cls), ("patch_mean", train_patch, val_patch)):
        for k in (1, 5):
            top1 = float(re.search(rf"^{name} {k}-NN: top-1 ([\d.]+)", out, re.M).group(1))
            expected = numpy_weighted_knn(train, train_labels, val, val_labels, k, 0.07, 3)
            assert abs(top1 - expected) < 1e-2, (name, k, top1, expected)


@pytest.mark.slow
def test_pca_side_by_side_is_the_pixels_then_one_colour_per_patch(tmp_path):
    """dinov2_objectives_pca.sh on two random-weights teachers: the first panel is the 4x4 mosaic of the first two
    images of 8 classes, the others one RGB colour per 7x7 patch (the picture is drawn at twice the size), the three
    components' range spanning 0-255 in each channel."""
    rng = np.random.default_rng(0)
    for c in range(8):
        os.makedirs(tmp_path / "data" / "val" / f"class{c}")
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
                tmp_path / "data" / "val" / f"class{c}" / f"{i}.png")
    for seed, run in enumerate(("a", "b")):
        torch.manual_seed(seed)
        os.makedirs(tmp_path / "out" / run)
        torch.save({"teacher": build_model("vit_tiny", patch_size=7).state_dict()},
                   tmp_path / "out" / run / "checkpoint.pth")
    env = dict(os.environ, OUT=str(tmp_path / "out"), RUNS="a b", DATA_DIR=str(tmp_path / "data"),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "experiments/fashion_mnist/dinov2_objectives_pca.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(re.findall(r"first 3 components explain \d+\.\d% of the patch tokens' variance", proc.stdout)) == 2
    picture = np.asarray(Image.open(tmp_path / "out" / "pca_side_by_side.png").convert("RGB"))
    assert picture.shape == (224, 2 * (3 * 112 + 2 * 8), 3)
    pixels = picture[::2, ::2]  # back to one pixel per image pixel
    for i in range(16):  # image i of the mosaic: class i // 2, its (i % 2)-th file, at row i // 4, column i % 4
        with Image.open(tmp_path / "data" / "val" / f"class{i // 2}" / f"{i % 2}.png") as img:
            expected = np.asarray(img.convert("RGB"))
        r, c = 28 * (i // 4), 28 * (i % 4)
        assert np.array_equal(pixels[r:r + 28, c:c + 28], expected), i
    import utils
    to_input = utils.eval_transform(28, 28)
    images = []
    for i in range(16):
        with Image.open(tmp_path / "data" / "val" / f"class{i // 2}" / f"{i % 2}.png") as img:
            images.append(to_input(img.convert("RGB")))
    for panel, seed in ((1, 0), (2, 1)):
        grid = pixels[:, panel * 120:panel * 120 + 112]
        patches = grid.reshape(16, 7, 16, 7, 3)
        assert (patches == patches[:, :1, :, :1]).all()  # one colour per patch
        # the PCA written out: the teacher's normed patch tokens of the 16 images, centred, 3 right singular vectors
        torch.manual_seed(seed)
        model = build_model("vit_tiny", patch_size=7).eval()
        with torch.no_grad():
            tokens = model.forward_features(torch.stack(images))["x_norm_patchtokens"].reshape(256, -1).double()
        tokens = tokens - tokens.mean(0)
        scores = (tokens @ torch.linalg.svd(tokens, full_matrices=False)[2][:3].T).numpy()
        colours = patches[:, 0, :, 0].reshape(4, 4, 4, 4, 3).transpose(0, 2, 1, 3, 4).reshape(256, 3).astype(float)
        for k in range(3):  # each component up to its sign, min-max scaled to 0-255
            expected = 255 * (scores[:, k] - scores[:, k].min()) / np.ptp(scores[:, k])
            assert min(np.abs(colours[:, k] - expected).max(), np.abs(colours[:, k] - (255 - expected)).max()) <= 1
