"""torch.hub entry points: the published DINO backbones, DINOv2's and HIPT's, in one line.

    import torch
    model = torch.hub.load("facebookresearch/dino:main", "dino_vits16")   # or a local checkout:
    model = torch.hub.load("/path/to/this/repo", "dino_vits16", source="local")
    model = torch.hub.load("/path/to/this/repo", "dino_vitb8", source="local", pretrained=False)
    model = torch.hub.load("/path/to/this/repo", "dinov2_vits14_reg", source="local")   # DINOv2's names
    model = torch.hub.load("/path/to/this/repo", "hipt_vit4k_xs", source="local")   # HIPT's region model

Each entry point is `name(pretrained=True, **kwargs)`; kwargs go to the model's constructor.
Importing this file touches no network: only pretrained=True downloads, once, into
torch.hub.get_dir()/checkpoints (under $TORCH_HOME), and weights always load strictly.
The XCiT models are built by the facebookresearch/xcit hub repository, fetched on first use.
"""
import importlib
import importlib.util
import os
import sys

import torch
import torchvision

dependencies = ["torch", "torchvision"]


def _own_module(name: str):
    """This checkout's `name`.py. torch.hub imports hubconf with the checkout first on sys.path, but a module of the
    same name that the caller imported before (their own utils.py, say) would win a plain import: load ours by path."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    module = sys.modules.get(name)
    if module is not None and os.path.realpath(getattr(module, "__file__", None) or "") == os.path.realpath(path):
        return module
    spec = importlib.util.spec_from_file_location(f"dino_hub_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a registered name keeps the module's classes picklable
    spec.loader.exec_module(module)
    return module


def _own_checkpoints(vision_transformer):
    """This checkout's dinolib.checkpoints, built on this checkout's vision_transformer even when the caller imported
    a module of that name before (a copy of the original's vision_transformer.py, say): that module is set aside
    while dinolib imports, then put back."""
    repo = os.path.dirname(os.path.abspath(__file__))
    callers = sys.modules.get("vision_transformer")
    sys.modules["vision_transformer"] = vision_transformer
    sys.path.insert(0, repo)
    try:
        return importlib.import_module("dinolib.checkpoints")
    finally:
        sys.path.remove(repo)
        if callers is None:
            del sys.modules["vision_transformer"]
        else:
            sys.modules["vision_transformer"] = callers


vision_transformer = _own_module("vision_transformer")
checkpoints = _own_checkpoints(vision_transformer)


def _load_published(model: torch.nn.Module, url: str, entrypoint: str, checkpoint_key: str = None) -> torch.nn.Module:
    """Download (or take from the hub cache) the published state dict at url and load it strictly; with
    checkpoint_key, the file is a full training checkpoint (HIPT's) and its backbone is loaded."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    try:
        with torch.serialization.safe_globals(checkpoints.CHECKPOINT_SAFE_GLOBALS):  # a checkpoint's pickled args
            state_dict = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except OSError as e:  # URLError, HTTPError and socket errors are all OSErrors
        raise RuntimeError(f"{entrypoint}: could not download {url} ({e}); without network, place that file at "
                           f"{cached}, or call {entrypoint}(pretrained=False) and load weights yourself") from None
    if checkpoint_key is not None:
        state_dict = checkpoints.extract_backbone_state_dict(state_dict, checkpoint_key, cached)
    checkpoints.load_state_dict_strict(model, state_dict, cached)
    return model


def _vit(entrypoint: str, arch: str, patch_size: int, pretrained: bool, kwargs: dict) -> torch.nn.Module:
    model = vision_transformer.VIT_ARCHS[arch](patch_size=patch_size, **kwargs)
    if pretrained:
        _load_published(model, checkpoints.published_weights_url(arch, patch_size), entrypoint)
    return model


def _dinov2(entrypoint: str, pretrained: bool, kwargs: dict) -> torch.nn.Module:
    """DINOv2's backbone of that name (vision_transformer.DINOV2_ARCHS), with its published weights if pretrained."""
    model = vision_transformer.DINOV2_ARCHS[entrypoint](**kwargs)
    if pretrained:
        _load_published(model, checkpoints.published_weights_url(entrypoint, None), entrypoint)
    return model


def _xcit(entrypoint: str, name: str, pretrained: bool, kwargs: dict) -> torch.nn.Module:
    try:
        model = torch.hub.load("facebookresearch/xcit:main", name, num_classes=0, **kwargs)
    except (OSError, RuntimeError, ImportError) as e:  # offline, or the xcit repo's own dependency (timm) missing
        raise RuntimeError(f"{entrypoint}: the XCiT model comes from the facebookresearch/xcit hub repository, which "
                           f"could not be loaded ({e}); it needs the network once (then it is cached in "
                           f"{torch.hub.get_dir()}) and the timm package") from None
    if pretrained:
        _load_published(model, checkpoints.published_weights_url(name, None), entrypoint)
    return model


def dino_vits16(pretrained=True, **kwargs):
    """ViT-Small/16 trained with DINO on ImageNet (k-NN 74.5%, linear 77.0%); forward gives the 384-d [CLS] feature."""
    return _vit("dino_vits16", "vit_small", 16, pretrained, kwargs)


def dino_vits8(pretrained=True, **kwargs):
    """ViT-Small/8 trained with DINO on ImageNet (k-NN 78.3%, linear 79.7%); forward gives the 384-d [CLS] feature."""
    return _vit("dino_vits8", "vit_small", 8, pretrained, kwargs)


def dino_vitb16(pretrained=True, **kwargs):
    """ViT-Base/16 trained with DINO on ImageNet (k-NN 76.1%, linear 78.2%); forward gives the 768-d [CLS] feature."""
    return _vit("dino_vitb16", "vit_base", 16, pretrained, kwargs)


def dino_vitb8(pretrained=True, **kwargs):
    """ViT-Base/8 trained with DINO on ImageNet (k-NN 77.4%, linear 80.1%); forward gives the 768-d [CLS] feature."""
    return _vit("dino_vitb8", "vit_base", 8, pretrained, kwargs)


def dino_resnet50(pretrained=True, **kwargs):
    """ResNet-50 trained with DINO on ImageNet (k-NN 67.5%, linear 75.3%); fc is identity: 2048-d pooled feature."""
    model = torchvision.models.resnet50(weights=None, **kwargs)
    model.fc = torch.nn.Identity()  # the published weights have no classifier
    model.embed_dim = 2048
    if pretrained:
        _load_published(model, checkpoints.published_weights_url("resnet50", None), "dino_resnet50")
    return model


def dino_xcit_small_12_p16(pretrained=True, **kwargs):
    """XCiT-Small-12/16 trained with DINO on ImageNet (model code from the facebookresearch/xcit hub)."""
    return _xcit("dino_xcit_small_12_p16", "xcit_small_12_p16", pretrained, kwargs)


def dino_xcit_small_12_p8(pretrained=True, **kwargs):
    """XCiT-Small-12/8 trained with DINO on ImageNet (model code from the facebookresearch/xcit hub)."""
    return _xcit("dino_xcit_small_12_p8", "xcit_small_12_p8", pretrained, kwargs)


def dino_xcit_medium_24_p16(pretrained=True, **kwargs):
    """XCiT-Medium-24/16 trained with DINO on ImageNet (model code from the facebookresearch/xcit hub)."""
    return _xcit("dino_xcit_medium_24_p16", "xcit_medium_24_p16", pretrained, kwargs)


def dino_xcit_medium_24_p8(pretrained=True, **kwargs):
    """XCiT-Medium-24/8 trained with DINO on ImageNet (model code from the facebookresearch/xcit hub)."""
    return _xcit("dino_xcit_medium_24_p8", "xcit_medium_24_p8", pretrained, kwargs)


def dinov2_vits14(pretrained=True, **kwargs):
    """DINOv2's ViT-S/14 (Oquab et al. 2023); forward gives the normed 384-d [CLS] feature."""
    return _dinov2("dinov2_vits14", pretrained, kwargs)


def dinov2_vitb14(pretrained=True, **kwargs):
    """DINOv2's ViT-B/14 (Oquab et al. 2023); forward gives the normed 768-d [CLS] feature."""
    return _dinov2("dinov2_vitb14", pretrained, kwargs)


def dinov2_vitl14(pretrained=True, **kwargs):
    """DINOv2's ViT-L/14 (Oquab et al. 2023); forward gives the normed 1024-d [CLS] feature."""
    return _dinov2("dinov2_vitl14", pretrained, kwargs)


def dinov2_vitg14(pretrained=True, **kwargs):
    """DINOv2's ViT-g/14 (Oquab et al. 2023), with SwiGLU; forward gives the normed 1536-d [CLS] feature."""
    return _dinov2("dinov2_vitg14", pretrained, kwargs)


def dinov2_vits14_reg(pretrained=True, **kwargs):
    """DINOv2's ViT-S/14 with 4 registers (Darcet et al. 2024); forward gives the normed 384-d [CLS] feature."""
    return _dinov2("dinov2_vits14_reg", pretrained, kwargs)


def dinov2_vitb14_reg(pretrained=True, **kwargs):
    """DINOv2's ViT-B/14 with 4 registers (Darcet et al. 2024); forward gives the normed 768-d [CLS] feature."""
    return _dinov2("dinov2_vitb14_reg", pretrained, kwargs)


def dinov2_vitl14_reg(pretrained=True, **kwargs):
    """DINOv2's ViT-L/14 with 4 registers (Darcet et al. 2024); forward gives the normed 1024-d [CLS] feature."""
    return _dinov2("dinov2_vitl14_reg", pretrained, kwargs)


def dinov2_vitg14_reg(pretrained=True, **kwargs):
    """DINOv2's ViT-g/14 with 4 registers (Darcet et al. 2024), with SwiGLU; forward gives the normed 1536-d [CLS]
    feature."""
    return _dinov2("dinov2_vitg14_reg", pretrained, kwargs)


def hipt_vit256_small(pretrained=True, **kwargs):
    """HIPT's tile encoder (Chen et al., CVPR 2022): ViT-Small/16 trained with DINO on 256-pixel tiles of TCGA slides;
    forward gives the 384-d [CLS] feature of a tile."""
    model = vision_transformer.VIT_ARCHS["vit_small"](patch_size=16, **kwargs)
    if pretrained:
        _load_published(model, checkpoints.HIPT_TILE_WEIGHTS_URL, "hipt_vit256_small", checkpoint_key="teacher")
    return model


def hipt_vit4k_xs(pretrained=True, **kwargs):
    """HIPT's region model (Chen et al., CVPR 2022): vit4k_xs trained with DINO on the 16 x 16 grids of
    hipt_vit256_small's [CLS] of 4096-pixel regions; forward takes [B, 384, H, W] grids, gives the 192-d [CLS]."""
    model = vision_transformer.REGION_ARCHS["vit4k_xs"](**kwargs)
    if pretrained:
        _load_published(model, checkpoints.published_weights_url("vit4k_xs", None), "hipt_vit4k_xs",
                        checkpoint_key="teacher")
    return model
