"""DINOv2's backbones: the published layout loads strictly, the forward is DINOv2's (checked against a float64
forward written out here from the state dict), both position-embedding rules against F.interpolate, SwiGLU against
its formula, the tools (k-NN, linear features, attention maps, PCA pictures and videos), and the bad inputs.

Random weights stand for the published ones: they are written by the tests with DINOv2's key names and shapes
(listed here from DINOv2's published files), never downloaded. ViT-g is only built on the meta device (no memory,
no weights).
"""
import argparse
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

import eval_linear
import utils
import video_generation
import visualize_attention
from conftest import make_image_folder, run_script
from vision_transformer import DINOV2_ARCHS, SwiGLUFFN, UnknownArchError, build_model

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
SIZES = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}
P, REGISTERS = 14, 4


def dinov2_layout(arch: str) -> dict:
    """DINOv2's published keys and shapes, in its order: 37x37 grid (518 px), LayerScale, SwiGLU for ViT-g."""
    D, depth, _ = SIZES[arch.split("_")[1]]
    layout = {"cls_token": (1, 1, D), "pos_embed": (1, 1370, D)}
    if arch.endswith("_reg"):
        layout["register_tokens"] = (1, REGISTERS, D)
    layout.update({"mask_token": (1, D), "patch_embed.proj.weight": (D, 3, P, P), "patch_embed.proj.bias": (D,)})
    H = (int(4 * D * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "ls1.gamma": (D,), b + "norm2.weight": (D,), b + "norm2.bias": (D,)})
        if arch.startswith("dinov2_vitg14"):
            layout.update({b + "mlp.w12.weight": (2 * H, D), b + "mlp.w12.bias": (2 * H,),
                           b + "mlp.w3.weight": (D, H), b + "mlp.w3.bias": (D,)})
        else:
            layout.update({b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                           b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
        layout[b + "ls2.gamma"] = (D,)
    layout.update({"norm.weight": (D,), "norm.bias": (D,)})
    return layout


def random_weights(arch: str, seed: int = 0) -> dict:
    """Random tensors in DINOv2's layout; layer scales in [0.2, 1] and norms near 1, so that every part counts."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in dinov2_layout(arch).items():
        if k.endswith("gamma"):
            state[k] = 0.2 + 0.8 * torch.rand(shape, generator=g)
        elif k.startswith("norm") or ".norm" in k:
            state[k] = (1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
        else:
            state[k] = 0.05 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Random dinov2_vits14_reg weights as a published-layout file, and the state dict."""
    state = random_weights("dinov2_vits14_reg")
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(state, path)
    return str(path), state


@pytest.fixture(scope="module")
def model_reg(weights_file):
    model = build_model("dinov2_vits14_reg").eval()
    model.load_state_dict(weights_file[1], strict=True)
    return model


def photo(h: int, w: int) -> torch.Tensor:
    """scikit-image's astronaut, resized (PIL bilinear) and normalised by hand: (1, 3, h, w)."""
    img = np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.BILINEAR), dtype=np.float64) / 255
    return torch.from_numpy(((img - MEAN) / STD).transpose(2, 0, 1).copy()).float()[None]


# ============ references written out ============


def reference_pos_embed(pos_embed: torch.Tensor, h: int, w: int, antialias: bool) -> torch.Tensor:
    """The position embedding of an h x w patch grid by DINOv2's rules, in float64, (1, 1 + h * w, D)."""
    D = pos_embed.shape[-1]
    if (h, w) == (37, 37):
        return pos_embed.double()
    grid = pos_embed[0, 1:].double().reshape(37, 37, D).permute(2, 0, 1)[None]  # (1, D, 37, 37)
    if antialias:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    else:
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode="bicubic")
    return torch.cat([pos_embed[:, :1].double(), grid[0].permute(1, 2, 0).reshape(1, h * w, D)], dim=1)


