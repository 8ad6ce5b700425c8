"""make demo's pieces (tools/demo.sh) end to end on a tiny Fashion-MNIST split: export, training with the k-NN
monitoring of teacher and student, the summary line, curves.png and the attention overview. No accuracy is asserted:
the demo's numbers are measured figures in the README."""
import json
import os
import subprocess

import pytest
from PIL import Image

from conftest import REPO

FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(FASHION_MNIST), reason="needs Debian's dataset-fashion-mnist package")
def test_demo_runs_end_to_end_on_a_tiny_split(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DATA_DIR": str(tmp_path / "data"), "DEMO_DIR": str(tmp_path / "demo"),
           "TRAIN_PER_CLASS": "4", "VAL_PER_CLASS": "2", "EPOCHS": "1", "BATCH": "8", "SEED": "1",
           "KNN_STUDENT": "true", "PRECISION": "fp32"}
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "demo.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "training " in out and "export " in out and "seed 1" in out and "PRECISION=fp32" in out
    assert "trained in fp32" in out
    summary = next(line for line in out.splitlines() if line.startswith("20-NN top-1 on"))
    assert "random weights" in summary and "after DINO" in summary and "the student" in summary
    assert "collapse" not in out  # a healthy run: no collapse warning

    lines = [json.loads(line) for line in open(tmp_path / "demo" / "log.txt")]
    assert [line["epoch"] for line in lines] == [0]
    assert "knn_top1_init" in lines[0] and lines[0]["precision"] == "fp32"
    for line in lines:
        for key in ("knn_top1", "knn_student_top1", "train_teacher_entropy", "train_teacher_batch_entropy",
                    "train_kl", "ln_out_dim"):
            assert key in line, key
    assert f"after DINO {lines[-1]['knn_top1']:.1f}%" in summary
    for picture in ("curves.png", os.path.join("attention", "overview.png")):
        path = tmp_path / "demo" / picture
        assert path.is_file() and picture in out.replace(str(tmp_path / "demo") + os.sep, "")
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 0


def test_demo_names_a_precision_it_does_not_know(tmp_path):
    env = {**os.environ, "PRECISION": "fp16", "DATA_DIR": str(tmp_path / "data"), "DEMO_DIR": str(tmp_path / "demo")}
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "demo.sh")], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2 and "PRECISION=fp16 is not one of auto, bf16, fp32" in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before anything is exported
