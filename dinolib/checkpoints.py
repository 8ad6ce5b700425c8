"""Weights and checkpoints: the published URLs, a torch.load that runs no code, strict loading with one-line errors,
atomic saves, resuming, and optimizer state matched to parameters by name."""
import argparse
import os

import numpy as np
import torch
import torch.nn as nn

from dinolib.errors import InputError
from dinolib.optim import is_regularized
from dinolib.process_group import is_main_process, print_main
from vision_transformer import DINOV2_ARCHS, DINOV2_NUM_REGISTERS, DINOV2_PATCH_SIZE, REGION_ARCHS, VIT_ARCHS


PUBLISHED_URL = "https://dl.fbaipublicfiles.com/dino/"
PUBLISHED_BACKBONES = {
    ("vit_small", 16): "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    ("vit_small", 8): "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    ("vit_base", 16): "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    ("vit_base", 8): "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    ("resnet50", None): "dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
    ("xcit_small_12_p16", None): "dino_xcit_small_12_p16_pretrain/dino_xcit_small_12_p16_pretrain.pth",
    ("xcit_small_12_p8", None): "dino_xcit_small_12_p8_pretrain/dino_xcit_small_12_p8_pretrain.pth",
    ("xcit_medium_24_p16", None): "dino_xcit_medium_24_p16_pretrain/dino_xcit_medium_24_p16_pretrain.pth",
    ("xcit_medium_24_p8", None): "dino_xcit_medium_24_p8_pretrain/dino_xcit_medium_24_p8_pretrain.pth",
}


# DINOv2's published backbones: <base>/<model>/<model>[_reg4]_pretrain.pth, the register model beside its model
DINOV2_PUBLISHED_URL = "https://dl.fbaipublicfiles.com/dinov2/"


# HIPT's published checkpoints (Chen et al., CVPR 2022), kept in its repository with Git LFS; full DINO checkpoints
# whose weights are under the key "teacher". The tile encoder is a vit_small/16; the region model's tiles are its [CLS].
HIPT_PUBLISHED_URL = "https://github.com/mahmoodlab/HIPT/raw/master/HIPT_4K/Checkpoints/"
HIPT_TILE_WEIGHTS_URL = HIPT_PUBLISHED_URL + "vit256_small_dino.pth"
HIPT_REGION_WEIGHTS = {"vit4k_xs": "vit4k_xs_dino.pth"}


def published_weights_url(arch: str, patch_size: int) -> str:
    """URL of the published DINO backbone for arch and patch size, of DINOv2's for a dinov2 arch, of HIPT's for a
    region arch; InputError when there is none."""
    if arch in REGION_ARCHS:
        return HIPT_PUBLISHED_URL + HIPT_REGION_WEIGHTS[arch]
    if arch in DINOV2_ARCHS:
        model = arch.removesuffix("_reg")
        registers = f"_reg{DINOV2_NUM_REGISTERS}" if arch.endswith("_reg") else ""
        return f"{DINOV2_PUBLISHED_URL}{model}/{model}{registers}_pretrain.pth"
    arch = {"deit_small": "vit_small"}.get(arch, arch)
    path = PUBLISHED_BACKBONES.get((arch, patch_size)) or PUBLISHED_BACKBONES.get((arch, None))
    if path is None:
        raise InputError(f"no published DINO weights for --arch {arch} --patch_size {patch_size}; "
                         f"give --pretrained_weights")
    return PUBLISHED_URL + path


# The paper's attention figures and videos come from a ViT-S/8 trained 300 epochs, not the 800-epoch one above.
ATTENTION_FIGURE_BACKBONES = {
    ("vit_small", 8): "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
}


def attention_weights_url(arch: str, patch_size: int) -> str:
    """URL of the published weights the attention figures use by default: ViT-S/8 300 epochs, else the backbone's."""
    arch = {"deit_small": "vit_small"}.get(arch, arch)
    path = ATTENTION_FIGURE_BACKBONES.get((arch, patch_size))
    return PUBLISHED_URL + path if path else published_weights_url(arch, patch_size)


# What the original's full checkpoints pickle besides tensors: args as an argparse.Namespace, and numpy scalars
# (the learning rate in the optimizer state). Data only: allowing them lets no code run at load time. A pickle names
# the scalar's module as the NumPy that wrote it spelt it: numpy.core (NumPy 1, the original's) or numpy._core (2).
_numpy_scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace, np.dtype, (_numpy_scalar, "numpy.core.multiarray.scalar"),
                           (_numpy_scalar, "numpy._core.multiarray.scalar")] + \
    [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]