def reference_tokens(sd: dict, x: torch.Tensor, antialias: bool) -> torch.Tensor:
    """Patch tokens, then [CLS] prepended, then the position embedding added; only then the registers after [CLS]."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    h, w = x.shape[-2] // P, x.shape[-1] // P
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=P)
    tokens = torch.cat([sd["cls_token"].expand(len(x), -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    tokens = tokens + reference_pos_embed(sd["pos_embed"], h, w, antialias)
    if "register_tokens" in sd:
        tokens = torch.cat([tokens[:, :1], sd["register_tokens"].expand(len(x), -1, -1), tokens[:, 1:]], dim=1)
    return tokens


def reference_forward(sd: dict, x: torch.Tensor, heads: int, antialias: bool):
    """DINOv2's forward in float64 from the state dict: the normed tokens after each block, and the last block's
    attention (B, heads, T, T). Blocks: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), LayerNorm eps 1e-6."""
    tokens = reference_tokens(sd, x, antialias)
    sd = {k: v.double() for k, v in sd.items()}
    B, T, D = tokens.shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    outputs = []
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(tokens, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        q, k, v = (y @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).reshape(
            B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, T, D) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        tokens = tokens + sd[b + "ls1.gamma"] * y
        y = F.layer_norm(tokens, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        if b + "mlp.w12.weight" in sd:
            x1, x2 = (y @ sd[b + "mlp.w12.weight"].T + sd[b + "mlp.w12.bias"]).chunk(2, dim=-1)
            y = (F.silu(x1) * x2) @ sd[b + "mlp.w3.weight"].T + sd[b + "mlp.w3.bias"]
        else:
            y = F.gelu(y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
            y = y @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
        tokens = tokens + sd[b + "ls2.gamma"] * y
        outputs.append(F.layer_norm(tokens, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6))
    return outputs, attn


def reference_pca(features: np.ndarray, border: np.ndarray = None):
    """PCA by an eigendecomposition of the covariance (float64), signs by utils.PatchPCA's stated rule: each
    component's score of largest magnitude positive; with border, the first component's border mean negative."""
    centred = features - features.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    vectors = vectors[:, ::-1][:, :3]  # the 3 largest
    scores = centred @ vectors
    signs = np.sign(scores[np.abs(scores).argmax(0), range(3)])
    if border is not None:
        signs[0] = -np.sign(scores[border, 0].mean())
    return scores * signs, vectors * signs


def minmax(scores: np.ndarray) -> np.ndarray:
    return (scores - scores.min(0)) / (scores.max(0) - scores.min(0))


# ============ the layout ============


@pytest.mark.parametrize("arch", list(DINOV2_ARCHS))
def test_state_dict_is_dinov2s_published_layout(arch):
    with torch.device("meta"):  # ViT-g has 1.1 billion parameters: layouts only
        model = build_model(arch, patch_size=14)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got.items()) == list(dinov2_layout(arch).items())  # names, shapes and DINOv2's order
    D, depth, heads = SIZES[arch.split("_")[1]]
    assert model.embed_dim == D and len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
    assert model.norm.eps == 1e-6 and model.blocks[-1].norm2.eps == 1e-6
    assert model.num_prefix_tokens == (1 + REGISTERS if arch.endswith("_reg") else 1)
    assert model.interpolate_antialias == arch.endswith("_reg")
    assert not model.mask_token.requires_grad  # only loaded: DINO masks no patch


def test_vitg_swiglu_hidden_size():
    with torch.device("meta"):
        mlp = build_model("dinov2_vitg14").blocks[0].mlp
    assert isinstance(mlp, SwiGLUFFN)
    assert (int(4 * 1536 * 2 / 3) + 7) // 8 * 8 == 4096 and mlp.w3.in_features == 4096
    assert mlp.w12.out_features == 2 * 4096


def chunked(key: str, chunk_size: int = 3) -> str:
    """blocks.{i}.rest as DINOv2's block-chunked training checkpoints write it: blocks.{i // chunk_size}.{i}.rest."""
    if not key.startswith("blocks."):
        return key
    i = int(key.split(".")[1])
    return f"blocks.{i // chunk_size}.{key.removeprefix('blocks.')}"


