"""vision_transformer.py: shapes, state-dict layout, attention paths, position-embedding interpolation, DINO head."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vision_transformer as vits
from vision_transformer import DINOHead, UnknownArchError, build_model


def reference_layout(D, p, depth=12):
    """The published backbone keys and shapes, written out from REFERENCE.md."""
    layout = {"cls_token": [1, 1, D], "pos_embed": [1, 1 + (224 // p) ** 2, D],
              "patch_embed.proj.weight": [D, 3, p, p], "patch_embed.proj.bias": [D],
              "norm.weight": [D], "norm.bias": [D]}
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({b + "norm1.weight": [D], b + "norm1.bias": [D], b + "attn.qkv.weight": [3 * D, D],
                       b + "attn.qkv.bias": [3 * D], b + "attn.proj.weight": [D, D], b + "attn.proj.bias": [D],
                       b + "norm2.weight": [D], b + "norm2.bias": [D], b + "mlp.fc1.weight": [4 * D, D],
                       b + "mlp.fc1.bias": [4 * D], b + "mlp.fc2.weight": [D, 4 * D], b + "mlp.fc2.bias": [D]})
    return layout


@pytest.mark.parametrize("arch,D,heads,p", [("vit_tiny", 192, 3, 16), ("vit_small", 384, 6, 16),
                                            ("vit_small", 384, 6, 8), ("vit_base", 768, 12, 16),
                                            ("deit_small", 384, 6, 16)])
def test_state_dict_layout_matches_published_weights(arch, D, heads, p):
    model = build_model(arch, patch_size=p)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == reference_layout(D, p)
    assert model.embed_dim == D and model.blocks[0].attn.num_heads == heads
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6


def test_forward_shapes_gradients_and_no_nan():
    torch.manual_seed(0)
    model = build_model("vit_tiny", patch_size=16, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.shape == (2, 192) and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()  # a plain sum of a layer-normed vector has no gradient
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_sdpa_path_equals_explicit_attention():
    torch.manual_seed(0)
    attn = vits.Attention(dim=48, num_heads=4)
    x = torch.randn(3, 10, 48)
    fused, none = attn(x)
    explicit, weights = attn(x, return_attention=True)
    assert none is None
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
    # the explicit attention, computed here by hand
    q, k, v = attn.qkv(x).reshape(3, 10, 3, 4, 12).permute(2, 0, 3, 1, 4)
    by_hand = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(12), dim=-1)
    torch.testing.assert_close(weights, by_hand, rtol=1e-5, atol=1e-6)


def test_last_selfattention_and_intermediate_layers():
    torch.manual_seed(0)
    model = build_model("vit_tiny", patch_size=8).eval()
    x = torch.randn(2, 3, 48, 64)  # 6 x 8 patches
    attn = model.get_last_selfattention(x)
    assert attn.shape == (2, 3, 49, 49)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 49))
    layers = model.get_intermediate_layers(x, n=4)
    assert len(layers) == 4 and all(t.shape == (2, 49, 192) for t in layers)
    torch.testing.assert_close(layers[-1][:, 0], model(x))  # last layer's normed [CLS] is the forward output
    # each is layer-normed: zero mean, unit variance before the affine part (weights 1, biases 0 at init)
    torch.testing.assert_close(layers[0].mean(-1), torch.zeros(2, 49), atol=1e-5, rtol=0)


def bicubic_resize_reference(grid, scale_h, scale_w):
    """Bicubic resampling (A=-0.75, half-pixel centres, clamped borders) driven by the scale factors, as
    torch.nn.functional.interpolate(scale_factor=...) computes it: written out here, one output pixel at a time."""
    def cubic(t):
        a, t = -0.75, abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0

    D, n_h, n_w = grid.shape
    out_h, out_w = math.floor(n_h * scale_h), math.floor(n_w * scale_w)

    def weights(n_in, n_out, scale):
        w = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            src = (i + 0.5) / scale - 0.5
            x0 = math.floor(src)
            for off in range(-1, 3):
                w[i, min(max(x0 + off, 0), n_in - 1)] += cubic(src - (x0 + off))
        return w

    wh, ww = weights(n_h, out_h, scale_h), weights(n_w, out_w, scale_w)
    return torch.einsum("ih,dhw,jw->dij", wh, grid.double(), ww)


@pytest.mark.parametrize("h,w", [(224, 224), (96, 96), (480, 480), (480, 640), (100, 260)])
def test_position_embedding_interpolation_matches_the_original_formula(h, w):
    torch.manual_seed(0)
    p, D = 16, 192
    model = build_model("vit_tiny", patch_size=p)
    n = 14
    tokens = torch.zeros(1, 1 + (h // p) * (w // p), D)
    pos = model.interpolate_pos_encoding(tokens, h, w)
    assert pos.shape == (1, 1 + (h // p) * (w // p), D)
    if (h, w) == (224, 224):
        assert pos is model.pos_embed  # same token count and square input: no resize
        return
    grid = model.pos_embed[0, 1:].detach().reshape(n, n, D).permute(2, 0, 1)
    expected = bicubic_resize_reference(grid, (h // p + 0.1) / n, (w // p + 0.1) / n)
    torch.testing.assert_close(pos[0, 1:].detach().double(), expected.permute(1, 2, 0).reshape(-1, D),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pos[0, 0], model.pos_embed[0, 0])


def test_dino_head_keys_and_normalised_last_layer():
    head = DINOHead(192, 1000)
    assert {k: list(v.shape) for k, v in head.state_dict().items()} == {
        "mlp.0.weight": [2048, 192], "mlp.0.bias": [2048], "mlp.2.weight": [2048, 2048], "mlp.2.bias": [2048],
        "mlp.4.weight": [256, 2048], "mlp.4.bias": [256],
        "last_layer.weight_g": [1000, 1], "last_layer.weight_v": [1000, 256]}
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer: norm fixed at 1
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(1000))
    assert DINOHead(192, 10, norm_last_layer=False).last_layer.weight_g.requires_grad
    bn_keys = [k for k in DINOHead(192, 10, use_bn=True).state_dict() if k.endswith(".weight")]
    assert bn_keys == ["mlp.0.weight", "mlp.1.weight", "mlp.3.weight", "mlp.4.weight", "mlp.6.weight"]
    # forward = weight-normed linear of the L2-normalised bottleneck, written out
    x = torch.randn(5, 192)
    z = F.normalize(head.mlp(x), dim=-1)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    torch.testing.assert_close(head(x), z @ (g * v / v.norm(dim=1, keepdim=True)).t())


def test_dino_head_loads_parametrization_keys():
    torch.manual_seed(0)
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(256, 50, bias=False))
    head = DINOHead(32, 50)
    sd = {k: v for k, v in head.state_dict().items() if not k.startswith("last_layer")}
    sd.update({"last_layer." + k: v for k, v in lin.state_dict().items()})
    assert "last_layer.parametrizations.weight.original1" in sd
    head.load_state_dict(sd, strict=True)
    z = torch.randn(4, 256)
    torch.testing.assert_close(head.last_layer(z), lin(z))


def test_torchvision_convnet_without_classifier():
    model = build_model("resnet18")
    assert model.embed_dim == 512 and isinstance(model.fc, nn.Identity)
    assert not any(k.startswith("fc.") for k in model.state_dict())
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    mobile = build_model("mobilenet_v3_small")
    assert mobile(torch.randn(2, 3, 64, 64)).shape == (2, mobile.embed_dim)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(UnknownArchError, match=r"unknown --arch 'vit_huge'.*vit_small.*resnet50"):
        build_model("vit_huge")


def test_xcit_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached hub repository
    with pytest.raises(UnknownArchError, match="--arch xcit_small_12_p16: could not load it from the "
                                               "facebookresearch/xcit"):
        build_model("xcit_small_12_p16")
