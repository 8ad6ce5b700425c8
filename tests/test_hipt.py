"""HIPT's hierarchical pretraining: vit4k_xs (layout, forward, position embedding), region files and their dataset,
the region multi-crop, training, evaluation, extraction, the two-level attention and the hub entry points.

Reference values are computed here independently: vit4k_xs's forward written out in float64 from HIPT's definition,
HIPT's state-dict layout written out from REFERENCE.md, tile orders and crops by index arithmetic, k-NN votes as a
slow loop.
"""
import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import tarfile

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import eval_knn
import hubconf
import main_dino
import utils
import visualize_attention
from conftest import REPO, run_in_gloo_processes, run_script
from test_distributed_equivalence import assert_same_weights
from test_experiments import numpy_weighted_knn
from test_vision_transformer import bicubic_resize_reference
from vision_transformer import REGION_ARCHS, RegionVisionTransformer, build_model

GRID = 14  # HIPT's position-embedding grid
HEADS, DEPTH, D = 6, 6, 192  # vit4k_xs


def hipt_layout(in_dim: int = 384) -> dict:
    """HIPT's vit4k_xs state dict, keys and shapes, written out from REFERENCE.md (phi, [CLS], a 14 x 14 position
    embedding, 6 blocks with qkv bias and an MLP of ratio 4, the final norm)."""
    layout = {"cls_token": [1, 1, D], "pos_embed": [1, GRID * GRID + 1, D], "phi.0.weight": [D, in_dim],
              "phi.0.bias": [D], "norm.weight": [D], "norm.bias": [D]}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        layout.update({b + "norm1.weight": [D], b + "norm1.bias": [D], b + "attn.qkv.weight": [3 * D, D],
                       b + "attn.qkv.bias": [3 * D], b + "attn.proj.weight": [D, D], b + "attn.proj.bias": [D],
                       b + "norm2.weight": [D], b + "norm2.bias": [D], b + "mlp.fc1.weight": [4 * D, D],
                       b + "mlp.fc1.bias": [4 * D], b + "mlp.fc2.weight": [D, 4 * D], b + "mlp.fc2.bias": [D]})
    return layout


