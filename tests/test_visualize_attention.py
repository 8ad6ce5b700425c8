"""visualize_attention.py and the attention-map helpers of utils, on real photos (scikit-image), CPU, no network.

Reference values are computed here independently: PIL resizing and normalisation written out,
the ViT's last-layer attention written out from the state dict, the mass threshold as a slow loop,
and the PNG colours decoded back to matplotlib's colour-map levels.
"""
import math
import os

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

import utils
import visualize_attention
from conftest import run_script, script_env
from vision_transformer import build_model

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
HEADS, P = 3, 16  # vit_tiny/16



def sharpened_vit_tiny_state(seed=0) -> dict:
    """A vit_tiny/16 state dict whose q and k are scaled up, so attention is peaked as in a trained model."""
    torch.manual_seed(seed)
    state = build_model("vit_tiny", patch_size=P).state_dict()
    for k in state:
        if "attn.qkv.weight" in k:
            state[k] = state[k].clone()
            state[k][:2 * 192] *= 6  # q and k rows only
    return state


@pytest.fixture(scope="module")
def vit_state():
    return sharpened_vit_tiny_state()


@pytest.fixture
def checkpoint(tmp_path, vit_state):
    """A training checkpoint layout: teacher -> backbone.* and head.* keys, loaded through the real loader."""
    path = tmp_path / "checkpoint.pth"
    teacher = {f"backbone.{k}": v for k, v in vit_state.items()}
    teacher["head.last_layer.weight_v"] = torch.randn(8, 4)
    torch.save({"teacher": teacher, "epoch": 3}, path)
    return str(path)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """scikit-image's coffee photo (400x600) as a JPEG file."""
    path = tmp_path_factory.mktemp("photo") / "coffee.jpg"
    Image.fromarray(data.coffee()).save(path, quality=95)
    return str(path)


def args_for(**kw):
    args = visualize_attention.get_args_parser().parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


# ============ references written out ============


def reference_input(image: Image.Image, size, p: int) -> np.ndarray:
    """The original's preprocessing by hand: PIL bilinear resize, /255, ImageNet normalisation, crop to p."""
    w, h = image.size
    if len(size) == 1:  # shorter side to size, the longer scaled and truncated (torchvision's rule)
        (h, w) = (size[0], int(size[0] * w / h)) if h <= w else (int(size[0] * h / w), size[0])
    else:
        h, w = size
    x = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float64) / 255
    x = ((x - MEAN) / STD).transpose(2, 0, 1)  # (3, H, W)
    return x[:, :h - h % p, :w - w % p]


def reference_last_attention(state: dict, x: np.ndarray, p: int, heads: int) -> torch.Tensor:
    """Softmax attention of the last block, (heads, 1 + N, 1 + N), from the weights, in float64.

    Only for inputs whose patch grid is the 224/p grid the position embedding was made for.
    """
    sd = {k: v.double() for k, v in state.items()}
    x = torch.from_numpy(x)[None]
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    tokens = tokens.flatten(2).transpose(1, 2)  # (1, N, D)
    tokens = torch.cat([sd["cls_token"], tokens], dim=1) + sd["pos_embed"]
    D = tokens.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(tokens, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = y @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
        q, k, v = qkv.reshape(1, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
        if i == depth - 1:
            return attn[0]
        y = (attn @ v).transpose(1, 2).reshape(1, -1, D) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        tokens = tokens + y
        y = F.layer_norm(tokens, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        tokens = tokens + y @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]


def smallest_mass_set(a: np.ndarray, threshold: float) -> np.ndarray:
    """Take patches from the largest down while those taken hold less than `threshold` of the mass."""
    keep = np.zeros(a.shape, dtype=bool)
    flat, mass, total = a.ravel(), 0.0, a.sum()
    for i in np.argsort(-flat):
        if mass >= threshold * total:
            break
        keep.flat[i] = True
        mass += flat[i]
    return keep


def colormap_levels(png: str, cmap: str = "viridis") -> tuple:
    """Decode a colour-mapped PNG back to the colour map's levels 0..255: per pixel the lowest and highest level
    whose colour is nearest (viridis gives levels 112-113 and 129-130 the same 8-bit colour, so a pixel can be
    either)."""
    lut = (matplotlib.colormaps[cmap](np.arange(256))[:, :3] * 255).round()
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)  # few: one per patch at most
    dist = np.abs(colours[:, None] - lut[None]).sum(-1)
    nearest = dist == dist.min(-1, keepdims=True)
    levels = np.arange(256)
    lo = np.where(nearest, levels, 256).min(-1)
    hi = np.where(nearest, levels, -1).max(-1)
    return lo[inverse.ravel()].reshape(rgb.shape[:2]), hi[inverse.ravel()].reshape(rgb.shape[:2])


def level_error(png: str, expected: np.ndarray) -> np.ndarray:
    """Per pixel, how many levels the PNG's colour is from the expected level (0 inside its range of levels)."""
    lo, hi = colormap_levels(png)
    return np.maximum(np.maximum(lo - expected, expected - hi), 0)


def expected_levels(attention: np.ndarray, p: int) -> np.ndarray:
    """plt.imsave's levels of the nearest-neighbour upsampled map: min to max over 256 colours."""
    a = np.kron(attention, np.ones((p, p)))
    return np.clip(((a - a.min()) / (a.max() - a.min()) * 256).astype(int), 0, 255)


# ============ the helpers in utils ============


def test_cls_attention_rows_sum_to_one_and_match_the_written_out_vit(vit_state):
    model = build_model("vit_tiny", patch_size=P).eval()
    model.load_state_dict(vit_state)
    x = reference_input(Image.fromarray(data.astronaut()), (224, 224), P)
    maps = utils.cls_attention_maps(model, torch.from_numpy(x).float()[None])  # (1, heads, 14, 14)
    assert maps.shape == (1, HEADS, 14, 14)
    attn = reference_last_attention(vit_state, x, P, HEADS)
    torch.testing.assert_close(attn.sum(-1), torch.ones(HEADS, 197, dtype=torch.float64))  # softmax rows
    # the [CLS] row: itself plus its 196 patches hold all the mass
    full = model.get_last_selfattention(torch.from_numpy(x).float()[None])[0, :, 0, 0] + maps[0].sum((-1, -2))
    torch.testing.assert_close(full, torch.ones(HEADS), atol=1e-5, rtol=0)
    torch.testing.assert_close(maps[0].double(), attn[:, 0, 1:].reshape(HEADS, 14, 14), atol=1e-5, rtol=1e-4)
    assert maps.max() > 0.1  # sharpened: some patch gets far more than the uniform 1/197


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.9, 1.0])
def test_attention_mass_mask_is_the_smallest_set_holding_the_mass(threshold):
    rng = np.random.default_rng(1)
    a = rng.dirichlet(np.full(48, 0.3), size=(2, 3)).reshape(2, 3, 6, 8)
    mask = utils.attention_mass_mask(torch.from_numpy(a), threshold).numpy()
    for b in range(2):
        for h in range(3):
            expected = smallest_mass_set(a[b, h], threshold)
            np.testing.assert_array_equal(mask[b, h], expected)
            assert a[b, h][mask[b, h]].sum() >= threshold * a[b, h].sum() - 1e-12
    if threshold == 1.0:
        assert mask.all()