def torch_load(path: str, map_location="cpu"):
    """torch.load that never runs code from the file: weights_only, allowing what the original's checkpoints hold."""
    with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def download_weights(url: str, flag: str = "--pretrained_weights") -> dict:
    """torch.hub download (cached under TORCH_HOME) with a one-line error when offline, naming the flag to use."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except OSError as e:  # URLError, socket errors, HTTP errors are all OSErrors
        raise InputError(f"could not download {url} ({e}); download it by hand and give its path "
                           f"with {flag}") from None


def extract_backbone_state_dict(state_dict: dict, checkpoint_key: str = "teacher", source: str = "") -> dict:
    """The backbone's weights from a full checkpoint or a bare state dict.

    As the original: take state_dict[checkpoint_key] when present, strip a leading
    `module.`, then a leading `backbone.`; projection-head weights are dropped. The blocks of
    DINOv2's training checkpoints, chunked for FSDP as `blocks.{chunk}.{i}.*`, become `blocks.{i}.*`.
    """
    if checkpoint_key in state_dict:
        state_dict = state_dict[checkpoint_key]
    elif any(k in state_dict for k in ("teacher", "student")):
        raise InputError(f"{source}: no key {checkpoint_key!r} in the checkpoint; it has: {', '.join(state_dict)}")
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise InputError(f"{source}: no key {checkpoint_key!r} and not a state dict; it has: "
                       f"{', '.join(map(str, state_dict))}")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
    if "cls_token" in state_dict:  # a ViT
        state_dict = {_unchunked_block_key(k): v for k, v in state_dict.items()}
    return state_dict


def _unchunked_block_key(key: str) -> str:
    """blocks.{chunk}.{i}.rest -> blocks.{i}.rest (DINOv2 numbers the blocks of all chunks from 0 on); others as is."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].isdigit():
        return ".".join(["blocks"] + parts[2:])
    return key


def fitting_vit_archs(state_dict: dict) -> list:
    """The `--arch A --patch_size P` of each ViT (DINO's or DINOv2's) whose keys and shapes are those of state_dict."""
    proj, cls_token = state_dict.get("patch_embed.proj.weight"), state_dict.get("cls_token")
    if not torch.is_tensor(proj) or not torch.is_tensor(cls_token) or proj.ndim != 4:
        return []
    p, dim = proj.shape[-1], cls_token.shape[-1]
    dino = {}
    for arch, build in VIT_ARCHS.items():
        dino.setdefault(build, arch)  # each model once, by its first name (vit_*, not the deit_* aliases)
    candidates = [(arch, p, build) for build, arch in dino.items()]
    candidates += [(arch, DINOV2_PATCH_SIZE, build) for arch, build in DINOV2_ARCHS.items()
                   if build.keywords["embed_dim"] == dim]
    fits = []
    for arch, patch_size, build in candidates:
        with torch.device("meta"):  # the layout only: no memory, no initialisation
            own = build(patch_size=p).state_dict() if arch in VIT_ARCHS else build().state_dict()
        if own.keys() == state_dict.keys() and all(own[k].shape == state_dict[k].shape for k in own):
            fits.append(f"--arch {arch} --patch_size {patch_size}")
    return fits


# torch.nn.utils.parametrizations.weight_norm's keys for what torch.nn.utils.weight_norm calls weight_g and weight_v
WEIGHT_NORM_PARAMETRIZATION_KEYS = {"parametrizations.weight.original0": "weight_g",
                                    "parametrizations.weight.original1": "weight_v"}


def legacy_key(key: str) -> str:
    """A state-dict key written with weight_norm's parametrization, in the weight_g/weight_v spelling we use."""
    for new, old in WEIGHT_NORM_PARAMETRIZATION_KEYS.items():
        if key.endswith(new):
            return key[:-len(new)] + old
    return key