def hipt_state(in_dim: int = 384, seed: int = 0) -> dict:
    """Random weights in HIPT's layout, scaled so that every part matters: attention far from uniform, layer norms
    that are not the identity, a position embedding as large as the features."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in hipt_layout(in_dim).items():
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[k] = 1 + 0.3 * torch.randn(shape, generator=g)
        elif k.endswith("qkv.weight"):
            state[k] = torch.randn(shape, generator=g) / math.sqrt(D) * 2  # peaked attention
        elif k.endswith("weight"):
            state[k] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:
            state[k] = 0.5 * torch.randn(shape, generator=g)
    return state


# ============ vit4k_xs ============

def layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # the exact GELU of nn.GELU()


def reference_forward(state: dict, x: torch.Tensor) -> tuple:
    """HIPT's vit4k_xs in float64: (the normed [CLS] (B, D), the last block's attention (B, heads, T, T)).

    The cells are read row by row, phi embeds them, [CLS] goes first; the 14 x 14 position embedding is used as it
    is for a square grid of 196 cells, else resized bicubically with scale factors ((H + 0.1) / 14, (W + 0.1) / 14).
    """
    sd = {k: v.double() for k, v in state.items()}
    B, C, H, W = x.shape
    tokens = x.double().reshape(B, C, H * W).transpose(1, 2)  # cell (r, c) is token r * W + c
    tokens = gelu(tokens @ sd["phi.0.weight"].T + sd["phi.0.bias"])
    tokens = torch.cat((sd["cls_token"].expand(B, 1, D), tokens), dim=1)
    pos = sd["pos_embed"]
    if not (H * W == GRID * GRID and H == W):
        grid = pos[0, 1:].reshape(GRID, GRID, D).permute(2, 0, 1)
        resized = bicubic_resize_reference(grid, (H + 0.1) / GRID, (W + 0.1) / GRID)  # (D, H, W)
        pos = torch.cat((pos[:, :1], resized.permute(1, 2, 0).reshape(1, H * W, D)), dim=1)
    t = tokens + pos
    hd = D // HEADS
    for i in range(DEPTH):
        b = f"blocks.{i}."
        y = layer_norm(t, sd[b + "norm1.weight"], sd[b + "norm1.bias"])
        qkv = (y @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).reshape(B, -1, 3, HEADS, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # each (B, heads, T, hd)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, -1, D)
        t = t + y @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        y = layer_norm(t, sd[b + "norm2.weight"], sd[b + "norm2.bias"])
        y = gelu(y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        t = t + y @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    return layer_norm(t, sd["norm.weight"], sd["norm.bias"])[:, 0], attn


@pytest.mark.parametrize("in_dim", [384, 192, 768])
def test_vit4k_xs_has_hipts_layout(in_dim):
    model = build_model("vit4k_xs", region_in_dim=in_dim)
    assert isinstance(model, RegionVisionTransformer) and list(REGION_ARCHS) == ["vit4k_xs"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == hipt_layout(in_dim)
    assert model.embed_dim == D and model.blocks[0].attn.num_heads == HEADS
    assert model.norm.eps == 1e-6 and all(b.norm1.eps == b.norm2.eps == 1e-6 for b in model.blocks)
    assert [type(m).__name__ for m in model.phi] == ["Linear", "GELU", "Dropout"]


@pytest.mark.parametrize("h,w", [(14, 14), (16, 16), (8, 8), (6, 10), (7, 28), (1, 1)])
def test_forward_matches_a_float64_forward_written_out(h, w):
    """Shapes, the row-major reading of the grid and the position-embedding rule, against reference_forward."""
    model = build_model("vit4k_xs").eval()
    state = hipt_state()
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 384, h, w, generator=torch.Generator().manual_seed(1))
    cls, attn = reference_forward(state, x)
    with torch.no_grad():
        out = model(x)
        last_attn = model.get_last_selfattention(x)
        layers = model.get_intermediate_layers(x, n=2)
    assert out.shape == (2, D) and last_attn.shape == (2, HEADS, 1 + h * w, 1 + h * w)
    torch.testing.assert_close(out.double(), cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last_attn.double(), attn, rtol=1e-4, atol=1e-5)
    assert len(layers) == 2 and all(t.shape == (2, 1 + h * w, D) for t in layers)
    torch.testing.assert_close(layers[-1][:, 0], out)


def test_the_position_embedding_is_resized_only_off_the_14x14_grid():
    model = build_model("vit4k_xs")
    tokens = torch.zeros(1, 1 + 196, D)
    assert model.interpolate_pos_encoding(tokens, 14, 14) is model.pos_embed
    # 196 cells that are not a square grid: HIPT resizes (its rule asks for h == w too)
    pos = model.interpolate_pos_encoding(tokens, 7, 28)
    grid = model.pos_embed[0, 1:].detach().reshape(GRID, GRID, D).permute(2, 0, 1)
    expected = bicubic_resize_reference(grid, 7.1 / GRID, 28.1 / GRID).permute(1, 2, 0).reshape(-1, D)
    torch.testing.assert_close(pos[0, 1:].detach().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pos[0, 0], model.pos_embed[0, 0])


def test_a_grid_of_another_width_is_a_clear_error():
    with pytest.raises(ValueError, match=r"grid of 192 features per cell; this model takes 384 \(--region_in_dim\)"):
        build_model("vit4k_xs")(torch.randn(1, 192, 4, 4))


def test_every_parameter_gets_a_gradient():
    model = build_model("vit4k_xs", region_in_dim=32, drop_path_rate=0.1)
    out = model(torch.randn(3, 32, 6, 6))
    (out * torch.randn_like(out)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_hipt_checkpoint_loads_strictly(tmp_path):
    """A full DINO checkpoint as HIPT's vit4k_xs_dino.pth: weights under 'teacher' as backbone.* beside head.*,
    args pickled as a Namespace; the backbone loads strictly and exactly."""
    state = hipt_state(seed=3)
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher.update({"head.mlp.0.weight": torch.randn(2048, D), "head.last_layer.weight_g": torch.ones(8, 1)})
    path = tmp_path / "vit4k_xs_dino.pth"
    torch.save({"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}, "epoch": 100,
                "args": argparse.Namespace(arch="vit4k_xs")}, path)
    model = build_model("vit4k_xs")
    utils.load_pretrained_weights(model, str(path), "teacher", "vit4k_xs", None)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    state.pop("phi.0.bias")
    torch.save(state, path)
    with pytest.raises(utils.InputError, match=r"does not fit this model: 1 missing keys \(e.g. phi.0.bias\)"):
        utils.load_pretrained_weights(model, str(path), "teacher", "vit4k_xs", None)


def test_published_weights_of_a_region_arch_are_hipts():
    assert utils.published_weights_url("vit4k_xs", None) == \
        "https://github.com/mahmoodlab/HIPT/raw/master/HIPT_4K/Checkpoints/vit4k_xs_dino.pth"
    with pytest.raises(utils.InputError, match="HIPT published no linear classifier"):
        utils.published_linear_weights_url("vit4k_xs", None)


# ============ region files and their dataset ============

def save_region(path, features) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(features, path)
    return str(path)


def region(side: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(side * side, dim, generator=torch.Generator().manual_seed(seed))


def test_region_grid_reads_the_tiles_row_major():
    """HIPT's format: tile (r, c) of a rows x cols region is row r * cols + c of the file; the grid has it at
    [:, r, c]."""
    side, dim = 3, 4
    features = torch.tensor([[10.0 * i + d for d in range(dim)] for i in range(side * side)])
    grid = utils.region_grid(features, dim)
    assert grid.shape == (dim, side, side) and grid.dtype == torch.float32
    for r in range(side):
        for c in range(side):
            assert grid[:, r, c].tolist() == [10.0 * (r * side + c) + d for d in range(dim)]
    assert utils.region_grid(features.half(), dim).dtype == torch.float32


def test_dataset_with_and_without_class_subfolders(tmp_path):
    for c in ("b_shirts", "a_shoes"):
        for i in range(2):
            save_region(tmp_path / "classes" / c / f"r{i}.pt", region(4, 8, i))
    labelled = utils.RegionFeatureDataset(str(tmp_path / "classes"), 8)
    assert labelled.classes == ["a_shoes", "b_shirts"] and labelled.targets == [0, 0, 1, 1]
    grid, target = labelled[2]
    assert target == 1 and torch.equal(grid, utils.region_grid(region(4, 8, 0), 8)) and labelled.side == 4
    for i in range(3):
        save_region(tmp_path / "flat" / f"r{i}.pt", region(4, 8, i))
    flat = utils.RegionFeatureDataset(str(tmp_path / "flat"), 8)
    assert flat.classes == ["0"] and flat.targets == [0, 0, 0] and len(flat) == 3


def test_bad_region_files_are_skipped_named_once_and_counted(tmp_path, capsys):
    root = tmp_path / "regions"
    save_region(root / "a_good.pt", region(4, 8, 0))
    bad = {"b_not_square.pt": region(3, 8, 1)[:8],  # 8 tiles
           "c_dict.pt": {"features": region(4, 8, 2)},
           "d_namespace.pt": argparse.Namespace(x=1),  # weights_only refuses to unpickle it
           "e_ints.pt": torch.ones(16, 8, dtype=torch.long),
           "f_other_side.pt": region(5, 8, 3),
           "g_other_width.pt": region(4, 6, 4)}
    for name, value in bad.items():
        save_region(root / name, value)
    (root / "h_corrupt.pt").write_bytes(b"not a zip file at all")
    save_region(root / "i_good.pt", region(4, 8, 5))
    dataset = utils.RegionFeatureDataset(str(root), 8)
    served = [dataset[i][0] for i in range(len(dataset))]
    assert dataset.num_skipped() == 7
    # a skipped file is replaced by the next readable one
    assert torch.equal(served[1], utils.region_grid(region(4, 8, 5), 8))
    assert torch.equal(served[0], utils.region_grid(region(4, 8, 0), 8))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert len(lines) == 7  # once per file, though several reads met it
    expected = {"b_not_square.pt": "[8, 8]: 8 tiles are not a square grid",
                "c_dict.pt": "holds a dict, not a tensor [n_tiles, 8]",
                "d_namespace.pt": "not readable by torch.load with weights_only (UnpicklingError",
                "e_ints.pt": "a int64 tensor [16, 8], not a float tensor [n_tiles, 8]",
                "f_other_side.pt": "[25, 8]: a 5x5 grid, the other regions' are 4x4",
                "g_other_width.pt": "[16, 6]: 6 features per tile, --region_in_dim is 8",
                "h_corrupt.pt": "not readable by torch.load with weights_only"}
    for name, reason in expected.items():
        line = next(line for line in lines if f"{root / name}:" in line)
        assert line.startswith(f"WARNING: skipping region file {root / name}: {reason}"), line


@pytest.mark.parametrize("setup,message", [
    ("first_width", r"a_first.pt: \[16, 6\]: 6 features per tile, --region_in_dim is 8 \(the width of the tile "
                    r"encoder that wrote it\)"),
    ("small", r"a_first.pt: a 4x4 grid of tiles, smaller than the 5x5 crops"),
    ("mixed", r"\.pt files beside subfolders \(sub/\): put every region in a class subfolder, or none"),
    ("empty_class", r"class folder empty/ holds no \.pt file"),
    ("none", r"no \.pt files \(tools/extract_region_features.py writes them\)"),
    ("all_bad", r"no readable region file"),
    ("missing", r"no such folder"),
])
def test_what_cannot_train_is_refused_in_one_line(tmp_path, setup, message):
    root = tmp_path / "regions"
    root.mkdir()
    if setup == "first_width":
        save_region(root / "a_first.pt", region(4, 6, 0))
        save_region(root / "b.pt", region(4, 8, 1))
    elif setup == "small":
        save_region(root / "a_first.pt", region(4, 8, 0))
    elif setup == "mixed":
        save_region(root / "a.pt", region(4, 8, 0))
        save_region(root / "sub" / "b.pt", region(4, 8, 0))
    elif setup == "empty_class":
        save_region(root / "full" / "b.pt", region(4, 8, 0))
        (root / "empty").mkdir()
    elif setup == "none":
        (root / "notes.txt").write_text("no regions")
    elif setup == "all_bad":
        save_region(root / "a.pt", region(3, 8, 0)[:5])
    elif setup == "missing":
        root = tmp_path / "nowhere"
    with pytest.raises(utils.InputError, match=message) as e:
        utils.RegionFeatureDataset(str(root), 8, min_side=5 if setup == "small" else 1)
    assert "\n" not in str(e.value)


# ============ the region multi-crop ============

def test_region_crops_are_windows_of_the_grid_flipped_half_the_time():
    """Each crop is the grid's window of the crop's size at some (top, left), or that window flipped left-right;
    over many draws every position occurs and about half the crops are flipped (HIPT: RandomCrop, then
    RandomHorizontalFlip p 0.5)."""
    dim, side, g, l, n_local = 3, 8, 6, 3, 4
    grid = torch.tensor([[[1000.0 * d + 10 * r + c for c in range(side)] for r in range(side)] for d in range(dim)])
    augment = utils.RegionMultiCrop(g, l, n_local)
    torch.manual_seed(0)
    seen = {g: set(), l: set()}
    flips = {g: 0, l: 0}
    draws = 300
    for _ in range(draws):
        crops = augment(grid)
        assert [tuple(c.shape) for c in crops] == [(dim, g, g)] * 2 + [(dim, l, l)] * n_local
        for crop in crops:
            size = crop.shape[-1]
            flipped = crop[0, 0, 0] > crop[0, 0, -1]  # values grow with the column
            window = crop.flip(-1) if flipped else crop
            top, left = int(window[0, 0, 0]) // 10, int(window[0, 0, 0]) % 10
            assert torch.equal(window, grid[:, top:top + size, left:left + size])
            seen[size].add((top, left))
            flips[size] += int(flipped)
    assert seen[g] == {(t, c) for t in range(side - g + 1) for c in range(side - g + 1)}
    assert seen[l] == {(t, c) for t in range(side - l + 1) for c in range(side - l + 1)}
    assert 0.4 < flips[g] / (2 * draws) < 0.6 and 0.4 < flips[l] / (n_local * draws) < 0.6


# ============ main_dino.py with a region arch ============

def test_crop_sizes_count_cells_for_a_region_arch_and_the_other_defaults_are_hipts():
    parser = main_dino.get_args_parser()
    region = utils.resolve_crop_sizes(parser.parse_args(["--arch", "vit4k_xs"]), main_dino.CROPS_SIZE)
    assert (region.global_crops_size, region.local_crops_size) == (14, 6)
    image = utils.resolve_crop_sizes(parser.parse_args([]), main_dino.CROPS_SIZE)
    assert (image.global_crops_size, image.local_crops_size) == (224, 96)
    given = utils.resolve_crop_sizes(parser.parse_args(["--arch", "vit4k_xs", "--global_crops_size", "7",
                                                        "--local_crops_size", "3"]), main_dino.CROPS_SIZE)
    assert (given.global_crops_size, given.local_crops_size) == (7, 3)
    # HIPT's main_dino4k defaults, as REFERENCE.md lists them
    hipt = {"out_dim": 65536, "norm_last_layer": True, "momentum_teacher": 0.996, "teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 0, "use_fp16": True, "weight_decay": 0.04, "weight_decay_end": 0.4,
            "clip_grad": 3.0, "batch_size_per_gpu": 64, "epochs": 100, "freeze_last_layer": 1, "lr": 0.0005,
            "warmup_epochs": 10, "min_lr": 1e-6, "drop_path_rate": 0.1, "local_crops_number": 8,
            "region_in_dim": 384}
    assert {k: getattr(region, k) for k in hipt} == hipt
    helps = {a.dest: " ".join(a.help.split()) for a in parser._actions}  # what --help prints for each flag
    for flag in ("global_crops_scale", "local_crops_scale"):
        assert "Images only: " in helps[flag] and "region arch" in helps[flag]
    assert "For a region arch (vit4k_xs), in grid cells: default 14" in helps["global_crops_size"]
    assert "For a region arch, in grid cells: default 6" in helps["local_crops_size"]
    main_dino.check_args(parser.parse_args(["--arch", "vit4k_xs", "--patch_size", "300"]))  # no patches
    with pytest.raises(utils.InputError, match="--augmentation gpu: vit4k_xs trains on grids of tile features"):
        main_dino.check_args(parser.parse_args(["--arch", "vit4k_xs", "--augmentation", "gpu"]))


def write_region_folders(root, dim=16, side=8, n_train=16) -> tuple:
    """root/train: n_train unlabelled regions and one that is not a square grid; root/knn/{train,val}: 2 classes of
    regions whose features lean one way per class."""
    for i in range(n_train):
        save_region(root / "train" / f"r{i:02d}.pt", region(side, dim, i))
    save_region(root / "train" / "zz_bad.pt", region(side, dim, 99)[:10])
    for split, n in (("train", 6), ("val", 3)):
        for c in range(2):
            for i in range(n):
                save_region(root / "knn" / split / f"class{c}" / f"r{i}.pt", region(side, dim, 100 + i) + 2 * c)
    return str(root / "train"), str(root / "knn")


def region_training_args(data, knn, out, epochs):
    return ["main_dino.py", "--arch", "vit4k_xs", "--region_in_dim", 16, "--global_crops_size", 6,
            "--local_crops_size", 3, "--local_crops_number", 2, "--out_dim", 64, "--batch_size_per_gpu", 4,
            "--epochs", epochs, "--warmup_epochs", 1, "--log_freq", 1, "--num_workers", 0, "--data_path", data,
            "--knn_data_path", knn, "--knn_k", 3, "--output_dir", out]


@pytest.mark.slow
def test_region_training_skips_bad_files_monitors_knn_and_resumes(tmp_path):
    """Two runs of main_dino.py --arch vit4k_xs: epoch 0, then the same command with --epochs 2 resumes at epoch 1,
    with the learning rate of epoch 1 (written out from the cosine schedule: it continued, it did not restart)."""
    data, knn = write_region_folders(tmp_path)
    out = tmp_path / "out"
    first = run_script(region_training_args(data, knn, out, 1))
    assert f"skipping region file {data}/zz_bad.pt: [10, 16]: 10 tiles are not a square grid" in first.stderr
    assert "global_crops_size: 6" in first.stdout and "augmentation on: cpu" in first.stdout
    second = run_script(region_training_args(data, knn, out, 2))
    assert "Found checkpoint" in second.stdout
    log = [json.loads(line) for line in open(out / "log.txt")]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["skipped_images"] == 1 for r in log)
    assert "knn_top1_init" in log[0] and all(0 <= r["knn_top1"] <= 100 for r in log)
    niter = 16 // 4  # 17 files, one skipped and replaced: 4 whole batches of 4
    base = 0.0005 * 4 / 256
    cosine = [1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * i / niter)) for i in range(niter)]
    assert log[1]["train_lr"] == pytest.approx(sum(cosine) / niter, rel=1e-9)
    assert log[0]["train_lr"] == pytest.approx(sum(base * i / (niter - 1) for i in range(niter)) / niter, rel=1e-9)
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["local_crops_size"] == 3
    assert checkpoint["teacher"]["backbone.phi.0.weight"].shape == (D, 16)
    assert checkpoint["teacher"]["backbone.pos_embed"].shape == (1, 197, D)


B = 4  # regions per process in the 2-process run; the 1-process run takes all 2 * B


def region_dino_steps(rank: int) -> dict:
    """main_dino's networks for vit4k_xs and 2 of its DINO steps on this process's rows of fixed crops; the losses,
    the center and the weights after them."""
    world_size = utils.get_world_size()
    batch = 2 * B // world_size
    args = main_dino.get_args_parser().parse_args([
        "--arch", "vit4k_xs", "--region_in_dim", "16", "--out_dim", "32", "--drop_path_rate", "0",
        "--global_crops_size", "6", "--local_crops_size", "3", "--local_crops_number", "2", "--epochs", "2",
        "--warmup_epochs", "0", "--lr", "0.005", "--momentum_teacher", "0.9", "--use_fp16", "false",
        "--clip_grad", "0.05", "--batch_size_per_gpu", str(batch)])
    torch.manual_seed(0)
    dino = main_dino.DINO.build(args, utils.Distributed(rank=rank, world_size=world_size))
    initial = {k: v.clone() for k, v in dino.student.module.state_dict().items()}
    schedules = main_dino.Schedules.build(args, world_size, 1)
    losses = []
    for epoch in range(2):  # epoch 0 with the head's last layer frozen, epoch 1 without
        momentum, teacher_temp = schedules.apply(dino.optimizer, epoch)
        g = torch.Generator().manual_seed(100 + epoch)
        crops = [torch.randn(2 * B, 16, s, s, generator=g) for s in (6, 6, 3, 3)]
        step = dino.train_step([c[rank * batch:(rank + 1) * batch] for c in crops], epoch, momentum, teacher_temp)
        losses.append(step["loss"].item())
    return {"losses": losses, "center": dino.dino_loss.center.clone(), "initial": initial,
            "student": {k: v.clone() for k, v in dino.student.module.state_dict().items()},
            "teacher": {k: v.clone() for k, v in dino.teacher_without_ddp.state_dict().items()}}


@pytest.mark.slow
def test_two_processes_take_the_same_region_steps_as_one():
    ranks = run_in_gloo_processes(region_dino_steps)
    single = region_dino_steps(0)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # the ranks saw different regions
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean_losses == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(ranks[0]["center"], single["center"], rtol=1e-5, atol=1e-6)
    for key in ("student", "teacher"):
        assert all(torch.equal(v, ranks[1][key][k]) for k, v in ranks[0][key].items())
        assert_same_weights(ranks[0][key], single[key], key)
    moved = max((single["student"][k] - v).abs().max() for k, v in single["initial"].items())
    assert moved > 1e-4  # the steps moved the weights far more than the tolerance


# ============ evaluation: eval_knn.py and eval_linear.py on region folders ============

def write_labelled_regions(root, dim=16, side=4, per_class=(8, 4), shift=1.5) -> dict:
    """root/{train,val}/class{c}: regions whose tile features lean by c * shift; returns {split: (features, labels)}."""
    written = {}
    for split, n in zip(("train", "val"), per_class):
        feats, labels = [], []
        for c in range(2):
            for i in range(n):
                features = region(side, dim, 1000 * c + 100 * (split == "val") + i) + shift * c
                save_region(root / split / f"class{c}" / f"r{i:02d}.pt", features)
                feats.append(features)
                labels.append(c)
        written[split] = (feats, labels)
    return written


def test_region_pool_mean_is_for_region_archs_without_weights():
    parser = eval_knn.get_args_parser()
    with pytest.raises(utils.InputError, match="--region_pool mean: for region feature grids .* not --arch vit_small"):
        eval_knn.check_args(parser.parse_args(["--region_pool", "mean"]))
    with pytest.raises(utils.InputError, match="--pretrained_weights would not be read"):
        eval_knn.check_args(parser.parse_args(["--arch", "vit4k_xs", "--region_pool", "mean",
                                               "--pretrained_weights", "w.pth"]))
    eval_knn.check_args(parser.parse_args(["--arch", "vit4k_xs", "--region_pool", "mean"]))


def test_region_eval_splits_need_the_same_classes(tmp_path):
    save_region(tmp_path / "train" / "a" / "r.pt", region(4, 8, 0))
    save_region(tmp_path / "val" / "b" / "r.pt", region(4, 8, 0))
    with pytest.raises(utils.InputError, match=r"val/ has other classes than train/ .*only in train/: a; only in "
                                               r"val/: b"):
        utils.build_region_eval_datasets(str(tmp_path), 8)
    with pytest.raises(utils.InputError, match=r"no train/ folder \(it must hold train/ and val/ folders of region"):
        utils.build_region_eval_datasets(str(tmp_path / "train"), 8)


def knn_top1(out: str, k: int) -> float:
    return float(re.search(rf"^{k}-NN classifier result: Top1: ([\d.]+)", out, re.M).group(1))


@pytest.mark.slow
def test_region_knn_of_vit4k_xs_and_of_the_mean_of_the_tiles(tmp_path):
    """eval_knn.py's top-1 equals a weighted k-NN written out here on features computed here: the float64 forward
    of the region model (its weights a backbone-only file), and the mean of each region's tile features."""
    written = write_labelled_regions(tmp_path / "data")
    state = hipt_state(in_dim=16, seed=5)
    torch.save(state, tmp_path / "vit4k_xs.pth")

    def normalised(rows):
        x = np.stack([r.numpy() for r in rows]).astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    features = {"cls": {}, "mean": {}}
    for split, (regions, labels) in written.items():
        grids = torch.stack([utils.region_grid(r, 16) for r in regions])
        features["cls"][split] = normalised(reference_forward(state, grids)[0])
        features["mean"][split] = normalised([r.mean(0) for r in regions])
    labels = {split: np.array(labels) for split, (_, labels) in written.items()}
    common = ["eval_knn.py", "--arch", "vit4k_xs", "--region_in_dim", 16, "--data_path", tmp_path / "data",
              "--nb_knn", 3, 5, "--num_workers", 0, "--batch_size_per_gpu", 5]
    runs = {"cls": run_script([*common, "--pretrained_weights", tmp_path / "vit4k_xs.pth"]).stdout,
            "mean": run_script([*common, "--region_pool", "mean"]).stdout}
    assert "--region_pool mean: a region's feature is the mean of its 16-d tile features" in runs["mean"]
    for pool, out in runs.items():
        for k in (3, 5):
            expected = numpy_weighted_knn(features[pool]["train"], labels["train"], features[pool]["val"],
                                          labels["val"], k, 0.07, 2)
            assert knn_top1(out, k) == pytest.approx(expected, abs=1e-3), (pool, k)


