"""HIPT's hierarchical pretraining: vit4k_xs (layout, forward, position embedding), region files and their dataset,
the region multi-crop, training, evaluation, extraction, the two-level attention and the hub entry points.

Reference values are computed here independently: vit4k_xs's forward written out in float64 from HIPT's definition,
HIPT's state-dict layout written out from REFERENCE.md, tile orders and crops by index arithmetic, k-NN votes as a
slow loop.
"""
import argparse
import math

import pytest
import torch

import utils
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