def test_random_weights_in_dinov2s_layout_load_strictly(weights_file, tmp_path):
    path, state = weights_file
    model = build_model("dinov2_vits14_reg", patch_size=14)
    utils.load_pretrained_weights(model, path, "teacher", "dinov2_vits14_reg", 14)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # a DINOv2 training checkpoint: teacher/backbone.*, blocks in 4 chunks of 3 (blocks.{chunk}.{i}), heads dropped
    teacher = {"backbone." + chunked(k): v for k, v in state.items()}
    assert "backbone.blocks.3.11.ls2.gamma" in teacher and "backbone.blocks.0.0.norm1.weight" in teacher
    teacher["dino_head.mlp.0.weight"] = torch.zeros(8, 384)
    teacher["ibot_head.mlp.0.weight"] = torch.zeros(8, 384)
    torch.save({"teacher": teacher, "iteration": 10}, tmp_path / "teacher_checkpoint.pth")
    from_chunks = build_model("dinov2_vits14_reg", patch_size=14)
    utils.load_pretrained_weights(from_chunks, str(tmp_path / "teacher_checkpoint.pth"), "teacher",
                                  "dinov2_vits14_reg", 14)
    for k, v in from_chunks.state_dict().items():
        assert torch.equal(v, state[k]), k


# ============ the forward ============


def test_registers_come_after_the_position_embedding(model_reg, weights_file):
    x = photo(56, 84)  # 4 x 6 patches
    tokens = model_reg.prepare_tokens(x)
    assert tokens.shape == (1, 1 + REGISTERS + 24, 384)
    expected = reference_tokens(weights_file[1], x, antialias=True)
    torch.testing.assert_close(tokens.double(), expected, rtol=1e-5, atol=1e-5)
    # the registers are the parameters themselves, no position embedding added; [CLS] has its own
    torch.testing.assert_close(tokens[0, 1:1 + REGISTERS], weights_file[1]["register_tokens"][0])
    torch.testing.assert_close(tokens[0, 0], weights_file[1]["cls_token"][0, 0] + weights_file[1]["pos_embed"][0, 0])


@pytest.mark.parametrize("arch, size", [("dinov2_vits14_reg", (42, 70)), ("dinov2_vits14", (70, 42))])
def test_forward_outputs_and_attention_match_the_written_out_dinov2(arch, size):
    state = random_weights(arch, seed=1)
    model = build_model(arch, patch_size=14).eval()
    model.load_state_dict(state, strict=True)
    x = photo(*size)
    outputs, attn = reference_forward(state, x, heads=6, antialias=arch.endswith("_reg"))
    with torch.no_grad():
        cls = model(x)
        layers = model.get_intermediate_layers(x, 2)
        last_attention = model.get_last_selfattention(x)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls.double(), outputs[-1][:, 0], **tol)  # forward: the normed [CLS]
    assert len(layers) == 2 and layers[0].shape == outputs[-2].shape  # all tokens, registers included
    torch.testing.assert_close(layers[0].double(), outputs[-2], **tol)
    torch.testing.assert_close(layers[1].double(), outputs[-1], **tol)
    torch.testing.assert_close(last_attention.double(), attn, **tol)
    # the attention maps skip [CLS] and the registers: the rest of [CLS]'s row, on the patch grid
    maps = utils.cls_attention_maps(model, x)
    h, w = size[0] // 14, size[1] // 14
    torch.testing.assert_close(maps.double(), attn[:, :, 0, model.num_prefix_tokens:].reshape(1, 6, h, w), **tol)


def test_sides_not_multiples_of_14_lose_their_remainder(model_reg):
    x = photo(60, 90)
    with torch.no_grad():
        torch.testing.assert_close(model_reg(x), model_reg(x[..., :56, :84]))


# ============ position embedding and SwiGLU ============