@pytest.mark.slow
def test_region_linear_probe_of_vit4k_xs_and_of_the_mean_of_the_tiles(tmp_path):
    write_labelled_regions(tmp_path / "data", shift=3.0)
    torch.save(hipt_state(in_dim=16, seed=5), tmp_path / "vit4k_xs.pth")
    args = ["eval_linear.py", "--arch", "vit4k_xs", "--region_in_dim", 16, "--data_path", tmp_path / "data",
            "--num_workers", 0, "--batch_size_per_gpu", 4]
    run_script([*args, "--pretrained_weights", tmp_path / "vit4k_xs.pth", "--epochs", 1, "--output_dir",
                tmp_path / "cls"])
    log = [json.loads(line) for line in open(tmp_path / "cls" / "log.txt")]
    assert [r["epoch"] for r in log] == [0] and log[0]["test_n"] == 8
    checkpoint = torch.load(tmp_path / "cls" / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["state_dict"]["module.linear.weight"].shape == (2, 4 * D)  # [CLS] of the last 4 blocks
    mean = run_script([*args, "--region_pool", "mean", "--epochs", 3, "--lr", 30, "--output_dir",
                       tmp_path / "mean"]).stdout
    assert "Top-1 test accuracy: 100.0" in mean  # tiles leaning 3 standard deviations apart
    checkpoint = torch.load(tmp_path / "mean" / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["state_dict"]["module.linear.weight"].shape == (2, 16)


# ============ regions and tiles; tools/extract_region_features.py ============

def test_tiles_are_cut_row_by_row():
    """Tile (r, c) of a rows x cols image is tile r * cols + c, and holds the image's pixels of that place."""
    t, rows, cols = 4, 3, 5
    image = torch.arange(2 * rows * t * cols * t, dtype=torch.float32).reshape(2, rows * t, cols * t)
    tiles = utils.tile_image(image, t)
    assert tiles.shape == (rows * cols, 2, t, t)
    for r in range(rows):
        for c in range(cols):
            assert torch.equal(tiles[r * cols + c], image[:, r * t:(r + 1) * t, c * t:(c + 1) * t])
    features = torch.randn(rows * cols, 7)
    grid = utils.tile_features_to_grid(features, rows, cols)
    assert all(torch.equal(grid[:, r, c], features[r * cols + c]) for r in range(rows) for c in range(cols))


def test_region_names_index_the_grid_of_whole_regions():
    assert utils.region_names("slide", 64, 64, 64) == [("slide", 0, 0)]
    assert utils.region_names("slide", 150, 200, 64) == [("slide_0_0", 0, 0), ("slide_0_1", 0, 64),
                                                          ("slide_0_2", 0, 128), ("slide_1_0", 64, 0),
                                                          ("slide_1_1", 64, 64), ("slide_1_2", 64, 128)]
    assert utils.region_names("slide", 64, 100, 64) == [("slide_0_0", 0, 0)]  # larger than one region
    assert utils.region_names("small", 63, 500, 64) == []
    assert [utils.partial_regions(h, w, 64) for h, w in ((64, 64), (150, 200), (64, 100), (63, 500))] == [0, 6, 1, 8]


def extraction_args(data, out, weights):
    return ["tools/extract_region_features.py", "--arch", "vit_tiny", "--patch_size", 8, "--pretrained_weights",
            weights, "--checkpoint_key", "teacher", "--data_path", data, "--region_size", 32, "--tile_size", 16,
            "--output_dir", out, "--mean", 0.5, 0.5, 0.5, "--std", 0.5, 0.5, 0.5, "--batch_size", 3,
            "--num_workers", 0]


@pytest.mark.slow
def test_extraction_writes_hipts_files_in_tile_order_and_resumes_from_a_tar(tmp_path):
    """Images of one region, of two whole regions and a remainder, smaller than a region, and unreadable; each region
    file holds the [CLS] of its tiles, row by row, computed here from the pixels (HIPT's 0.5 normalisation written
    out). Then one file is removed and the tar of the same folder fills it in: the others are not computed again."""
    rng = np.random.default_rng(0)
    data = tmp_path / "images"
    pixels = {"one/exact": rng.integers(0, 256, (32, 32, 3)), "one/wide": rng.integers(0, 256, (40, 70, 3)),
              "two/small": rng.integers(0, 256, (20, 40, 3))}
    for name, array in pixels.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.astype(np.uint8)).save(f"{data / name}.png")
    (data / "two" / "broken.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    model = build_model("vit_tiny", patch_size=8).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ckpt.pth")
    out = tmp_path / "features"
    proc = run_script(extraction_args(data, out, tmp_path / "ckpt.pth"))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.pt")) == ["one/exact.pt", "one/wide_0_0.pt",
                                                                         "one/wide_0_1.pt"]
    # wide: 2 x 3 regions started, 2 whole; small: 1 x 2 started, none whole
    assert ("4 images: 3 regions written to " in proc.stdout and "0 already there; skipped: 6 partial regions (cut by "
            "the bottom or right edge), 1 images smaller than one region, 1 unreadable images" in proc.stdout)
    assert "images/s" in proc.stderr and f"skipping unreadable image {data / 'two' / 'broken.png'}" in proc.stderr
    for name, top, left in (("exact", 0, 0), ("wide_0_0", 0, 0), ("wide_0_1", 0, 32)):
        features = torch.load(out / "one" / f"{name}.pt", weights_only=True)
        assert features.shape == (4, 192) and features.dtype == torch.float32 and features.is_contiguous()
        array = pixels["one/" + name.split("_")[0]]
        for r in range(2):
            for c in range(2):
                tile = array[top + 16 * r: top + 16 * (r + 1), left + 16 * c: left + 16 * (c + 1)] / 255.0
                x = torch.tensor((tile - 0.5) / 0.5, dtype=torch.float32).permute(2, 0, 1)[None]
                with torch.no_grad():
                    torch.testing.assert_close(features[2 * r + c], model(x)[0], rtol=1e-4, atol=1e-5)

    expected = torch.load(out / "one" / "wide_0_1.pt", weights_only=True)
    (out / "one" / "wide_0_1.pt").unlink()
    with tarfile.open(tmp_path / "images.tar", "w") as tar:
        tar.add(data, arcname=".")
    utils.write_tar_entries(str(tmp_path), utils.tar_prefix(str(tmp_path / "images.tar")),
                            *utils.tar_entries(str(tmp_path / "images.tar")))
    proc = run_script(extraction_args(tmp_path / "images.tar", out, tmp_path / "ckpt.pth"))
    assert "4 images: 1 regions written to " in proc.stdout and "2 already there" in proc.stdout
    torch.testing.assert_close(torch.load(out / "one" / "wide_0_1.pt", weights_only=True), expected)


