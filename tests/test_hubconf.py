"""hubconf.py: entry points, architectures with pretrained=False, the real download path served from the hub cache.

No network: a state dict of the published name and key layout is placed in $TORCH_HOME/hub/checkpoints,
where torch.hub.load_state_dict_from_url looks before downloading.
"""
import importlib
import os
import socket

import pytest
import torch
import torchvision

import hubconf
from conftest import REPO
from test_dinov2 import SIZES, dinov2_layout, random_weights
from vision_transformer import vit_small

# DINOv2's own entry-point names
DINOV2_ENTRYPOINTS = ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
                      "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg"]
ENTRYPOINTS = {"dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dino_resnet50", "dino_xcit_small_12_p16",
               "dino_xcit_small_12_p8", "dino_xcit_medium_24_p16", "dino_xcit_medium_24_p8", *DINOV2_ENTRYPOINTS,
               "hipt_vit256_small", "hipt_vit4k_xs"}



@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty TORCH_HOME; returns its hub/checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    return cache


def test_import_and_listing_touch_no_network(monkeypatch, hub_cache):
    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: attempts.append(host))
    importlib.reload(hubconf)
    # what torch.hub lists: the public callables of hubconf (torch.hub.list itself reads GitHub repositories only)
    assert {f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")} == ENTRYPOINTS
    assert hubconf.dependencies == ["torch", "torchvision"]
    assert "ViT-Small/16" in hubconf.dino_vits16.__doc__
    assert attempts == [] and os.listdir(hub_cache) == []


def vit_expected_shapes(D: int, p: int) -> dict:
    """The published ViT layout (12 blocks, MLP ratio 4, qkv with bias), written out from the reference."""
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + (224 // p) ** 2, D), "patch_embed.proj.weight": (D, 3, p, p),
              "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,)}
    for i in range(12):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "norm2.weight": (D,), b + "norm2.bias": (D,), b + "mlp.fc1.weight": (4 * D, D),
                       b + "mlp.fc1.bias": (4 * D,), b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
    return shapes


@pytest.mark.parametrize("name, D, heads, p", [("dino_vits16", 384, 6, 16), ("dino_vits8", 384, 6, 8),
                                               ("dino_vitb16", 768, 12, 16), ("dino_vitb8", 768, 12, 8)])
def test_vit_architectures_without_weights(name, D, heads, p, hub_cache):
    model = getattr(hubconf, name)(pretrained=False, drop_path_rate=0.1)  # kwargs reach the constructor
    assert model.blocks[11].drop_path.drop_prob == pytest.approx(0.1)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == vit_expected_shapes(D, p)
    assert model.blocks[0].attn.num_heads == heads and model.embed_dim == D
    assert os.listdir(hub_cache) == []  # nothing downloaded
    if name == "dino_vits16":
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, 64, 96)).shape == (1, D)  # any size that is a multiple of p