@pytest.mark.parametrize("h, w", [(16, 16), (4, 6), (40, 23), (37, 37)])
@pytest.mark.parametrize("arch", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_position_embedding_rules_match_f_interpolate(arch, h, w):
    torch.manual_seed(0)
    model = build_model(arch, patch_size=14)
    tokens = torch.zeros(1, 1 + h * w, 384)
    pos = model.interpolate_pos_encoding(tokens, h * 14, w * 14)
    expected = reference_pos_embed(model.pos_embed.detach(), h, w, antialias=arch.endswith("_reg"))
    torch.testing.assert_close(pos.detach().double(), expected, rtol=1e-5, atol=1e-6)
    if (h, w) == (37, 37):
        assert pos is model.pos_embed
    else:  # the other rule gives other numbers: each model has its own
        other = reference_pos_embed(model.pos_embed.detach(), h, w, antialias=not arch.endswith("_reg"))
        assert (pos.detach().double() - other).abs().max() > 1e-3


def test_position_embedding_is_computed_in_fp32_and_cast_back():
    torch.manual_seed(0)
    model = build_model("dinov2_vits14_reg", patch_size=14)
    model.pos_embed.data = model.pos_embed.data.bfloat16()
    tokens = torch.zeros(1, 1 + 4 * 6, 384, dtype=torch.bfloat16)
    pos = model.interpolate_pos_encoding(tokens, 56, 84)
    assert pos.dtype == torch.bfloat16
    grid = model.pos_embed[0, 1:].detach().float().reshape(37, 37, 384).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(4, 6), mode="bicubic", antialias=True)  # in fp32
    assert torch.equal(pos[0, 1:], grid[0].permute(1, 2, 0).reshape(24, 384).bfloat16())  # one rounding, at the end


def test_the_no_register_rule_is_dinos():
    """DINO's ViTs and DINOv2's without registers share the offset rule: the same grid resizes to the same numbers."""
    torch.manual_seed(0)
    dino = build_model("vit_small", patch_size=14)  # a 16x16 grid (224 px)
    tokens = torch.zeros(1, 1 + 9 * 12, 384)
    expected = torch.cat([dino.pos_embed[:, :1], F.interpolate(
        dino.pos_embed[0, 1:].reshape(1, 16, 16, 384).permute(0, 3, 1, 2), scale_factor=(9.1 / 16, 12.1 / 16),
        mode="bicubic")[0].permute(1, 2, 0).reshape(1, 108, 384)], dim=1)
    torch.testing.assert_close(dino.interpolate_pos_encoding(tokens, 126, 168), expected)


def test_swiglu_matches_its_formula():
    torch.manual_seed(0)
    mlp = SwiGLUFFN(24, 4 * 24)  # the class of ViT-g, small
    H = (int(4 * 24 * 2 / 3) + 7) // 8 * 8
    assert H == 64 and mlp.w12.weight.shape == (2 * H, 24) and mlp.w3.weight.shape == (24, H)
    x = torch.randn(2, 5, 24)
    w1, w2 = mlp.w12.weight[:H], mlp.w12.weight[H:]
    b1, b2 = mlp.w12.bias[:H], mlp.w12.bias[H:]
    x1, x2 = x @ w1.T + b1, x @ w2.T + b2
    expected = (x1 * torch.sigmoid(x1) * x2) @ mlp.w3.weight.T + mlp.w3.bias  # silu(a) = a * sigmoid(a)
    torch.testing.assert_close(mlp(x), expected)