@pytest.mark.parametrize("flags,message", [
    ("--region_size 100 --tile_size 32", "--region_size 100 is not a multiple of --tile_size 32"),
    ("--arch vit4k_xs", "--arch vit4k_xs is a region model: the tiles need a patch-level backbone"),
    ("--tile_size 8 --region_size 64", "--patch_size 16 is larger than --tile_size 8"),
])
def test_extraction_flags_that_cannot_work_are_one_line(flags, message):
    spec = importlib.util.spec_from_file_location("extract_region_features",
                                                  f"{REPO}/tools/extract_region_features.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(utils.InputError) as e:
        tool.check_args(tool.get_args_parser().parse_args(flags.split()))
    assert str(e.value).startswith(message)


# ============ the two-level attention: visualize_attention.py --arch vit4k_xs ============

def test_hierarchical_attention_is_each_tiles_attention_scaled_to_the_regions():
    g = torch.Generator().manual_seed(0)
    rows, cols, h, w = 2, 3, 4, 5
    region_attention = torch.rand(rows, cols, generator=g)
    tile_attention = torch.rand(rows * cols, h, w, generator=g)
    heat = utils.hierarchical_attention(region_attention, tile_attention)
    assert heat.shape == (rows * h, cols * w)
    for r in range(rows):
        for c in range(cols):
            tile = tile_attention[r * cols + c]
            expected = tile / tile.sum() * region_attention[r, c]
            torch.testing.assert_close(heat[r * h:(r + 1) * h, c * w:(c + 1) * w], expected)


def test_cell_attention_is_the_cls_row_of_the_last_block_on_the_grid():
    model = build_model("vit4k_xs", region_in_dim=8).eval()
    model.load_state_dict(hipt_state(in_dim=8, seed=2))
    grid = torch.randn(8, 3, 4)
    attention = utils.cell_attention(model, grid)
    _, reference = reference_forward(hipt_state(in_dim=8, seed=2), grid[None])
    assert attention.shape == (HEADS, 3, 4)
    for r in range(3):
        for c in range(4):
            torch.testing.assert_close(attention[:, r, c].double(), reference[0, :, 0, 1 + r * 4 + c], rtol=1e-4,
                                       atol=1e-6)


def test_two_level_attention_pictures(tmp_path):
    """visualize_attention.py --arch vit4k_xs on a 48 x 80 region of 16-pixel tiles (3 x 5), a vit_tiny/8 tile
    encoder: the region as it was cut, one map per region head over the tiles, the two-level heatmap."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 85, 3)).astype(np.uint8)  # bottom and right remainders are dropped
    Image.fromarray(pixels).save(tmp_path / "region.png")
    torch.manual_seed(0)
    torch.save(build_model("vit_tiny", patch_size=8).state_dict(), tmp_path / "tile.pth")
    torch.save(hipt_state(in_dim=192), tmp_path / "region.pth")
    parser = visualize_attention.get_args_parser()
    flags = ["--arch", "vit4k_xs", "--region_in_dim", "192", "--pretrained_weights", str(tmp_path / "region.pth"),
             "--tile_arch", "vit_tiny", "--tile_patch_size", "8", "--tile_weights", str(tmp_path / "tile.pth"),
             "--tile_size", "16", "--image_path", str(tmp_path / "region.png"), "--output_dir", str(tmp_path / "out")]
    visualize_attention.main(parser.parse_args(flags))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["img.png", "hierarchical.png", "overview.png"] + [f"region_attn-head{j}.png" for j in range(HEADS)])
    assert np.array_equal(np.asarray(Image.open(out / "img.png")), pixels[:48, :80])
    for name in ["hierarchical.png", "region_attn-head0.png"]:
        assert Image.open(out / name).size == (80, 48)
    # 20-pixel tiles of 8-pixel patches: the 4 last rows and columns of each tile have no patch, and no attention
    visualize_attention.main(parser.parse_args(flags[:-6] + ["--tile_size", "20", *flags[-4:-1], str(tmp_path / "r")]))
    heat = np.asarray(Image.open(tmp_path / "r" / "hierarchical.png").convert("RGB")).astype(int)  # (40, 80, 3)
    lowest = np.round(np.array(matplotlib.colormaps["viridis"](0.0)[:3]) * 255)  # imsave's colour of the minimum, 0
    uncovered = np.zeros((40, 80), bool)
    for k in range(2):
        uncovered[20 * k + 16:20 * (k + 1)] = True
    for k in range(4):
        uncovered[:, 20 * k + 16:20 * (k + 1)] = True
    assert heat.shape == (40, 80, 3) and (np.abs(heat[uncovered] - lowest) <= 1).all()
    assert (np.abs(heat[~uncovered] - lowest) > 1).any(axis=-1).all()  # every covered pixel has some attention
    with pytest.raises(utils.InputError, match="--threshold and --pca draw a ViT's patch attention"):
        visualize_attention.check_args(parser.parse_args(flags + ["--threshold", "0.6"]))
    with pytest.raises(utils.InputError, match=r"\(85x50\) is smaller than one 64x64 tile"):
        visualize_attention.main(parser.parse_args(flags[:-6] + ["--tile_size", "64", *flags[-4:]]))
    with pytest.raises(utils.InputError, match="--tile_arch resnet18: the two-level attention needs a ViT"):
        visualize_attention.main(parser.parse_args(flags + ["--tile_arch", "resnet18"]))


# ============ hubconf: HIPT's entry points ============

def test_hipt_entrypoints_load_the_published_files_from_the_hub_cache(tmp_path, monkeypatch):
    """Offline, as the DINO entry points: full checkpoints of HIPT's layout under HIPT's file names in the hub cache
    (weights under 'teacher', args pickled as a Namespace) load strictly; without them, one line names the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    with pytest.raises(RuntimeError, match=r"hipt_vit4k_xs: could not download https://github.com/mahmoodlab/HIPT/"
                                           r"raw/master/HIPT_4K/Checkpoints/vit4k_xs_dino.pth .*place that file at "
                                           rf"{cache}/vit4k_xs_dino.pth"):
        hubconf.hipt_vit4k_xs()
    torch.manual_seed(0)
    tile_state = build_model("vit_small", patch_size=16).state_dict()
    for name, state in (("vit4k_xs_dino.pth", hipt_state(seed=7)), ("vit256_small_dino.pth", tile_state)):
        teacher = {**{f"backbone.{k}": v for k, v in state.items()}, "head.last_layer.weight_g": torch.ones(4, 1)}
        torch.save({"teacher": teacher, "epoch": 100, "args": argparse.Namespace(arch="x")}, cache / name)
    for model in (hubconf.hipt_vit4k_xs(), torch.hub.load(REPO, "hipt_vit4k_xs", source="local")):
        assert all(torch.equal(v, hipt_state(seed=7)[k]) for k, v in model.state_dict().items())
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 384, 16, 16)).shape == (1, D)
    tile = hubconf.hipt_vit256_small()
    assert all(torch.equal(v, tile_state[k]) for k, v in tile.state_dict().items())
    assert hubconf.hipt_vit4k_xs(pretrained=False, drop_path_rate=0.2).blocks[-1].drop_path.drop_prob == \
        pytest.approx(0.2)
    assert sorted(p.name for p in cache.iterdir()) == ["vit256_small_dino.pth", "vit4k_xs_dino.pth"]