def test_crop_and_nearest_upsampling():
    img = torch.arange(3 * 37 * 50).reshape(3, 37, 50)
    assert utils.crop_to_patch_multiple(img, 8).shape == (3, 32, 48)
    up = utils.upsample_patches(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), 3)[0, 0]
    assert up.shape == (6, 6) and (up[:3, :3] == 1).all() and (up[3:, 3:] == 4).all()


def test_attention_weights_default_to_the_300_epoch_vit_small_8():
    base = "https://dl.fbaipublicfiles.com/dino/"
    assert utils.attention_weights_url("vit_small", 8) == \
        base + "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth"
    assert utils.attention_weights_url("vit_base", 16) == base + "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"


# ============ the script ============


@pytest.mark.slow
def test_script_writes_the_originals_figures_with_the_originals_numbers(tmp_path, checkpoint, photo, vit_state):
    out = tmp_path / "out"
    proc = run_script(["visualize_attention.py", "--arch", "vit_tiny", "--patch_size", P,
                       "--pretrained_weights", checkpoint, "--image_path", photo, "--image_size", 224, 224,
                       "--threshold", 0.6, "--output_dir", out])
    assert "Pretrained weights loaded from" in proc.stdout
    names = sorted(os.listdir(out))
    expected = ["img.png", "overview.png"] + [f"attn-head{j}.png" for j in range(HEADS)] + \
        [f"mask_th0.6_head{j}.png" for j in range(HEADS)]
    assert names == sorted(expected)
    for name in expected[2:]:
        assert Image.open(out / name).size == (224, 224), name

    x = reference_input(Image.open(photo), (224, 224), P)
    attn = reference_last_attention(vit_state, x, P, HEADS)[:, 0, 1:].reshape(HEADS, 14, 14).numpy()
    for j in range(HEADS):  # the heat maps are plt.imsave of the upsampled [CLS] attention of each head
        diff = level_error(out / f"attn-head{j}.png", expected_levels(attn[j], P))
        assert diff.max() <= 1, (j, diff.max())

    # img.png: the normalised input scaled to [0, 1] by its min and max (make_grid normalize, scale_each)
    img = np.asarray(Image.open(out / "img.png"), dtype=np.float64)
    scaled = (x - x.min()) / (x.max() - x.min())
    assert np.abs(img - np.floor(scaled.transpose(1, 2, 0) * 255 + 0.5)).max() <= 1

    # masks: at every patch centre, red blended in (alpha 0.5) exactly where the smallest 60% set is
    centres = np.arange(P // 2, 224, P)
    for j in range(HEADS):
        keep = smallest_mass_set(attn[j], 0.6)
        assert 0 < keep.sum() < keep.size
        mask_img = np.asarray(Image.open(out / f"mask_th0.6_head{j}.png").convert("RGB"), dtype=np.float64)
        got = mask_img[np.ix_(centres, centres)]
        base = img[np.ix_(centres, centres)]
        blended = np.floor(base * 0.5 + np.array([127.5, 0, 0]))
        expected_px = np.where(keep[..., None], blended, base)
        assert np.abs(got - expected_px).max() <= 2, j


def test_default_photo_non_square_size_and_overview(tmp_path, checkpoint, capsys):
    """No --image_path: scikit-image's cat (300x451); one --image_size sets the shorter side."""
    out = tmp_path / "out"
    visualize_attention.main(args_for(arch="vit_tiny", patch_size=P, pretrained_weights=checkpoint,
                                      image_size=[100], output_dir=str(out)))
    # 300x451 -> shorter side 100: 100x150, cropped to multiples of 16: 96x144
    assert Image.open(out / "img.png").size == (144, 96)
    assert Image.open(out / "attn-head2.png").size == (144, 96)
    assert not any(n.startswith("mask_") for n in os.listdir(out))
    overview = Image.open(out / "overview.png")
    assert overview.size[0] > 3 * overview.size[1]  # image and 3 heads side by side, one row
    assert "chelsea" in capsys.readouterr().out


def test_non_square_image_matches_the_model_on_the_written_out_preprocessing(tmp_path, checkpoint, photo,
                                                                              vit_state):
    out = tmp_path / "out"
    visualize_attention.main(args_for(arch="vit_tiny", patch_size=P, pretrained_weights=checkpoint,
                                      image_path=photo, image_size=[200], output_dir=str(out), threshold=0.3))
    x = reference_input(Image.open(photo), [200], P)  # 400x600 -> 200x300 -> 192x288
    assert x.shape == (3, 192, 288)
    model = build_model("vit_tiny", patch_size=P).eval()
    model.load_state_dict(vit_state)
    with torch.no_grad():
        attn = model.get_last_selfattention(torch.from_numpy(x).float()[None])[0, :, 0, 1:].reshape(HEADS, 12, 18)
    for j in range(HEADS):
        assert Image.open(out / f"mask_th0.3_head{j}.png").size == (288, 192)
        diff = level_error(out / f"attn-head{j}.png", expected_levels(attn[j].numpy(), P))
        assert diff.max() <= 1


def test_default_weights_come_from_the_hub_cache_offline(tmp_path, monkeypatch, capsys):
    """vit_small/8 with no --pretrained_weights: the 300-epoch file, here placed in the hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(3)
    state = build_model("vit_small", patch_size=8).state_dict()
    torch.save(state, cache / "dino_deitsmall8_300ep_pretrain.pth")
    out = tmp_path / "out"
    visualize_attention.main(args_for(image_size=[64, 64], output_dir=str(out)))
    assert "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted(["img.png", "overview.png"] + [f"attn-head{j}.png" for j in range(6)])

    model = build_model("vit_small", patch_size=8).eval()
    model.load_state_dict(state)
    x = reference_input(Image.fromarray(data.chelsea()), (64, 64), 8)
    with torch.no_grad():
        attn = model.get_last_selfattention(torch.from_numpy(x).float()[None])[0, :, 0, 1:].reshape(6, 8, 8)
    diff = level_error(out / "attn-head5.png", expected_levels(attn[5].numpy(), 8))
    assert diff.max() <= 1


def test_offline_without_cached_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(utils.InputError, match="could not download https://dl.fbaipublicfiles.com/dino/"
                                               "dino_deitsmall8_300ep_pretrain"):
        visualize_attention.main(args_for(output_dir=str(tmp_path / "out")))


@pytest.mark.parametrize("kw, message", [
    (dict(image_path="missing.jpg"), "--image_path missing.jpg: no such file"),
    (dict(image_path="NOT_AN_IMAGE"), "not a readable image"),
    (dict(arch="resnet50"), "--arch resnet50: attention maps need a ViT"),
    (dict(image_size=[4]), "smaller than one 16x16 patch"),
    (dict(image_size=[1, 2, 3]), "--image_size 1 2 3: give one size"),
    (dict(threshold=1.5), "--threshold 1.5: must be in"),
    (dict(pretrained_weights=""), "no published DINO weights for --arch vit_tiny --patch_size 16"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, checkpoint, kw, message):
    if kw.get("image_path") == "NOT_AN_IMAGE":
        kw["image_path"] = str(tmp_path / "notes.jpg")
        (tmp_path / "notes.jpg").write_text("not a picture")
    kw = dict(dict(arch="vit_tiny", patch_size=P, pretrained_weights=checkpoint, output_dir=str(tmp_path / "o")), **kw)
    with pytest.raises(utils.InputError, match=message.replace(".", r"\.")) as e:
        visualize_attention.main(args_for(**kw))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_command_line_error_is_one_line_and_exit_code_2(tmp_path, checkpoint):
    proc = run_script(["visualize_attention.py", "--arch", "vit_tiny", "--patch_size", P, "--pretrained_weights",
                       checkpoint, "--image_path", tmp_path / "nope.png", "--output_dir", tmp_path],
                      check=False, env=script_env())
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --image_path {tmp_path / 'nope.png'}: no such file"]