def test_trains_as_a_dino_backbone():
    """main_dino's student: every parameter but the frozen mask token gets a gradient."""
    torch.manual_seed(0)
    model = build_model("dinov2_vits14_reg", patch_size=14)
    out = model(torch.randn(2, 3, 28, 42))
    (out * torch.randn_like(out)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == ["mask_token"]


# ============ evaluation ============


@pytest.mark.slow
def test_knn_features_are_the_normed_cls_token(tmp_path, weights_file):
    path, state = weights_file
    make_image_folder(str(tmp_path / "data" / "train"), n_classes=2, per_class=3, size=32)
    make_image_folder(str(tmp_path / "data" / "val"), n_classes=2, per_class=2, size=32, seed=1)
    proc = run_script(["eval_knn.py", "--arch", "dinov2_vits14_reg", "--pretrained_weights",
                       path, "--data_path", tmp_path / "data", "--resize_size", 32, "--crop_size", 28,
                       "--nb_knn", 1, 2, "--num_workers", 0, "--dump_features", tmp_path / "features"])
    assert "1-NN classifier result" in proc.stdout
    features = torch.load(tmp_path / "features" / "trainfeat.pth")
    assert features.shape == (6, 384)
    # the first training image through the evaluation transform, written out: bicubic resize 32 is a no-op here
    img = np.asarray(Image.open(tmp_path / "data" / "train" / "class0" / "img0.png").convert("RGB"),
                     dtype=np.float64)[2:30, 2:30] / 255
    x = torch.from_numpy(((img - MEAN) / STD).transpose(2, 0, 1).copy())[None]
    cls = reference_forward(state, x, heads=6, antialias=True)[0][-1][0, 0]
    torch.testing.assert_close(features[0].double(), cls / cls.norm(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_last_blocks", [1, 2])
def test_linear_features_average_the_patch_tokens_only(model_reg, weights_file, n_last_blocks):
    x = photo(28, 42)
    args = argparse.Namespace(n_last_blocks=n_last_blocks, avgpool_patchtokens=True)
    with torch.no_grad():
        features = eval_linear.frozen_features(model_reg, x, args)
    outputs = reference_forward(weights_file[1], x, heads=6, antialias=True)[0]
    cls = [o[:, 0] for o in outputs[-n_last_blocks:]]
    patch_mean = outputs[-1][:, 1 + REGISTERS:].mean(dim=1)  # registers excluded
    if n_last_blocks == 1:  # DINO's interleaved layout of the published ViT-B linear weights
        expected = torch.stack([cls[0], patch_mean], dim=-1).flatten(1)
    else:
        expected = torch.cat(cls + [patch_mean], dim=-1)
    torch.testing.assert_close(features.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_linear_probe_runs(tmp_path, weights_file):
    make_image_folder(str(tmp_path / "data" / "train"), n_classes=2, per_class=3, size=32)
    make_image_folder(str(tmp_path / "data" / "val"), n_classes=2, per_class=2, size=32, seed=1)
    run_script(["eval_linear.py", "--arch", "dinov2_vits14_reg", "--pretrained_weights",
                weights_file[0], "--data_path", tmp_path / "data", "--resize_size", 32, "--crop_size", 28,
                "--n_last_blocks", 1, "--avgpool_patchtokens", "true", "--epochs", 1, "--batch_size_per_gpu", 4,
                "--num_workers", 0, "--output_dir", tmp_path / "linear"])
    saved = torch.load(tmp_path / "linear" / "checkpoint.pth.tar", weights_only=True)
    assert saved["state_dict"]["module.linear.weight"].shape == (2, 2 * 384)


# ============ PCA of patch features ============


def test_pca_components_are_orthonormal_and_the_picture_deterministic():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(7, 9, 32)) @ rng.normal(size=(32, 32))).float()
    first = utils.pca_pictures(features)
    for again, then in zip(utils.pca_pictures(features.clone()), first):
        assert torch.equal(again, then)
    pca = utils.PatchPCA.fit(features.reshape(-1, 32))
    torch.testing.assert_close(pca.components @ pca.components.T, torch.eye(3), atol=1e-5, rtol=0)
    scores = pca.scores(features.reshape(-1, 32)).double()
    cov = scores.T @ scores
    torch.testing.assert_close(cov - torch.diag(cov.diag()), torch.zeros(3, 3, dtype=torch.float64),
                               atol=1e-3 * cov.diag().max().item(), rtol=0)  # uncorrelated scores
    # the picture is the 3 scores min-max scaled, with the signs of the stated rule
    border = utils.border_patches(7, 9).flatten().numpy()
    ref_scores, ref_axes = reference_pca(features.reshape(-1, 32).double().numpy(), border)
    np.testing.assert_allclose(pca.components[1:].numpy(), ref_axes[:, 1:].T, atol=1e-4)
    np.testing.assert_allclose(first[0].reshape(3, -1).T.numpy(), minmax(ref_scores), atol=1e-4)


def synthetic_object(h, w, rows, cols, seed=0):
    """Patch features of one object on a flat background: two vectors, a little noise."""
    rng = np.random.default_rng(seed)
    background, thing = rng.normal(size=32), rng.normal(size=32)
    features = np.tile(background, (h, w, 1))
    features[rows, cols] = thing
    features += 0.05 * rng.normal(size=features.shape)
    mask = np.zeros((h, w), dtype=bool)
    mask[rows, cols] = True
    return torch.from_numpy(features).float(), mask


@pytest.mark.parametrize("rows, cols", [(slice(2, 5), slice(3, 7)),  # a small object
                                        (slice(1, 7), slice(1, 9))])  # one larger than the background
def test_foreground_of_an_object_on_a_flat_background(rows, cols):
    features, expected = synthetic_object(8, 10, rows, cols)
    rgb, foreground_rgb, foreground = utils.pca_pictures(features, threshold=0.0)
    np.testing.assert_array_equal(foreground.numpy(), expected)
    assert (foreground_rgb[:, ~foreground] == 0).all()  # background black
    assert (foreground_rgb[:, foreground].sum(0) > 0).any()
    # the second PCA sees the object only: its colours are those of a PCA of the object's patches
    ref_scores, _ = reference_pca(features[foreground].double().numpy())
    np.testing.assert_allclose(foreground_rgb[:, foreground].T.numpy(), minmax(ref_scores), atol=1e-4)
    # the threshold is in standard deviations of the first score: above the object's, nothing is foreground
    assert not utils.pca_pictures(features, threshold=3.0)[2].any()


def test_visualize_attention_pca_pictures(tmp_path, model_reg, weights_file):
    out = tmp_path / "out"
    args = visualize_attention.get_args_parser().parse_args(
        ["--arch", "dinov2_vits14_reg", "--pretrained_weights", weights_file[0],
         "--image_size", "70", "98", "--pca", "--output_dir", str(out)])
    visualize_attention.main(args)
    names = {"img.png", "overview.png", "pca.png", "pca_foreground.png"} | {f"attn-head{j}.png" for j in range(6)}
    assert set(os.listdir(out)) == names
    pca_png = np.asarray(Image.open(out / "pca.png"), dtype=np.float64)
    assert pca_png.shape == (70, 98, 3)
    # the features of the image as the script saw it (img.png is min-max scaled: rebuild it from the chelsea photo)
    x = utils.attention_transform([70, 98])(Image.fromarray(data.chelsea()))[None]
    with torch.no_grad():
        features = model_reg.get_intermediate_layers(x, 1)[0][0, 1 + REGISTERS:].double().numpy()  # (35, 384)
    scores, _ = reference_pca(features, utils.border_patches(5, 7).flatten().numpy())
    expected = np.kron(minmax(scores).reshape(5, 7, 3), np.ones((14, 14, 1))) * 255
    assert np.abs(pca_png - expected).max() <= 1
    first = (out / "pca.png").read_bytes(), (out / "pca_foreground.png").read_bytes()
    visualize_attention.main(args)
    assert ((out / "pca.png").read_bytes(), (out / "pca_foreground.png").read_bytes()) == first  # every run


def test_video_pca_one_fit_for_all_frames(tmp_path, weights_file, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    cat = data.chelsea()[:, :420]
    for i, shift in enumerate([0, 40, 0, 80]):  # frames 0 and 2 are the same picture
        Image.fromarray(np.roll(cat, shift, axis=1)).save(folder / f"frame-{i}.png")
    args = video_generation.get_args_parser().parse_args(
        ["--arch", "dinov2_vits14_reg", "--pretrained_weights", weights_file[0], "--pca",
         "--input_path", str(folder), "--output_path", str(tmp_path / "out"), "--resize", "42", "--num_workers", "0"])
    video_generation.main(args)
    assert "PCA fitted on all 48 patch features of 4 frames" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["pca", "video_pca.mp4"]
    assert sorted(os.listdir(tmp_path / "out" / "pca")) == [f"pca-frame-{i}.jpg" for i in range(4)]

    # the images themselves (before JPEG) against one PCA of the 4 frames' 12 patch features each, borders background
    model = build_model("dinov2_vits14_reg", patch_size=14).eval()
    model.load_state_dict(weights_file[1])
    frames = [str(folder / f"frame-{i}.png") for i in range(4)]
    (tmp_path / "again").mkdir()
    resolved = utils.resolve_patch_size(args, video_generation.PATCH_SIZE)  # what main does first: --patch_size 14
    images = np.stack(list(video_generation.pca_images(model, frames, str(tmp_path / "again"), torch.device("cpu"),
                                                       resolved))).astype(np.float64)
    assert images.shape == (4, 42, 56, 3)
    np.testing.assert_array_equal(images[0], images[2])  # one PCA: the same picture, the same colours
    assert np.abs(images[0] - images[1]).mean() > 5
    x = torch.cat([utils.attention_transform([42])(Image.open(f))[None] for f in frames])[..., :42, :56]
    with torch.no_grad():
        features = model.get_intermediate_layers(x, 1)[0][:, 1 + REGISTERS:].double().numpy()  # (4, 12, 384)
    scores, _ = reference_pca(features.reshape(-1, 384), np.tile(utils.border_patches(3, 4).flatten().numpy(), 4))
    expected = np.kron(minmax(scores).reshape(4, 3, 4, 3), np.ones((1, 14, 14, 1))) * 255
    assert np.abs(images - expected).max() <= 1
    for i in range(4):  # the files are those images, through JPEG
        jpeg = np.asarray(Image.open(tmp_path / "out" / "pca" / f"pca-frame-{i}.jpg"), dtype=np.float64)
        assert np.abs(jpeg - images[i]).mean() < 8

    args.pca_fit_tokens, args.output_path = 20, str(tmp_path / "sub")
    video_generation.main(args)
    assert "PCA fitted on 20 of the 48 patch features of 4 frames, 5 drawn at random from each frame" in \
        capsys.readouterr().out


# ============ bad inputs ============


@pytest.mark.slow
def test_wrong_patch_size_is_one_line(tmp_path):
    with pytest.raises(UnknownArchError, match=r"--patch_size 16: dinov2_vitb14 has 14x14 patches"):
        build_model("dinov2_vitb14", patch_size=16)
    args = argparse.Namespace(arch="dinov2_vits14_reg", patch_size=8, crop_size=224)
    with pytest.raises(utils.InputError, match=r"^--patch_size 8: dinov2_vits14_reg has 14x14 patches "
                                               r"\(give --patch_size 14\)$"):
        utils.check_patch_fits(args, "crop_size")
    proc = run_script(["eval_knn.py", "--arch", "dinov2_vits14", "--patch_size", 16, "--data_path", tmp_path],
                      check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --patch_size 16: dinov2_vits14 has 14x14 patches "
                                                "(give --patch_size 14)"]



@pytest.mark.parametrize("script, dino_default", [("main_dino", 16), ("eval_knn", 16), ("eval_linear", 16),
                                                  ("visualize_attention", 8), ("video_generation", 8)])
def test_patch_size_not_given_is_the_archs_own(script, dino_default, tmp_path):
    """--arch dinov2_* alone takes its 14; a DINO ViT the script's default; a given size stays as given."""
    module = __import__(script)
    parser = module.get_args_parser()
    extra = ["--input_path", str(tmp_path)] if script == "video_generation" else []
    for arch, expected in (("dinov2_vits14", 14), ("dinov2_vitb14_reg", 14), ("vit_small", dino_default)):
        args = parser.parse_args(["--arch", arch, *extra])
        assert args.patch_size is None  # "not given" as parsed
        resolved = utils.resolve_patch_size(args, module.PATCH_SIZE)
        assert resolved.patch_size == expected and args.patch_size is None
        module.check_args(args)  # no "--patch_size 16: dinov2_vits14 has 14x14 patches"
    args = parser.parse_args(["--arch", "dinov2_vits14", "--patch_size", "8", *extra])
    with pytest.raises(utils.InputError, match=r"^--patch_size 8: dinov2_vits14 has 14x14 patches"):
        module.check_args(args)
    help_text = " ".join(parser.format_help().split())
    assert f"14 for the DINOv2 archs (the only size they have), {dino_default}" in help_text


def test_dinov2_weights_for_a_dino_vit_and_the_reverse_name_the_shapes(tmp_path, weights_file):
    with pytest.raises(utils.InputError) as e:
        utils.load_pretrained_weights(build_model("vit_small", patch_size=16), weights_file[0], "teacher",
                                      "vit_small", 16)
    message = str(e.value)
    assert "\n" not in message
    assert "shapes differ: pos_embed [1, 1370, 384] in file vs [1, 197, 384] in model; " \
           "patch_embed.proj.weight [384, 3, 14, 14] in file vs [384, 3, 16, 16] in model" in message
    assert "unexpected keys (e.g. register_tokens, mask_token, blocks.0.ls1.gamma)" in message
    assert message.endswith("the file holds the backbone of --arch dinov2_vits14_reg --patch_size 14")

    torch.save(build_model("vit_small", patch_size=16).state_dict(), tmp_path / "dino.pth")
    with pytest.raises(utils.InputError) as e:
        utils.load_pretrained_weights(build_model("dinov2_vits14"), str(tmp_path / "dino.pth"), "teacher",
                                      "dinov2_vits14", 14)
    message = str(e.value)
    assert "shapes differ: pos_embed [1, 197, 384] in file vs [1, 1370, 384] in model; " \
           "patch_embed.proj.weight [384, 3, 16, 16] in file vs [384, 3, 14, 14] in model" in message
    assert "missing keys (e.g. mask_token, blocks.0.ls1.gamma, blocks.0.ls2.gamma)" in message
    assert message.endswith("the file holds the backbone of --arch vit_small --patch_size 16")


def test_input_smaller_than_one_patch(tmp_path, weights_file, model_reg):
    with pytest.raises(ValueError, match="input 10x30 is smaller than one 14x14 patch"):
        model_reg(torch.zeros(1, 3, 10, 30))
    args = visualize_attention.get_args_parser().parse_args(
        ["--arch", "dinov2_vits14_reg", "--patch_size", "14", "--pretrained_weights", weights_file[0],
         "--image_size", "10", "--output_dir", str(tmp_path)])
    with pytest.raises(utils.InputError, match=r"^--image_size 10: the image is smaller than one 14x14 patch$"):
        visualize_attention.main(args)
    args = argparse.Namespace(arch="dinov2_vits14", patch_size=14, crop_size=10)
    with pytest.raises(utils.InputError, match=r"^--patch_size 14 is larger than --crop_size 10"):
        utils.check_patch_fits(args, "crop_size")
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(data.chelsea()).save(folder / "a.png")
    args = video_generation.get_args_parser().parse_args(
        ["--arch", "dinov2_vits14_reg", "--patch_size", "14", "--pretrained_weights", weights_file[0], "--pca",
         "--input_path", str(folder), "--output_path", str(tmp_path / "out"), "--resize", "10", "--num_workers", "0"])
    with pytest.raises(utils.InputError, match=r"a\.png: 10x15 pixels as the model sees it \(see --resize\), "
                                               r"smaller than one 14x14 patch$"):
        video_generation.main(args)


def test_no_published_linear_weights_for_dinov2():
    with pytest.raises(utils.InputError, match="--arch dinov2_vits14: no published linear classifier"):
        utils.published_linear_weights_url("dinov2_vits14", 14)


def test_published_dinov2_weights_by_default_from_the_hub_cache(tmp_path, monkeypatch, weights_file, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(weights_file[1], cache / "dinov2_vits14_reg4_pretrain.pth")
    args = argparse.Namespace(arch="dinov2_vits14_reg", patch_size=14, pretrained_weights="", checkpoint_key="teacher")
    model = utils.build_attention_backbone(args, torch.device("cpu"))
    assert "using the published DINOv2 weights https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/" \
           "dinov2_vits14_reg4_pretrain.pth" in capsys.readouterr().out
    assert all(torch.equal(v, weights_file[1][k]) for k, v in model.state_dict().items())