def load_state_dict_strict(model: nn.Module, state_dict: dict, source: str) -> None:
    """load_state_dict(strict=True) whose failure is one line naming the keys and shapes that disagree."""
    state_dict = {legacy_key(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {list(state_dict[k].shape)} in file vs {list(own[k].shape)} in model"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shapes differ: " + "; ".join(shapes[:4]) + (" ..." if len(shapes) > 4 else ""))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise InputError(f"{source} does not fit this model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_pretrained_weights(model: nn.Module, pretrained_weights: str, checkpoint_key: str, arch: str,
                            patch_size: int, url: str = "", fit_options: bool = False) -> None:
    """Load backbone weights strictly from a local file or, when pretrained_weights is empty, the published ones.

    `url` replaces the published weights of arch and patch size (the attention figures' 300-epoch ViT-S/8).
    fit_options (evaluation): a DINO ViT first gains the LayerScale and mask token that the weights have (a run
    trained with --layerscale or iBOT), read from their keys; training loads into the layout its flags built.
    """
    if pretrained_weights:
        if not os.path.isfile(pretrained_weights):
            raise InputError(f"--pretrained_weights {pretrained_weights}: no such file")
        state_dict = torch_load(pretrained_weights)
        source = pretrained_weights
    else:
        url = url or published_weights_url(arch, patch_size)
        family = "DINOv2" if url.startswith(DINOV2_PUBLISHED_URL) else \
            "HIPT" if url.startswith(HIPT_PUBLISHED_URL) else "DINO"
        print_main(f"No --pretrained_weights given: using the published {family} weights {url}")
        state_dict = download_weights(url)
        source = url
    state_dict = extract_backbone_state_dict(state_dict, checkpoint_key, source)
    if fit_options and hasattr(model, "fit_optional_parts"):
        model.fit_optional_parts(state_dict.keys())
    try:
        load_state_dict_strict(model, state_dict, f"{source} (key {checkpoint_key!r})")
    except InputError as e:  # DINOv2 weights for a DINO ViT, or the reverse: say which --arch they are for
        fits = fitting_vit_archs(state_dict)
        if not fits:
            raise
        raise InputError(f"{e}; the file holds the backbone of {' or '.join(fits)}") from None
    print_main(f"Pretrained weights loaded from {source} (key {checkpoint_key!r})")


def save_on_master(obj, path: str) -> None:
    """Atomic torch.save on rank 0: write a temp file, fsync, then rename over path."""
    if not is_main_process():
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def restart_from_checkpoint(ckp_path: str, run_variables: dict = None, optional: tuple = (), check=None,
                            **kwargs) -> dict:
    """Load each kwarg's state from the checkpoint at ckp_path, fill run_variables (e.g. epoch); return the checkpoint.

    Modules load strictly (one line naming the shapes that disagree); an optimizer loads through
    load_optimizer_state, by parameter name when `params_of` is (the checkpoint key of the optimizer's model,
    that model). A key of `optional` that the checkpoint lacks is skipped (the original skipped every absent key).
    check(checkpoint), when given, runs before anything is loaded (an InputError refuses the checkpoint).
    Returns {} when there is no checkpoint.
    """
    if not os.path.isfile(ckp_path):
        return {}
    print_main(f"Found checkpoint at {ckp_path}")
    checkpoint = torch_load(ckp_path)
    if not isinstance(checkpoint, dict):
        raise InputError(f"{ckp_path}: not a checkpoint (a {type(checkpoint).__name__}, not a dict)")
    if check is not None:
        check(checkpoint)
    params_of = kwargs.pop("params_of", None)
    for key, value in kwargs.items():
        if value is None:
            continue
        if key not in checkpoint:
            if key in optional:  # the caller says what that means
                continue
            raise InputError(f"{ckp_path}: no key {key!r}; it has: {', '.join(checkpoint)}")
        if isinstance(value, nn.Module):
            load_state_dict_strict(value, checkpoint[key], f"{ckp_path} (key {key!r})")
        elif isinstance(value, torch.optim.Optimizer):
            saved_names = None
            if params_of is not None and params_of[0] in checkpoint:
                saved_names = [legacy_key(k) for k in checkpoint[params_of[0]]]
            load_optimizer_state(value, checkpoint[key], f"{ckp_path} (key {key!r})",
                                 params_of[1] if params_of else None, saved_names)
        else:
            value.load_state_dict(checkpoint[key])
        print_main(f"=> loaded '{key}' from checkpoint '{ckp_path}'")
    for var_name in run_variables or {}:
        if var_name in checkpoint:
            run_variables[var_name] = checkpoint[var_name]
    return checkpoint


# How the optimizer's implementation runs, not what it computes: ours is kept when a checkpoint written on another
# device or torch version is loaded (its saved groups would replace them otherwise)
OPTIMIZER_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable")
# What this run's flags make of each group (--layerwise_decay, --patch_embed_lr_mult): the flags of the run rule
OPTIMIZER_GROUP_SETTING_KEYS = ("lr_multiplier", "wd_multiplier", "is_last_layer")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, source: str, model: nn.Module = None,
                         saved_names: list = None) -> None:
    """optimizer.load_state_dict that puts every saved moment on the parameter it belongs to, or says why not.

    torch stores optimizer state by position in the parameter groups. The checkpoint's model state dict lists
    the saver's parameters in its own order (saved_names, its keys); with the model whose parameters the
    optimizer holds, each saved position is mapped to a parameter name, so a checkpoint written with another
    parameter order (the original's weight_g before weight_v, or our releases before it) loads right. The
    groups are get_params_groups': regularized weights, then biases and 1-D parameters; parameters the saver
    froze are found by matching the saved group sizes. Every moment must have its parameter's shape.
    """
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise InputError(f"{source}: not an optimizer state (no 'state' and 'param_groups')")
    own = optimizer.state_dict()
    own_groups, saved_groups = own["param_groups"], state["param_groups"]
    if len(own_groups) != len(saved_groups):
        raise InputError(f"{source}: {len(saved_groups)} parameter groups in the file, {len(own_groups)} here "
                         f"(another --optimizer or another version's parameter groups)")
    params = [p for g in optimizer.param_groups for p in g["params"]]  # index i of the state dict is params[i]
    names, frozen = _saved_positions(model, params, saved_names, [len(g["params"]) for g in saved_groups])
    if frozen is not None and frozen != {n for n, p in model.named_parameters() if not p.requires_grad}:
        print_main(f"{source}: the checkpoint was trained with {', '.join(sorted(frozen)) or 'nothing'} frozen; "
                   f"what is trained here and was not there starts with zero moments")
    if names is None:  # no names to go by: position i is parameter i, as torch assumes
        names = list(range(len(params)))
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in own_groups]:
            raise InputError(f"{source}: the parameter groups hold {[len(g['params']) for g in saved_groups]} "
                             f"parameters in the file, {[len(g['params']) for g in own_groups]} here")
        names_here = list(range(len(params)))
    else:
        names_here = _param_names(model, params)
    own_index = {name: i for i, name in enumerate(names_here)}
    remapped, dropped = {}, []
    for position, moments in state["state"].items():
        name = names[int(position)] if int(position) < len(names) else None
        if name not in own_index:
            dropped.append(str(name))
            continue
        p = params[own_index[name]]
        for k, v in moments.items():
            if torch.is_tensor(v) and v.ndim > 0 and v.shape != p.shape:
                raise InputError(f"{source}: the optimizer's {k!r} of {name} is {list(v.shape)} in the file, the "
                                 f"parameter is {list(p.shape)} here")
        remapped[own_index[name]] = moments
    if dropped:
        print_main(f"{source}: optimizer state of {len(dropped)} parameters not trained here dropped "
                   f"({', '.join(dropped[:3])})")
    own_keys = OPTIMIZER_IMPLEMENTATION_KEYS + OPTIMIZER_GROUP_SETTING_KEYS
    groups = [{**saved, **{k: own_g[k] for k in own_keys if k in own_g}, "params": own_g["params"]}
              for saved, own_g in zip(saved_groups, own_groups)]
    optimizer.load_state_dict({"state": remapped, "param_groups": groups})


