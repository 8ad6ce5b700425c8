"""Training from one tarball (utils' tar datasets, tools/infer_entries.py): entries against offsets tarfile computes,
the bytes of every range, ImageFolder's class indices, training and k-NN from tars and from the same folders, each
DataLoader worker opening the tar once, 2 processes reading disjoint shards, and every bad input in one line."""
import argparse
import gzip
import json
import os
import pickle
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import eval_knn
import utils
from conftest import REPO, free_port, make_image_folder, run_script, script_env, write_split
from test_main_dino import read_log, tiny_args

LONG_NAME = "long_" + "n" * 110 + ".png"  # a file name alone longer than a tar header's 100-byte name field


def build_tar(path, folder, arcname, fmt, empty_first_member=False):
    """folder archived by Python's tarfile (directories included) in the given format."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tar:
        if empty_first_member:
            tar.addfile(tarfile.TarInfo("empty_first_member"))
        tar.add(folder, arcname=arcname)
    return path


def index(tar_path):
    """tools/infer_entries.py run for real on tar_path, with its default output beside it; returns its stdout."""
    return run_script(["tools/infer_entries.py", "--tarball_path", tar_path]).stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An ImageFolder of 3 classes (a nested folder, a long name, a non-image file) and two tars of it: GNU format
    with ./ names and a '.' directory first, pax format under images/ after an empty first member; both indexed."""
    root = tmp_path_factory.mktemp("tar")
    folder = make_image_folder(str(root / "images"), per_class=6)
    os.makedirs(os.path.join(folder, "class1", "sub"))
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(os.path.join(folder, "class1", "sub", LONG_NAME))
    with open(os.path.join(folder, "class0", "notes.txt"), "w") as f:
        f.write("not an image\n")
    tars = {"gnu": build_tar(str(root / "gnu" / "pretrain_dataset.tar"), folder, ".", tarfile.GNU_FORMAT),
            "pax": build_tar(str(root / "pax" / "pretrain_dataset.tar"), folder, "images", tarfile.PAX_FORMAT,
                             empty_first_member=True)}
    outputs = {name: index(path) for name, path in tars.items()}
    return {"root": root, "folder": folder, "tars": tars, "outputs": outputs}


def entries_beside(tar_path):
    folder = os.path.dirname(tar_path)
    return (np.load(os.path.join(folder, "pretrain_entries.npy")),
            np.load(os.path.join(folder, "pretrain_file_indices.npy")))  # allow_pickle is False: no pickle


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_entries_are_the_offsets_tarfile_finds_and_the_bytes_are_the_members(data, fmt):
    tar_path = data["tars"][fmt]
    entries, file_indices = entries_beside(tar_path)
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        expected = [(i, m.offset_data, m.offset_data + m.size) for i, m in enumerate(members)
                    if m.isreg() and not (i == 0 and m.size == 0)]
        assert any(m.isdir() for m in members) and members[0].name in (".", "empty_first_member")
        assert any(len(m.name) > 100 for m in members if m.isreg())
        assert entries.dtype == np.uint64 and entries.shape == (20, 4)  # 18 images, the long name, notes.txt
        assert [tuple(map(int, row[1:])) for row in entries] == expected
        assert f"{len(expected)} files indexed (3 class folders)" in data["outputs"][fmt]
        assert file_indices.dtype.names == ("index", "name") and not file_indices.dtype.hasobject
        assert list(file_indices["index"]) == list(entries[:, 1])
        with open(tar_path, "rb") as f:
            raw = f.read()
        for row, name in zip(entries, file_indices["name"]):
            member = members[int(row[1])]
            assert name.decode() == member.name
            assert raw[int(row[2]):int(row[3])] == tar.extractfile(member).read()
    marker = b"././@LongLink" if fmt == "gnu" else b"PaxHeader"  # the long name really took the format's way
    assert marker in raw


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_class_indices_are_imagefolders(data, fmt):
    from torchvision.datasets import ImageFolder
    folder = ImageFolder(data["folder"], is_valid_file=utils._has_image_extension)
    expected = {os.path.relpath(path, data["folder"]): target for path, target in folder.samples}
    entries, file_indices = entries_beside(data["tars"][fmt])
    found = {re.sub(r"^(\./|images/)", "", name.decode()): int(row[0])
             for row, name in zip(entries, file_indices["name"])}
    assert {path: found[path] for path in expected} == expected
    assert len(set(expected.values())) == 3 and found[os.path.join("class1", "sub", LONG_NAME)] == 1
    assert utils.TarImageDataset(data["tars"][fmt]).classes == folder.classes


