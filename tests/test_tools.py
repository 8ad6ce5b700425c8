"""tools/: Fashion-MNIST export (on idx files written here, and on the real package when installed) and plotting."""
import gzip
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_script

REAL_SOURCE = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_source(root, n_train=30, n_val=20):
    rng = np.random.default_rng(0)
    os.makedirs(root)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28)))
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), np.arange(n) % 10)
    return root


@pytest.mark.slow
def test_export_reads_idx_and_writes_image_folders(tmp_path):
    source = fake_source(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    run_script(["tools/prepare_fashion_mnist.py", "--source", source, "--output_dir", out, "--size", "32",
                "--train_per_class", "2"])
    train = sorted(os.listdir(os.path.join(out, "train")))
    assert len(train) == 10 and train[0] == "0_tshirt_top"
    assert sum(len(os.listdir(os.path.join(out, "train", c))) for c in train) == 20  # 2 per class
    assert sum(len(files) for _, _, files in os.walk(os.path.join(out, "val"))) == 20  # all
    # pixel values survive the export: image 0 of train is class 0, file 00000.png
    with gzip.open(os.path.join(source, "train-images-idx3-ubyte.gz")) as f:
        first = np.frombuffer(f.read(), dtype=np.uint8, offset=16)[:784].reshape(28, 28)
    run_script(["tools/prepare_fashion_mnist.py", "--source", source, "--output_dir", str(tmp_path / "o28")])
    img = np.asarray(Image.open(tmp_path / "o28" / "train" / "0_tshirt_top" / "00000.png"))
    assert img.shape == (28, 28, 3) and (img[..., 0] == first).all() and (img[..., 1] == first).all()
    assert Image.open(os.path.join(out, "train", "0_tshirt_top", "00000.png")).size == (32, 32)


@pytest.mark.slow
def test_export_without_the_package_says_how_to_install(tmp_path):
    proc = run_script(["tools/prepare_fashion_mnist.py", "--source", str(tmp_path / "none"),
                       "--output_dir", str(tmp_path / "out")], check=False)
    assert proc.returncode != 0 and "apt-get install dataset-fashion-mnist" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(REAL_SOURCE), reason="dataset-fashion-mnist is not installed")
def test_export_of_the_real_dataset(tmp_path):
    out = str(tmp_path / "fm")
    run_script(["tools/prepare_fashion_mnist.py", "--output_dir", out, "--train_per_class", "3",
                "--val_per_class", "1"])
    assert sum(len(files) for _, _, files in os.walk(os.path.join(out, "train"))) == 30
    assert sum(len(files) for _, _, files in os.walk(os.path.join(out, "val"))) == 10


@pytest.mark.slow
def test_plot_logs_writes_one_panel_per_key(tmp_path):
    paths = []
    for run, offset in (("a", 0.0), ("b", 1.0)):
        os.makedirs(tmp_path / run)
        path = tmp_path / run / "log.txt"
        path.write_text("".join(json.dumps({"epoch": e, "train_loss": 5 - e + offset, "train_lr": 1e-3 * (e + 1),
                                            "knn_top1": 50 + e}) + "\n" for e in range(4)))
        paths.append(str(path))
    out = str(tmp_path / "curves.png")
    proc = run_script(["tools/plot_logs.py", *paths, "--output", out])
    assert "3 panels, 2 runs" in proc.stdout
    width, height = Image.open(out).size
    assert width == 3 * 450 and height == 320
    bad = tmp_path / "bad.txt"
    bad.write_text("not json\n")
    proc = run_script(["tools/plot_logs.py", str(bad)], check=False)
    assert proc.returncode != 0 and "line 1: not a JSON object" in proc.stderr