def test_resnet50_architecture_without_weights(hub_cache):
    model = hubconf.dino_resnet50(pretrained=False)
    keys = model.state_dict().keys()
    assert not any(k.startswith("fc.") for k in keys)
    assert set(keys) == {k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")}
    # torchvision's ResNet-50 has 25,557,032 parameters, of which the 1000-class fc holds 2048 * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 - 2_049_000
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_pretrained_vits16_loads_the_cached_published_file(hub_cache):
    torch.manual_seed(0)
    published = vit_small(patch_size=16).state_dict()  # flat, no prefix: the published layout
    torch.save(published, hub_cache / "dino_deitsmall16_pretrain.pth")

    model = hubconf.dino_vits16()
    for k, v in model.state_dict().items():
        assert torch.equal(v, published[k]), k
    model = torch.hub.load(REPO, "dino_vits16", source="local")
    assert all(torch.equal(v, published[k]) for k, v in model.state_dict().items())
    assert os.listdir(hub_cache) == ["dino_deitsmall16_pretrain.pth"]


def test_pretrained_resnet50_loads_strictly_without_fc(hub_cache):
    torch.manual_seed(0)
    published = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    torch.save(published, hub_cache / "dino_resnet50_pretrain.pth")
    model = hubconf.dino_resnet50()
    assert all(torch.equal(v, published[k]) for k, v in model.state_dict().items())


def test_cached_file_of_another_model_is_a_clear_error(hub_cache):
    torch.save(vit_small(patch_size=8).state_dict(), hub_cache / "dino_deitsmall16_pretrain.pth")
    with pytest.raises(Exception, match=r"dino_deitsmall16_pretrain\.pth does not fit this model: shapes differ: "
                                        r"pos_embed \[1, 785, 384\] in file vs \[1, 197, 384\] in model"):
        hubconf.dino_vits16()


def test_offline_download_is_a_clear_error(hub_cache):
    url = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
    with pytest.raises(RuntimeError, match=f"dino_vits8: could not download {url} .*place that file at "
                                           f"{hub_cache}/dino_deitsmall8_pretrain.pth") as e:
        hubconf.dino_vits8()
    assert "\n" not in str(e.value)
    assert os.listdir(hub_cache) == []  # no partial file left behind


def test_dinov2_entrypoints_load_the_cached_published_files(hub_cache):
    """Random weights in DINOv2's layout, placed in the hub cache under the published file names."""
    files = {"dinov2_vits14": "dinov2_vits14_pretrain.pth", "dinov2_vits14_reg": "dinov2_vits14_reg4_pretrain.pth"}
    for seed, (name, file) in enumerate(files.items()):
        published = random_weights(name, seed)
        torch.save(published, hub_cache / file)
        for model in (getattr(hubconf, name)(), torch.hub.load(REPO, name, source="local")):
            assert model.state_dict().keys() == published.keys()
            assert all(torch.equal(v, published[k]) for k, v in model.state_dict().items()), name
            with torch.no_grad():
                assert model.eval()(torch.randn(1, 3, 28, 42)).shape == (1, 384)
    assert sorted(os.listdir(hub_cache)) == sorted(files.values())  # nothing else downloaded


@pytest.mark.parametrize("name", DINOV2_ENTRYPOINTS)
def test_dinov2_entrypoints_fetch_the_published_url(name, monkeypatch):
    """Every entry point asks torch.hub for DINOv2's file (the _reg4 file in its model's folder) and loads a state
    dict of DINOv2's layout strictly; on the meta device, as ViT-g is 1.1 billion parameters."""
    urls = []

    def published(url, **kwargs):
        urls.append(url)
        return {k: torch.empty(shape, device="meta") for k, shape in dinov2_layout(name).items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", published)
    with torch.device("meta"):
        model = getattr(hubconf, name)(drop_path_rate=0.2)  # kwargs reach the constructor
    folder = name.removesuffix("_reg")
    assert urls == [f"https://dl.fbaipublicfiles.com/dinov2/{folder}/{folder}{'_reg4' * name.endswith('_reg')}"
                    f"_pretrain.pth"]
    assert model.embed_dim == SIZES[folder.split("_")[1]][0]
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    size = {"s": "S", "b": "B", "l": "L", "g": "g"}[folder[-3]]
    assert getattr(hubconf, name).__doc__.startswith(f"DINOv2's ViT-{size}/14")


def test_xcit_entrypoints_need_the_xcit_hub_and_say_so_offline(hub_cache):
    with pytest.raises(RuntimeError, match="dino_xcit_small_12_p16: the XCiT model comes from the "
                                           "facebookresearch/xcit hub repository, which could not be loaded"):
        hubconf.dino_xcit_small_12_p16()


def hub_load_beside_a_callers_module(tmp_path, hub_cache, name: str) -> None:
    """In a fresh process that imported its own module called `name` first, torch.hub.load dino_vits16 from this
    checkout: the caller's module stays under its name, and the model holds the cached weights and runs."""
    import subprocess
    import sys
    own = tmp_path / "caller"
    own.mkdir()
    (own / f"{name}.py").write_text("MARK = 'caller'\n")
    vits16 = vit_small(patch_size=16)
    torch.save(vits16.state_dict(), hub_cache / "dino_deitsmall16_pretrain.pth")
    code = (f"import sys, torch, {name}\n"
            f"assert {name}.MARK == 'caller'\n"
            f"m = torch.hub.load({str(REPO)!r}, 'dino_vits16', source='local')\n"
            f"assert sys.modules[{name!r}].MARK == 'caller'\n"
            f"saved = torch.load({str(hub_cache / 'dino_deitsmall16_pretrain.pth')!r}, weights_only=True)\n"
            "assert all(torch.equal(m.state_dict()[k], v) for k, v in saved.items())\n"
            "print(m(torch.zeros(1, 3, 224, 224)).shape)\n")
    env = {**os.environ, "PYTHONPATH": str(own)}
    result = subprocess.run([sys.executable, "-c", code], cwd=own, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 384])" in result.stdout


@pytest.mark.slow
def test_hub_load_ignores_a_callers_own_utils_module(tmp_path, hub_cache):
    """torch.hub.load from a checkout, in a process that already imported some other module called `utils`."""
    hub_load_beside_a_callers_module(tmp_path, hub_cache, "utils")


@pytest.mark.slow
def test_hub_load_ignores_a_callers_own_vision_transformer_module(tmp_path, hub_cache):
    """A caller that imported its own vision_transformer.py (a copy of the original's, say) still gets ours."""
    hub_load_beside_a_callers_module(tmp_path, hub_cache, "vision_transformer")