# ============ experiments/hipt_mosaics ============

def test_mosaics_differ_by_arrangement_only(tmp_path):
    """Every mosaic holds half shoes, half shirts, all different images; class 0 has the shoes in the top rows,
    class 1 in the bottom rows. The images are flat squares whose grey level names their class and index."""
    spec = importlib.util.spec_from_file_location("make_mosaics", f"{REPO}/experiments/hipt_mosaics/make_mosaics.py")
    make_mosaics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_mosaics)
    names = ["0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt", "7_sneaker",
             "8_bag", "9_ankle_boot"]
    for split in ("train", "val"):
        for c, name in enumerate(names):
            os.makedirs(tmp_path / "fm" / split / name)
            for j in range(12):
                Image.fromarray(np.full((5, 5, 3), 20 * c + j, np.uint8)).save(tmp_path / "fm" / split / name /
                                                                                f"{j}.png")
    args = make_mosaics.get_args_parser().parse_args(["--data_path", str(tmp_path / "fm"), "--output_dir",
                                                      str(tmp_path / "out"), "--train_per_class", "3",
                                                      "--val_per_class", "2", "--grid", "4"])
    make_mosaics.main(args)
    shoes, shirts = {5, 7, 9}, {0, 2, 6}
    for split, per_class in (("train", 3), ("val", 2)):
        for label, (upper, lower) in enumerate(((shoes, shirts), (shirts, shoes))):
            folder = tmp_path / "out" / split / make_mosaics.CLASSES[label]
            assert sorted(os.listdir(folder)) == [f"{i:05d}.png" for i in range(per_class)]
            for i in range(per_class):
                pixels = np.asarray(Image.open(folder / f"{i:05d}.png"))
                assert pixels.shape == (20, 20, 3)
                levels = pixels[::5, ::5, 0].astype(int)  # one grey level per tile, (4, 4)
                assert np.array_equal(pixels[..., 0], np.kron(levels, np.ones((5, 5), int)))  # flat tiles
                assert {v // 20 for v in levels[:2].ravel()} <= upper and {v // 20 for v in levels[2:].ravel()} <= lower
                assert len(set(levels.ravel())) == 16  # no image twice in a mosaic
    with pytest.raises(utils.InputError, match="--grid 5: must be even"):
        make_mosaics.check_args(make_mosaics.get_args_parser().parse_args(["--grid", "5"]))


def test_the_experiment_script_parses_and_asks_for_the_tile_encoder(tmp_path):
    script = f"{REPO}/experiments/hipt_mosaics/run.sh"
    assert subprocess.run(["bash", "-n", script], capture_output=True, text=True).returncode == 0
    env = {"PATH": "/usr/bin:/bin", "DATA": str(tmp_path / "data"), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "give TILE_WEIGHTS" in proc.stderr and not (tmp_path / "out").exists()