def test_tar_without_class_folders_has_class_zero():
    assert utils.tar_class_indices(["a.jpg", "./b.jpg"]) == ([], [0, 0])
    assert utils.tar_class_indices(["data/train/x/1.jpg", "data/train/y/2.jpg", "data/train/x/3.jpg"]) == (
        ["x", "y"], [0, 1, 0])


def test_images_read_by_offset_and_a_non_image_member_skipped_once(data, capfd):
    dataset = utils.TarImageDataset(data["tars"]["gnu"])
    capfd.readouterr()
    for _ in range(2):
        for i in range(len(dataset)):
            image, target = dataset[i]
            name = dataset.names[i].decode()
            if not name.endswith("notes.txt"):
                on_disk = Image.open(os.path.join(data["folder"], name)).convert("RGB")
                assert np.array_equal(np.asarray(image), np.asarray(on_disk)) and target == dataset.targets[i]
    warnings = [line for line in capfd.readouterr().err.splitlines() if "skipping unreadable image" in line]
    assert len(warnings) == 1 and "pretrain_dataset.tar:./class0/notes.txt: not an image" in warnings[0]
    assert dataset.num_skipped() == 1


def test_each_process_opens_the_tar_once(data, monkeypatch):
    tar_path = data["tars"]["gnu"]
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **kw: (opened.append(path), real_open(path, *a, **kw))[1])
    dataset = utils.TarImageDataset(tar_path)
    assert opened == []
    dataset.read_image(0)
    copy = pickle.loads(pickle.dumps(dataset))  # what a forkserver or spawn worker receives: no descriptor
    assert copy._fd is None
    assert np.array_equal(np.asarray(copy.read_image(1)), np.asarray(dataset.read_image(1)))
    assert opened == [tar_path] * 2  # each copy opened it at its first read, once
    opened.clear()
    # each sample says which process read it, which process opened the descriptor it was read with, and how
    # many times the tar has been opened in that process (the list is copied into a forked worker)
    dataset = utils.TarImageDataset(tar_path, transform=lambda image: (os.getpid(), dataset._fd_pid,
                                                                       opened.count(tar_path)))
    for i in range(5):
        dataset[i]
    assert opened == [tar_path]
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
    seen = [tuple(sample) for sample, _ in loader]
    assert len(seen) == len(dataset)
    worker_pids = {pid for pid, _, _ in seen}
    assert os.getpid() not in worker_pids and len(worker_pids) == 2
    # every worker reads through a descriptor it opened itself, opened once: one more than at the fork
    assert all(fd_pid == pid and times_opened == 2 for pid, fd_pid, times_opened in seen)


@pytest.mark.slow
def test_training_one_epoch_from_the_tar_and_from_the_folder(data, tmp_path):
    runs = {}
    for source, path in (("tar", data["tars"]["gnu"]), ("folder", data["folder"])):
        out = str(tmp_path / source)
        proc = run_script(tiny_args(path, out, epochs=1, batch_size_per_gpu=5))  # every image in a batch
        runs[source] = (proc, read_log(out))
    for proc, log in runs.values():
        assert len(log) == 1 and np.isfinite(log[0]["train_loss"]) and log[0]["images_per_s"] > 0
    tar_proc, tar_log = runs["tar"]
    assert "there are 20 images" in tar_proc.stdout and "there are 19 images" in runs["folder"][0].stdout
    assert tar_proc.stderr.count("skipping unreadable image") == 1 and "notes.txt" in tar_proc.stderr
    assert tar_log[0]["skipped_images"] == 1 and runs["folder"][1][0]["skipped_images"] == 0


def test_original_pickled_file_indices_are_read_without_running_code(data, tmp_path):
    folder = tmp_path / "original"
    folder.mkdir()
    tar_path = str(folder / "pretrain_dataset.tar")
    shutil.copy(data["tars"]["gnu"], tar_path)
    entries, file_indices = entries_beside(data["tars"]["gnu"])
    np.save(folder / "pretrain_entries.npy", entries)
    # the original's file_indices.npy: np.save of a dict of file index to file name, a pickle
    np.save(folder / "file_indices.npy", {int(i): os.path.basename(n.decode()) for i, n in file_indices})
    dataset = utils.TarImageDataset(tar_path)
    assert dataset.names[0].decode() == "img0.png" and dataset.classes == ["0", "1", "2"]
    assert list(dataset.targets) == list(entries[:, 0])
    assert np.array_equal(np.asarray(dataset[0][0]), np.asarray(Image.open(
        os.path.join(data["folder"], "class0", "img0.png")).convert("RGB")))


