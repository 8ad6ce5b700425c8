"""Optimisation: parameter groups, per-parameter gradient clipping, the frozen last layer, LARS, the optimizer."""
import torch
import torch.nn as nn

from dinolib.errors import InputError


def is_regularized(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: not to biases nor to any 1-D parameter (norms)."""
    return not (name.endswith(".bias") or param.ndim == 1)


def get_params_groups(model: nn.Module) -> list:
    """Two groups: weights with weight decay; biases and all 1-D parameters (norms) without."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (regularized if is_regularized(name, param) else not_regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def get_vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12,
                          force_is_backbone: bool = False) -> float:
    """DINOv2's layer-wise learning-rate multiplier of a parameter: lr_decay_rate ** (num_layers + 1 - layer_id).

    layer_id is 0 for the embeddings (pos_embed, patch_embed, mask_token, cls_token), i + 1 for block i, and
    num_layers + 1 for everything after the blocks (the final norm, the registers, a head), which keep the full rate.
    Names are relative to the sub-model (`blocks.3.attn.qkv.weight`) or carry its `backbone.` prefix.
    """
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if any(part in name for part in ("pos_embed", "patch_embed", "mask_token", "cls_token")):
            layer_id = 0
        elif ".blocks." in name:
            layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
        elif "blocks." in name:
            layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def get_params_groups_with_decay(model: nn.Module, lr_decay_rate: float = 1.0,
                                 patch_embed_lr_mult: float = 1.0) -> list:
    """One dict per trained parameter of model: params, name, lr_multiplier, wd_multiplier, is_last_layer.

    lr_multiplier follows DINOv2: the layer-wise decay of get_vit_lr_decay_rate (for a model with ViT blocks, or a
    wrapper whose `backbone` has them; 1 everywhere else, such as a head), times patch_embed_lr_mult for the patch
    embedding. wd_multiplier follows the original DINO: 0 for biases and 1-D parameters, 1 otherwise (DINOv2's rule,
    by name, would decay the weights of the batch norms a head may have).
    """
    if hasattr(model, "blocks"):
        n_blocks = len(model.blocks)
    elif hasattr(getattr(model, "backbone", None), "blocks"):
        n_blocks = len(model.backbone.blocks)
    else:
        n_blocks = 0
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_multiplier = get_vit_lr_decay_rate(name, lr_decay_rate, num_layers=n_blocks,
                                              force_is_backbone=n_blocks > 0)
        if "patch_embed" in name:
            lr_multiplier *= patch_embed_lr_mult
        groups.append({"params": param, "name": name, "lr_multiplier": lr_multiplier,
                       "wd_multiplier": 1.0 if is_regularized(name, param) else 0.0,
                       "is_last_layer": "last_layer" in name})
    return groups


def fuse_params_groups(all_params_groups: list,
                       keys: tuple = ("lr_multiplier", "wd_multiplier", "is_last_layer")) -> list:
    """Optimizer groups of the per-parameter dicts: one group per distinct value of keys, in order of appearance."""
    fused = {}
    for d in all_params_groups:
        group = fused.setdefault(tuple(d[k] for k in keys), {**{k: d[k] for k in keys}, "params": []})
        group["params"].append(d["params"])
    return list(fused.values())


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Clip each parameter's gradient to norm `clip` on its own (not the global norm); return the norms.

    Per-parameter clipping as the original; foreach kernels and no host sync.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the head's last-layer gradients during the first freeze_last_layer epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


class LARS(torch.optim.Optimizer):
    """LARS (You et al.): SGD with momentum and a layer-wise trust ratio; 1-D parameters get neither decay nor ratio."""

    def __init__(self, params, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def build_optimizer(name: str, params_groups: list, fused: bool = False) -> torch.optim.Optimizer:
    """adamw, sgd (momentum 0.9) or lars; lr and weight decay are set every iteration by the schedules.

    fused: AdamW's single-kernel implementation (same update; CUDA and CPU), which on CUDA also takes GradScaler's
    inf check on the device instead of a host sync every step.
    """
    if name == "adamw":
        return torch.optim.AdamW(params_groups, fused=True) if fused else torch.optim.AdamW(params_groups, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9, foreach=True)
    if name == "lars":
        return LARS(params_groups)
    raise InputError(f"unknown --optimizer {name!r}; valid: adamw, sgd, lars")