def _param_names(model: nn.Module, params: list) -> list:
    """The names in `model` of the parameters `params`."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def _saved_positions(model, params: list, saved_names, saved_group_sizes: list) -> tuple:
    """(the saver's parameter name at each position of its optimizer state, the names it froze), or (None, None)
    without names to go by.

    The saver's named_parameters order is its state dict's key order (both visit each module's own
    parameters, then its children); its groups are get_params_groups' two, without the parameters it froze.
    """
    if model is None or not saved_names:
        return None, None
    own = dict(model.named_parameters())
    ordered = [n for n in saved_names if n in own]
    if len(ordered) != len(own):
        return None, None  # another model: its state dict already failed to load, or names cannot be trusted
    frozen_here = {n for n, p in own.items() if not p.requires_grad}
    # the saver may have trained what we freeze, or frozen what we train (--norm_last_layer changed on resume)
    for frozen in (frozen_here, set(), {n for n in own if n.endswith("last_layer.weight_g")}):
        trained = [n for n in ordered if n not in frozen]
        regularized = [n for n in trained if is_regularized(n, own[n])]  # get_params_groups' two groups
        not_regularized = [n for n in trained if not is_regularized(n, own[n])]
        if [len(regularized), len(not_regularized)] == list(saved_group_sizes):
            return regularized + not_regularized, frozen
    return None, None


def published_linear_weights_url(arch: str, patch_size: int) -> str:
    """URL of the published linear classifier of the published backbone: <folder>/<name>_linearweights.pth."""
    if arch in DINOV2_ARCHS:  # DINOv2's linear heads read other features, in another layout
        raise InputError(f"--arch {arch}: no published linear classifier in this layout for DINOv2 backbones; "
                         f"give --linear_weights")
    if arch in REGION_ARCHS:
        raise InputError(f"--arch {arch}: HIPT published no linear classifier; give --linear_weights")
    return published_weights_url(arch, patch_size).replace("_pretrain.pth", "_linearweights.pth")