class Exploit:
    """Pickles as a call that creates a file: what a malicious file_indices.npy would run when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (shutil.copy, (__file__, self.path))


def bad_tar(case, data, tmp_path):
    """The --data_path of one bad-input case, made from the GNU tar and its entries."""
    gnu = data["tars"]["gnu"]
    folder = tmp_path / case
    folder.mkdir()
    tar_path = str(folder / "pretrain_dataset.tar")
    copy_entries = case not in ("missing", "compressed")
    if case == "truncated":
        with open(gnu, "rb") as f:
            raw = f.read()
        with open(tar_path, "wb") as f:
            f.write(raw[:len(raw) // 2])
    elif case == "compressed":
        with open(gnu, "rb") as f, gzip.open(tar_path + ".gz", "wb") as g:
            g.write(f.read())
        tar_path += ".gz"
    elif case == "other_tar":
        shutil.copy(data["tars"]["pax"], tar_path)
    elif case == "other_sizes":  # the same names, the first image bigger
        images = shutil.copytree(data["folder"], str(tmp_path / "bigger"))
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            os.path.join(images, "class0", "img0.png"))
        build_tar(tar_path, images, ".", tarfile.GNU_FORMAT)
    else:
        shutil.copy(gnu, tar_path)
    if copy_entries:
        for name in ("pretrain_entries.npy", "pretrain_file_indices.npy"):
            shutil.copy(os.path.join(os.path.dirname(gnu), name), folder / name)
    if case == "malicious":
        os.remove(folder / "pretrain_file_indices.npy")
        np.save(folder / "file_indices.npy", np.array([Exploit(str(tmp_path / "exploited"))], dtype=object),
                allow_pickle=True)
    return tar_path


@pytest.mark.slow
@pytest.mark.parametrize("case,expected", [
    ("truncated", r"entries .*pretrain_entries.npy: offsets run to byte \d+, past the end of .*pretrain_dataset.tar "
                  r"\(\d+ bytes\): a truncated copy"),
    ("compressed", r"tar .*pretrain_dataset.tar.gz: gzip-compressed, .*decompress it \(gzip -dc .*tar.gz > "
                   r".*pretrain_dataset.tar\)"),
    ("missing", r"tar .*pretrain_dataset.tar: no .*pretrain_entries.npy beside it; make them with: python "
                r"tools/infer_entries.py --tarball_path .*pretrain_dataset.tar --output_root .* --prefix pretrain"),
    ("other_tar", r"entries .* are not those of .*pretrain_dataset.tar: they expect './class0/img0.png' of \d+ "
                  r"bytes at byte \d+, the tar has"),
    ("other_sizes", r"are not those of .*: they expect './class0/img0.png' of (\d+) bytes .* the tar has "
                    r"'./class0/img0.png' of (?!\1)\d+ bytes"),
    ("malicious", r"file indices .*file_indices.npy: refusing to unpickle it \(shutil.copy is not allowed"),
])
def test_bad_input_is_one_clear_line(data, tmp_path, case, expected):
    tar_path = bad_tar(case, data, tmp_path)
    proc = run_script(tiny_args(tar_path, str(tmp_path / "out"), epochs=1), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(expected, lines[0]), proc.stderr
    assert not os.path.exists(tmp_path / "exploited")  # the malicious pickle did not run
    if case == "compressed":  # the tool says the same
        proc = run_script(["tools/infer_entries.py", "--tarball_path", tar_path], check=False)
        assert proc.returncode == 2 and "gzip-compressed" in proc.stderr


def test_the_data_path_check_takes_a_tar(data, tmp_path):
    """check_image_folder (what run_with_submitit checks before queuing) checks a tar with its entries."""
    utils.check_image_folder(data["tars"]["gnu"])
    shutil.copy(data["tars"]["gnu"], tmp_path / "pretrain_dataset.tar")
    with pytest.raises(utils.InputError, match=r"no .*pretrain_entries.npy beside it; make them with: python tools"):
        utils.check_image_folder(str(tmp_path / "pretrain_dataset.tar"))
    with pytest.raises(utils.InputError, match=r"no class subfolders \(it holds pretrain_dataset.tar: give the tar's"):
        utils.image_dataset(os.path.dirname(data["tars"]["gnu"]))


@pytest.mark.slow
def test_knn_evaluation_from_train_and_val_tars_equals_the_folders(tmp_path, capsys):
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 226, size=(3, 3))
    write_split(str(tmp_path / "folders" / "train"), colours, 5, rng, 32)
    write_split(str(tmp_path / "folders" / "val"), colours, 3, rng, 32)
    (tmp_path / "tars").mkdir()
    for split in ("train", "val"):
        tar_path = build_tar(str(tmp_path / "tars" / f"{split}.tar"), str(tmp_path / "folders" / split),
                             split, tarfile.GNU_FORMAT)
        assert "3 class folders" in index(tar_path)
    from vision_transformer import build_model
    torch.manual_seed(0)
    torch.save(build_model("vit_tiny", patch_size=16).state_dict(), tmp_path / "backbone.pth")
    results = {}
    for source in ("folders", "tars"):
        parser = argparse.ArgumentParser(parents=[eval_knn.get_args_parser()])
        eval_knn.main(parser.parse_args([
            "--arch", "vit_tiny", "--data_path", str(tmp_path / source), "--num_workers", "0", "--resize_size",
            "32", "--crop_size", "32", "--batch_size_per_gpu", "4", "--nb_knn", "1", "5",
            "--pretrained_weights", str(tmp_path / "backbone.pth")]))
        out = capsys.readouterr().out
        assert "15 train and 9 val imgs in 3 classes" in out
        results[source] = re.findall(r"\d+-NN classifier result: .*", out)
    assert len(results["tars"]) == 2 and results["tars"] == results["folders"]


def test_benchmark_stage_measures_the_loader_from_files_and_from_the_tar(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import bench_train
    monkeypatch.setattr(bench_train, "drop_page_cache", lambda: False)  # a test leaves the machine's cache alone
    parser = argparse.ArgumentParser(parents=[bench_train.get_args_parser()])
    bench_train.main(parser.parse_args([
        "--stages", "tar", "--batch_size_per_gpu", "4", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--iters", "2", "--warmup", "1", "--num_images", "16", "--image_size", "48",
        "40", "--num_workers", "1", "--augmentation", "gpu", "--work_dir", str(tmp_path)]))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["stage"], r["source"]) for r in records] == [("tar", "files"), ("tar", "tar")]
    assert all(r["images_per_s"] > 0 and r["images"] == 16 and r["num_workers"] == 1 for r in records)
    assert len(utils.TarImageDataset(str(tmp_path / "tar" / "pretrain_dataset.tar"))) == 16


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_of_the_tar(tmp_path):
    folder = make_image_folder(str(tmp_path / "images"))  # 24 images: 12 per process, 3 batches of 4
    tar_path = build_tar(str(tmp_path / "pretrain_dataset.tar"), folder, ".", tarfile.GNU_FORMAT)
    index(tar_path)
    script = tmp_path / "recording_main_dino.py"  # main_dino.main, recording which tar entries each rank reads
    script.write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import main_dino, utils\n"
        "reads, read_image = [], utils.TarImageDataset.read_image\n"
        "utils.TarImageDataset.read_image = lambda self, i: (reads.append(int(i)), read_image(self, i))[1]\n"
        "args = main_dino.get_args_parser().parse_args(sys.argv[1:])\n"
        "main_dino.main(args)\n"
        "with open(os.path.join(args.output_dir, f\"reads{os.environ['RANK']}.json\"), 'w') as f:\n"
        "    json.dump(reads, f)\n")
    out = tmp_path / "out"
    args = tiny_args(tar_path, out, epochs=1, batch_size_per_gpu=4)[1:]
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                       str(script), *args], env=script_env())
    assert "world size 2" in proc.stdout and len(read_log(str(out))) == 1
    reads = [json.load(open(out / f"reads{rank}.json")) for rank in (0, 1)]
    assert [len(r) for r in reads] == [12, 12]
    assert not set(reads[0]) & set(reads[1]) and sorted(reads[0] + reads[1]) == list(range(24))
