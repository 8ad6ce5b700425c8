"""Everything the DINO scripts share, in fixed sections:

errors, distributed, command-line flags, checkpoints and weights, data, tar datasets, evaluation,
schedules, augmentation, attention maps, loss and teacher, optimisation, logging.

Nothing runs at import: no network, no subprocess, no process group.
"""
import argparse
import dataclasses
import datetime
import io
import json
import math
import os
import pickle
import posixpath
import random
import subprocess
import sys
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

# ============ errors ============


class InputError(Exception):
    """A bad input (flag, path, file): reported by run_main as one line without a traceback."""


class RankInputError(InputError):
    """A bad input of this process only (e.g. its GPU): every process that has it reports it."""


def launch_rank() -> int:
    """This process's rank as its launcher tells it (torchrun, Slurm), known before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def run_main(main, args) -> None:
    """Call main(args); a bad input ends the process with one line on stderr and exit code 2.

    Every process of a job parses the same flags and reads the same files, so their errors are the same:
    rank 0 prints it, once for the job. A RankInputError is printed by the process it concerns.
    """
    from vision_transformer import UnknownArchError
    try:
        main(args)
    except (InputError, UnknownArchError) as e:
        if isinstance(e, RankInputError):
            print(f"error: rank {launch_rank()}: {e}", file=sys.stderr, flush=True)
        elif launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ============ distributed ============


def is_dist_avail_and_initialized() -> bool:
    """True inside a torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0."""
    return get_rank() == 0


def print_main(*args, **kwargs):
    """print() on rank 0 only, flushed so logs interleave sensibly."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def _slurm_master_addr() -> str:
    """First host of the Slurm job's node list."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # simple lists ("node1,node2" or one name) need no scontrol
        return nodelist.split(",")[0].split("[")[0]


def slurm_port(job_id: str, restart_count: str = "0") -> int:
    """A port every task of one Slurm job agrees on without talking; it differs between jobs (ids 40,000 apart
    are never on a node together) and between a requeued job and its earlier run, which may still hold its port."""
    return 15000 + (int(job_id) + 7919 * int(restart_count)) % 40000


@dataclasses.dataclass(frozen=True)
class Distributed:
    """What the distributed setup found for this process: its rank, the number of processes, its local rank (its
    GPU on the node) and the device it computes on. The flags stay as they were parsed."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def init_distributed_mode(args) -> Distributed:
    """Find this process's rank, world size and device, join a process group if there are peers, and return them.

    Detects, in order: a launcher's environment (torchrun, torch.distributed.launch:
    RANK/WORLD_SIZE/LOCAL_RANK), a Slurm step (srun, submitit: SLURM_PROCID,
    SLURM_STEP_NUM_TASKS, SLURM_LOCALID), else a single process with no group.
    Backend NCCL on GPUs, gloo on CPU; reads --local_rank and --dist_url.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", args.local_rank))
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"),
                                                     env.get("SLURM_RESTART_COUNT", "0"))))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world_size), str(local_rank)
    else:
        rank, world_size, local_rank = 0, 1, 0

    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RankInputError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=world_size, rank=rank,
                                device_id=device if backend == "nccl" else None)
        barrier()
    print_main(f"| distributed: world size {world_size}, rank {rank}, device {device}")
    return Distributed(rank, world_size, local_rank, device)


# Every collective goes through the helpers below. A process group serves tensors of some device types only: gloo
# CPU (and CUDA) tensors, NCCL CUDA tensors alone ("No backend type associated with device type cpu"). The helpers
# reduce a tensor where it lives when the group serves its device, else on a copy on the group's device.


def _group_device(device: torch.device) -> torch.device:
    """Where a collective on a tensor of `device` runs: that device if the process group serves its type, else the
    first device type the group serves (CUDA: this process's GPU)."""
    served = [pair.split(":")[0] for pair in dist.get_backend_config().split(",")]  # e.g. "cuda:nccl"
    if device.type in served:
        return device
    if served[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(served[0])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes in place and return it; a no-op in one process."""
    if not is_dist_avail_and_initialized():
        return t
    buf = t.to(_group_device(t.device))
    dist.all_reduce(buf)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the same-shaped tensors of all processes, in rank order; t itself in one process."""
    if not is_dist_avail_and_initialized():
        return t
    buf = t.contiguous().to(_group_device(t.device))
    out = [torch.empty_like(buf) for _ in range(get_world_size())]
    dist.all_gather(out, buf)
    return torch.cat(out).to(t.device)


def barrier() -> None:
    """Wait for every process (nothing to wait for in one process)."""
    if is_dist_avail_and_initialized():
        dist.barrier()


def fix_random_seeds(seed: int = 31) -> None:
    """Seed torch, numpy and random; each rank adds its rank so crops differ between processes."""
    seed = seed + get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class LocalWrapper(nn.Module):
    """Stands in for DistributedDataParallel in one process, so `.module` and the `module.` keys are the same."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def wrap_ddp(model: nn.Module, dist_env: Distributed) -> nn.Module:
    """DistributedDataParallel with peers, LocalWrapper alone: either way the state dict keys start with `module.`."""
    if dist_env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        cuda = dist_env.device.type == "cuda"
        return DistributedDataParallel(model, device_ids=[dist_env.local_rank] if cuda else None)
    return LocalWrapper(model)


def shutdown_distributed() -> None:
    """Wait for every process, then leave the process group, so no rank exits while a peer still talks to it."""
    if is_dist_avail_and_initialized():
        barrier()
        dist.destroy_process_group()


# ============ command-line flags ============


def bool_flag(s: str) -> bool:
    """argparse type for on/off, true/false, 1/0."""
    if s.lower() in {"off", "false", "0"}:
        return False
    if s.lower() in {"on", "true", "1"}:
        return True
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {s!r} (use on/off, true/false, 1/0)")


def bool_or_auto_flag(s: str):
    """argparse type for a boolean flag that also takes `auto` (decided at run time from the hardware)."""
    return "auto" if s.lower() == "auto" else bool_flag(s)


def cpu_bf16_units() -> str:
    """The bfloat16 matrix instructions of this CPU: 'AMX', 'AVX512-BF16', or '' (none: bf16 would be emulated,
    slower than fp32)."""
    try:  # torch's own dispatch checks; private, hence the fallback to the kernel's flags
        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        return "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else ""
    except AttributeError:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            return ""
        return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else ""


class Domain:
    """The values a numeric flag allows: a range whose bounds (None: none) are each inclusive or not, or a set."""

    def __init__(self, low: float = None, high: float = None, low_inclusive: bool = True,
                 high_inclusive: bool = True, values=None):
        self.low, self.high, self.low_inclusive, self.high_inclusive = low, high, low_inclusive, high_inclusive
        self.values = frozenset(values) if values is not None else None

    def __contains__(self, x) -> bool:
        if self.values is not None:
            return x in self.values
        if not math.isfinite(x):  # inf passes a lone lower bound and trains to nan all the same
            return False
        above = self.low is None or x > self.low or (self.low_inclusive and x == self.low)
        below = self.high is None or x < self.high or (self.high_inclusive and x == self.high)
        return above and below

    def __str__(self) -> str:
        if self.values is not None:
            return "one of " + ", ".join(map(str, sorted(self.values)))
        if self.low is None and self.high is None:
            return "a finite number"
        if self.high is None:
            return f"{'>=' if self.low_inclusive else '>'} {self.low:g}"
        if self.low is None:
            return f"{'<=' if self.high_inclusive else '<'} {self.high:g}"
        return (f"in {'[' if self.low_inclusive else '('}{self.low:g}, "
                f"{self.high:g}{']' if self.high_inclusive else ')'}")

    def __repr__(self) -> str:
        return f"Domain({self})"


POSITIVE = Domain(low=0, low_inclusive=False)
NON_NEGATIVE = Domain(low=0)
AT_LEAST_ONE = Domain(low=1)
FRACTION = Domain(0, 1, low_inclusive=False)  # a share of the image area or of the attention mass: (0, 1]
FINITE = Domain()


def add_model_args(parser: argparse.ArgumentParser, patch_size: int = 16) -> None:
    """--arch and --patch_size; any name is accepted here and checked by build_model (no network at parse time)."""
    parser.add_argument("--arch", default="vit_small", type=str,
                        help="""Name of architecture: vit_tiny, vit_small, vit_base (deit_tiny and deit_small are
        aliases), a DINOv2 backbone (dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14, each also with _reg:
        4 register tokens; --patch_size 14), any torchvision model name such as resnet50, or an XCiT name from the
        facebookresearch/xcit hub.""")
    parser.add_argument("--patch_size", default=patch_size, type=int, help=f"""Size in pixels of input square
        patches - default {patch_size} (for {patch_size}x{patch_size} patches). Using smaller values leads to better
        performance but requires more memory. Applies only for ViTs (vit_tiny, vit_small and vit_base).""")


MODEL_FLAG_DOMAINS = {"patch_size": AT_LEAST_ONE}


def add_weights_args(parser: argparse.ArgumentParser) -> None:
    """--pretrained_weights and --checkpoint_key, as in every evaluation script."""
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Path to pretrained weights to evaluate; empty: the published weights for --arch.")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Key to use in the checkpoint (example: "teacher")')


def add_distributed_args(parser: argparse.ArgumentParser, num_workers: int = 10) -> None:
    """--num_workers, --dist_url and --local_rank (also spelt --local-rank, as torch>=2 launchers pass it)."""
    parser.add_argument("--num_workers", default=num_workers, type=int, help="Number of data loading workers per GPU.")
    parser.add_argument("--dist_url", default="env://", type=str, help="""url used to set up
        distributed training; see https://pytorch.org/docs/stable/distributed.html""")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", default=0, type=int,
                        help="Please ignore and do not set this argument.")


DISTRIBUTED_FLAG_DOMAINS = {"num_workers": NON_NEGATIVE, "local_rank": NON_NEGATIVE}


def add_eval_size_args(parser: argparse.ArgumentParser) -> None:
    """--resize_size and --crop_size of the evaluation transform (256 and 224 as the paper; less for small images)."""
    parser.add_argument("--resize_size", default=256, type=int, help="""Evaluation images are resized (bicubic)
        so that their shorter side is this many pixels, then center-cropped; 256 as the paper.""")
    parser.add_argument("--crop_size", default=224, type=int, help="""Side of the center crop of evaluation images
        (and of the random-resized crops that train a linear classifier); 224 as the paper. For small images such as
        Fashion-MNIST's 28x28 use e.g. --resize_size 32 --crop_size 28.""")


# crop_size above resize_size is allowed: CenterCrop pads
EVAL_SIZE_FLAG_DOMAINS = {"resize_size": AT_LEAST_ONE, "crop_size": AT_LEAST_ONE}


def check_flag_domains(args: argparse.Namespace, domains: dict) -> None:
    """InputError naming the first flag of domains ({dest: Domain}) whose value, or any element of it, is outside."""
    for name, domain in domains.items():
        value = getattr(args, name)
        if value is None:  # a None default means "unset": nothing to check
            continue
        elements = value if isinstance(value, (list, tuple)) else [value]
        bad = [x for x in elements if x not in domain]
        if not bad:
            continue
        each = "each value " if elements is value else ""
        unbounded = domain.low is None and domain.high is None  # its str is "a finite number" already
        finite = "" if domain.values is not None or unbounded or all(map(math.isfinite, bad)) else "a finite number "
        raise InputError(f"--{name} {' '.join(map(str, elements))}: {each}must be {finite}{domain}")


def check_patch_fits(args, *size_flags: str, arch: str = None) -> None:
    """For a ViT (arch, default --arch), InputError when --patch_size is larger than a crop it sees (size_flags),
    or, for a DINOv2 ViT, is not its 14."""
    from vision_transformer import DINOV2_ARCHS, DINOV2_PATCH_SIZE, VIT_ARCHS
    arch = arch or args.arch
    if arch in DINOV2_ARCHS and args.patch_size != DINOV2_PATCH_SIZE:
        raise InputError(f"--patch_size {args.patch_size}: {arch} has {DINOV2_PATCH_SIZE}x{DINOV2_PATCH_SIZE} patches "
                         f"(give --patch_size {DINOV2_PATCH_SIZE})")
    if arch not in VIT_ARCHS and arch not in DINOV2_ARCHS:
        return
    for flag in size_flags:
        size = getattr(args, flag)
        if args.patch_size > size:
            raise InputError(f"--patch_size {args.patch_size} is larger than --{flag} {size}: {arch} cuts every "
                             f"crop into {args.patch_size}x{args.patch_size} patches")


# ============ checkpoints and weights ============

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


def published_weights_url(arch: str, patch_size: int) -> str:
    """URL of the published DINO backbone for arch and patch size, or of DINOv2's for a dinov2 arch; InputError when
    there is none."""
    from vision_transformer import DINOV2_ARCHS, DINOV2_NUM_REGISTERS
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
    from vision_transformer import DINOV2_ARCHS, DINOV2_PATCH_SIZE, VIT_ARCHS
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
                            patch_size: int, url: str = "") -> None:
    """Load backbone weights strictly from a local file or, when pretrained_weights is empty, the published ones.

    `url` replaces the published weights of arch and patch size (the attention figures' 300-epoch ViT-S/8).
    """
    if pretrained_weights:
        if not os.path.isfile(pretrained_weights):
            raise InputError(f"--pretrained_weights {pretrained_weights}: no such file")
        state_dict = torch_load(pretrained_weights)
        source = pretrained_weights
    else:
        url = url or published_weights_url(arch, patch_size)
        family = "DINOv2" if url.startswith(DINOV2_PUBLISHED_URL) else "DINO"
        print_main(f"No --pretrained_weights given: using the published {family} weights {url}")
        state_dict = download_weights(url)
        source = url
    state_dict = extract_backbone_state_dict(state_dict, checkpoint_key, source)
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


def restart_from_checkpoint(ckp_path: str, run_variables: dict = None, optional: tuple = (), **kwargs) -> dict:
    """Load each kwarg's state from the checkpoint at ckp_path, fill run_variables (e.g. epoch); return the checkpoint.

    Modules load strictly (one line naming the shapes that disagree); an optimizer loads through
    load_optimizer_state, by parameter name when `params_of` is (the checkpoint key of the optimizer's model,
    that model). A key of `optional` that the checkpoint lacks is skipped (the original skipped every absent key).
    Returns {} when there is no checkpoint.
    """
    if not os.path.isfile(ckp_path):
        return {}
    print_main(f"Found checkpoint at {ckp_path}")
    checkpoint = torch_load(ckp_path)
    if not isinstance(checkpoint, dict):
        raise InputError(f"{ckp_path}: not a checkpoint (a {type(checkpoint).__name__}, not a dict)")
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
    groups = [{**saved, **{k: own_g[k] for k in OPTIMIZER_IMPLEMENTATION_KEYS if k in own_g},
               "params": own_g["params"]} for saved, own_g in zip(saved_groups, own_groups)]
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


# ============ data ============

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderSkipBad:
    """torchvision ImageFolder that survives unreadable images.

    A file that fails to decode is reported once (naming it), remembered, and
    replaced by the next readable image, so a corrupt JPEG cannot end a long run.
    The set of bad files lives in shared memory, so DataLoader workers share it and
    `num_skipped()` in the main process counts them all.
    """

    def __init__(self, root: str, transform=None):
        from torchvision.datasets import ImageFolder
        check_image_folder(root)
        self.folder = ImageFolder(root, transform=None, is_valid_file=_has_image_extension)
        self.root, self.transform = root, transform
        self.samples, self.targets, self.classes = self.folder.samples, self.folder.targets, self.folder.classes
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            if self.bad[i]:
                continue
            try:
                img = self.read_image(i)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.bad[i] = True
                print(f"WARNING: skipping unreadable image {self.image_name(i)}: {e}", file=sys.stderr, flush=True)
                continue
            return (self.transform(img) if self.transform else img), int(self.targets[i])
        raise InputError(f"no readable image in {self.root}")

    def read_image(self, i: int) -> Image.Image:
        """Image i decoded to RGB (TarImageDataset reads it from its byte range instead)."""
        with open(self.samples[i][0], "rb") as f:
            return Image.open(f).convert("RGB")

    def image_name(self, i: int) -> str:
        """What a warning calls image i."""
        return self.samples[i][0]

    def num_skipped(self) -> int:
        return int(self.bad.sum())


def _has_image_extension(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def check_image_folder(root: str) -> None:
    """One-line errors for a folder that is missing, empty, or has no class subfolders with images; a tar
    (is_tar_path) is checked with its entries instead, as TarImageDataset will read it."""
    if is_tar_path(root):
        load_tar_entries(root)
        return
    if not os.path.isdir(root):
        raise InputError(f"data folder {root}: does not exist")
    classes = [d.name for d in os.scandir(root) if d.is_dir()]
    if not classes:
        loose = any(_has_image_extension(f) for f in os.listdir(root))
        tars = sorted(f for f in os.listdir(root) if f.lower().endswith(TAR_SUFFIXES))
        raise InputError(f"data folder {root}: no class subfolders" +
                         (f" (it holds {tars[0]}: give the tar's own path to read it)" if tars else
                          " (images must sit in <root>/<class>/, not in the root)" if loose else " (empty)"))
    for c in classes:
        for _, _, files in os.walk(os.path.join(root, c), followlinks=True):
            if any(_has_image_extension(f) for f in files):
                return
    raise InputError(f"data folder {root}: no images ({', '.join(IMG_EXTENSIONS)}) in its class subfolders")


# ============ tar datasets ============
# One uncompressed tarball of images, indexed by byte offsets (the format of the hierarchical DINO fork): each
# image is read straight from its byte range, so a file system that chokes on millions of small files sees one.
# Beside D/<name>.tar lie <prefix>_entries.npy, a uint64 (N, 4) array with one row per image in tar order,
# [class index (0 when classes are unused), file index, start offset of the member's data, end offset], and
# <prefix>_file_indices.npy (the original's may be file_indices.npy): the member name of each file index.

TAR_BLOCK = 512  # tar headers and data are laid out in blocks of 512 bytes
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
TAR_FILE_TYPES = (b"0", b"\0", b"7")  # regular and contiguous files: the members that have data to read
TAR_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos


def is_tar_path(path: str) -> bool:
    """Whether a --data_path names a tarball (read by TarImageDataset) rather than an ImageFolder."""
    return path.lower().endswith(TAR_SUFFIXES) and not os.path.isdir(path)


def _tar_stem(tar_path: str) -> str:
    """The tar's path without its .tar (or compressed-tar) suffix."""
    suffix = next((s for s in TAR_SUFFIXES if tar_path.lower().endswith(s)), "")
    return tar_path[:len(tar_path) - len(suffix)]


def tar_prefix(tar_path: str) -> str:
    """The prefix of a tar's entries files: D/pretrain_dataset.tar -> pretrain, D/train.tar -> train."""
    return os.path.basename(_tar_stem(tar_path)).removesuffix("_dataset")


def infer_entries_command(tar_path: str) -> str:
    """The command that writes the entries files where TarImageDataset looks for them."""
    return (f"python tools/infer_entries.py --tarball_path {tar_path} --output_root "
            f"{os.path.dirname(tar_path) or '.'} --prefix {tar_prefix(tar_path)}")


def check_uncompressed_tar(tar_path: str) -> None:
    """One-line errors for a tar that does not exist or is compressed (a compressed file has no offsets to read at)."""
    if not os.path.isfile(tar_path):
        raise InputError(f"tar {tar_path}: does not exist")
    with open(tar_path, "rb") as f:
        head = f.read(6)
    for magic, kind in COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            plain = _tar_stem(tar_path) + ".tar"
            if plain == tar_path:  # a compressed file named .tar
                plain = _tar_stem(tar_path) + "_uncompressed.tar"
            raise InputError(f"tar {tar_path}: {kind}-compressed, and images cannot be read at byte offsets of a "
                             f"compressed file; decompress it ({kind} -dc {tar_path} > {plain}) and index the "
                             f"result ({infer_entries_command(plain)})")


def _tar_number(field: bytes) -> int:
    """A number field of a tar header: octal digits, or GNU's base-256 (first byte 0x80) for sizes of 8 GiB on."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.replace(b"\0", b" ").strip()
    return int(digits, 8) if digits else 0


def _tar_header(block: bytes):
    """(name, size, type) of a 512-byte tar header; None when it is not one (its checksum does not add up)."""
    try:
        checksum = _tar_number(block[148:156])
        size = _tar_number(block[124:136])
    except ValueError:
        return None
    if checksum != sum(block[:148]) + 8 * ord(" ") + sum(block[156:]):  # summed with the checksum field as spaces
        return None
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and block[345]:  # POSIX ustar: a name of up to 255 bytes as prefix/name
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, block[156:157]


def _pax_records(data: bytes) -> dict:
    """The '<length> <key>=<value>\\n' records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


@dataclasses.dataclass(frozen=True)
class TarMember:
    """A member of a tar as its headers describe it; index: its position among the members, as tarfile lists them."""
    index: int
    name: str
    is_file: bool
    start: int  # offset of the member's data, right after its 512-byte header
    end: int


def iter_tar_members(tar_path: str):
    """The members of an uncompressed tar in order, read from their headers alone (the data is skipped by seeking).

    A GNU long name (a ././@LongLink member) or a pax extended header before a member gives its full name
    (and, for pax, its size); neither is a member itself.
    """
    with open(tar_path, "rb") as f:
        index, long_name, pax = 0, None, {}
        while True:
            offset = f.tell()
            block = f.read(TAR_BLOCK)
            if len(block) < TAR_BLOCK or not block.strip(b"\0"):
                return  # the end-of-archive blocks (or the end of the file)
            header = _tar_header(block)
            if header is None:
                raise InputError(f"tar {tar_path}: no tar header at byte {offset} (not a tar, or a damaged one)")
            name, size, kind = header
            start = offset + TAR_BLOCK
            if kind in (b"L", b"K", b"x", b"g"):  # GNU long name or link target, pax extended or global header
                data = f.read(size)
                try:
                    if kind == b"L":
                        long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    elif kind == b"x":
                        pax = _pax_records(data)
                except ValueError:
                    raise InputError(f"tar {tar_path}: unreadable extended header at byte {offset}") from None
                f.seek(start + -(-size // TAR_BLOCK) * TAR_BLOCK)
                continue
            name = long_name or pax.get("path", name)
            size = int(pax.get("size", size))
            long_name, pax = None, {}
            yield TarMember(index, name, kind in TAR_FILE_TYPES, start, start + size)
            index += 1
            if kind not in TAR_NO_DATA_TYPES:  # files (and, as tarfile does, members of unknown types) have data
                f.seek(start + -(-size // TAR_BLOCK) * TAR_BLOCK)


def tar_class_indices(names: list) -> tuple:
    """(classes, class index of each name) for the member names of a tar of class folders, as ImageFolder assigns
    them to the folder that was archived: the classes are the sorted first folders below the folders all members
    share (`tar -cf train.tar train/` and `tar -cf train.tar -C train .` give train/'s classes). No classes, and
    index 0, when the members sit in no class folder; a member outside the class folders gets index 0 too."""
    parts = [[p for p in name.split("/") if p not in ("", ".")] for name in names]
    common = parts[0][:-1] if parts else []
    for p in parts:
        n = 0
        while n < len(common) and n < len(p) - 1 and p[n] == common[n]:
            n += 1
        common = common[:n]
    folders = [p[len(common)] if len(p) - len(common) >= 2 else None for p in parts]
    classes = sorted({c for c in folders if c is not None})
    position = {c: i for i, c in enumerate(classes)}
    return classes, [position.get(c, 0) for c in folders]


def tar_entries(tar_path: str, progress=None) -> tuple:
    """(entries, names) of a tar, from its headers: entries uint64 (N, 4) [class index, file index, start, end] of
    each regular file in tar order, names their member names. Directories and other non-files are skipped, and so
    is an empty first member (as the original does). progress, if given, is called with each TarMember."""
    check_uncompressed_tar(tar_path)
    rows, names = [], []
    for member in iter_tar_members(tar_path):
        if progress is not None:
            progress(member)
        if member.is_file and not (member.index == 0 and member.start == member.end):
            rows.append((member.index, member.start, member.end))
            names.append(member.name)
    entries = np.zeros((len(rows), 4), dtype=np.uint64)
    if rows:
        entries[:, 1:] = rows
        entries[:, 0] = tar_class_indices(names)[1]
    return entries, names


def write_tar_entries(output_root: str, prefix: str, entries: np.ndarray, names: list) -> tuple:
    """Write <prefix>_entries.npy and <prefix>_file_indices.npy; return their paths.

    The file indices are a structured array (index uint64, name as UTF-8 bytes), which np.load reads with
    allow_pickle=False: unlike the original's pickled dict, loading it cannot run code.
    """
    encoded = [n.encode("utf-8", "surrogateescape") for n in names]
    file_indices = np.zeros(len(names), dtype=[("index", "<u8"), ("name", f"S{max(map(len, encoded), default=1)}")])
    file_indices["index"], file_indices["name"] = entries[:, 1], encoded
    paths = []
    for kind, array in (("entries", entries), ("file_indices", file_indices)):
        path = os.path.join(output_root, f"{prefix}_{kind}.npy")
        with open(path + ".tmp", "wb") as f:  # renamed when complete: an interrupted run leaves no half file
            np.save(f, array, allow_pickle=False)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return tuple(paths)


class _FileIndicesUnpickler(pickle.Unpickler):
    """Unpickles the original's file_indices.npy, a dict of int to str inside a 0-d object array, and nothing else.

    The only globals it looks up are numpy's array reconstruction (ndarray, dtype, _reconstruct); dicts, ints and
    strs need none. A pickle that names any other callable (os.system, eval, ...) fails before anything runs.
    """
    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        if name == "_reconstruct":
            return np.empty(0).__reduce__()[0]  # numpy 1 and 2 name its module differently
        return getattr(np, name)


def read_file_indices(path: str) -> tuple:
    """(file indices uint64, names as bytes) of a file_indices.npy: ours (a structured array, no pickle) or the
    original's pickled dict, read by a restricted unpickler that admits only a dict of int to str."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is not None and read_header(f)[2].hasobject:
                obj = _FileIndicesUnpickler(f).load()
                mapping = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
                if not (isinstance(mapping, dict) and all(type(k) is int and type(v) is str
                                                          for k, v in mapping.items())):
                    raise InputError(f"file indices {path}: the pickle holds a {type(mapping).__name__}, "
                                     f"not a dict of int to str")
                return (np.array(list(mapping), dtype=np.uint64),
                        np.array([v.encode("utf-8", "surrogateescape") for v in mapping.values()], dtype=bytes))
            f.seek(0)
            array = np.load(f, allow_pickle=False)
    except pickle.UnpicklingError as e:
        raise InputError(f"file indices {path}: refusing to unpickle it ({e}; only a dict of int to str is "
                         f"read); make new ones with tools/infer_entries.py") from None
    except (ValueError, OSError, EOFError, OverflowError, TypeError) as e:
        raise InputError(f"file indices {path}: unreadable ({e})") from None
    if array.dtype.names != ("index", "name") or array.ndim != 1:
        raise InputError(f"file indices {path}: expected a 1-D array with fields (index, name), got {array.dtype} "
                         f"{array.shape}")
    names = array["name"]
    if names.dtype.kind == "U":
        names = np.char.encode(names, "utf-8")
    return array["index"].astype(np.uint64), names


def _same_member(header_name: str, name: str) -> bool:
    """Whether a member name from the file indices is the one in a header: the same, its file name (what the
    original stores, for its directory entries too), or a long name whose first 100 bytes the header holds (GNU and
    pax keep the rest elsewhere)."""
    truncated = len(header_name.encode("utf-8", "surrogateescape")) >= 99
    return (name in (header_name, posixpath.basename(header_name.rstrip("/")))
            or (truncated and name.startswith(header_name)))


def load_tar_entries(tar_path: str) -> tuple:
    """(entries, names as bytes) of a tar from the entries files beside it, checked against the tar: its offsets
    within the tar, and the first and last images' headers naming them and their sizes. One line per problem."""
    check_uncompressed_tar(tar_path)
    root, prefix = os.path.dirname(tar_path) or ".", tar_prefix(tar_path)
    entries_path = os.path.join(root, f"{prefix}_entries.npy")
    candidates = [os.path.join(root, f"{prefix}_file_indices.npy"), os.path.join(root, "file_indices.npy")]
    indices_path = next((p for p in candidates if os.path.isfile(p)), None)
    if not os.path.isfile(entries_path) or indices_path is None:
        missing = entries_path if not os.path.isfile(entries_path) else " or ".join(candidates)
        raise InputError(f"tar {tar_path}: no {missing} beside it; make them with: {infer_entries_command(tar_path)}")
    try:
        entries = np.load(entries_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"entries {entries_path}: unreadable ({e})") from None
    if entries.ndim != 2 or entries.shape[1] != 4 or entries.dtype.kind not in "ui" or len(entries) == 0:
        raise InputError(f"entries {entries_path}: expected a uint64 array of shape (N, 4), N >= 1, got "
                         f"{entries.dtype} {entries.shape}")
    entries = entries.astype(np.uint64)
    redo = f"index it again: {infer_entries_command(tar_path)}"
    size, end = os.path.getsize(tar_path), int(entries[:, 3].max())
    if end > size:
        raise InputError(f"entries {entries_path}: offsets run to byte {end}, past the end of {tar_path} "
                         f"({size} bytes): a truncated copy of the tar? Copy it again, or {redo}")
    bad = np.flatnonzero((entries[:, 2] < TAR_BLOCK) | (entries[:, 2] > entries[:, 3]))
    if len(bad):
        raise InputError(f"entries {entries_path}: row {bad[0]} ({entries[bad[0], 2]}, {entries[bad[0], 3]}) is no "
                         f"member's data range; {redo}")
    file_indices, names = read_file_indices(indices_path)
    order = np.argsort(file_indices, kind="stable")
    position = np.searchsorted(file_indices[order], entries[:, 1]).clip(max=max(len(order) - 1, 0))
    found = (file_indices[order][position] == entries[:, 1]) if len(order) else np.zeros(len(entries), bool)
    if not found.all():
        raise InputError(f"file indices {indices_path}: no name for file index {entries[~found][0, 1]} of "
                         f"{entries_path} (files of different tars?); {redo}")
    names = names[order][position]
    with open(tar_path, "rb") as f:
        for row in sorted({0, len(entries) - 1}):
            start, end = int(entries[row, 2]), int(entries[row, 3])
            name = names[row].decode("utf-8", "surrogateescape")
            header = _tar_header(os.pread(f.fileno(), TAR_BLOCK, start - TAR_BLOCK))
            if header is None or header[1] != end - start or not _same_member(header[0], name):
                there = "no tar header" if header is None else f"{header[0]!r} of {header[1]} bytes"
                raise InputError(f"entries {entries_path} are not those of {tar_path}: they expect {name!r} of "
                                 f"{end - start} bytes at byte {start}, the tar has {there} there; {redo}")
    return entries, names


class TarImageDataset(ImageFolderSkipBad):
    """The images of one uncompressed tar, read from their byte ranges with no extraction, skipping unreadable ones
    (a member that is not an image included) as ImageFolderSkipBad does.

    Every process (every DataLoader worker) opens the tar once, at its first read, and reads with os.pread, which
    moves no shared file position: no file handle crosses a fork or a pickle. `classes` are the tar's class folders
    when the entries' class indices are theirs (tools/infer_entries.py on a tar of class folders), else '0', '1', ...
    """

    def __init__(self, tar_path: str, transform=None):
        self.root, self.transform = tar_path, transform
        self.entries, self.names = load_tar_entries(tar_path)
        self.targets = self.entries[:, 0].astype(np.int64)
        classes, indices = tar_class_indices([n.decode("utf-8", "surrogateescape") for n in self.names])
        folders_match = classes and np.array_equal(np.asarray(indices), self.targets)
        self.classes = classes if folders_match else [str(c) for c in range(int(self.targets.max()) + 1)]
        self.bad = torch.zeros(len(self.entries), dtype=torch.bool).share_memory_()
        self._fd, self._fd_pid = None, None

    def __len__(self):
        return len(self.entries)

    def read_image(self, i: int) -> Image.Image:
        start, end = int(self.entries[i, 2]), int(self.entries[i, 3])
        data = os.pread(self._file(), end - start, start)
        if len(data) != end - start:
            raise OSError(f"{len(data)} of its {end - start} bytes read (the tar is shorter than its entries)")
        try:
            return Image.open(io.BytesIO(data)).convert("RGB")
        except Image.UnidentifiedImageError:
            raise OSError("not an image (no decoder recognises its bytes)") from None

    def image_name(self, i: int) -> str:
        return f"{self.root}:{self.names[i].decode('utf-8', 'surrogateescape')}"

    def _file(self) -> int:
        """This process's descriptor of the tar, opened at its first read (a forked worker closes its parent's)."""
        if self._fd_pid != os.getpid():
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._fd_pid = os.open(self.root, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_fd_pid": None}  # a pickled copy opens its own

    def __del__(self):
        if getattr(self, "_fd_pid", None) == os.getpid():
            os.close(self._fd)


def image_dataset(path: str, transform=None) -> ImageFolderSkipBad:
    """The images of a --data_path: a TarImageDataset for a tar (entries beside it), else an ImageFolderSkipBad."""
    return TarImageDataset(path, transform) if is_tar_path(path) else ImageFolderSkipBad(path, transform)


# ============ evaluation ============


def eval_transform(resize_size: int = 256, crop_size: int = 224):
    """The paper's evaluation transform: Resize(resize_size, bicubic), CenterCrop(crop_size), ImageNet normalisation."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _eval_image_folder(root: str, transform) -> ImageFolderSkipBad:
    try:
        return image_dataset(root, transform=transform)
    except FileNotFoundError as e:  # torchvision: a class folder without any image
        raise InputError(f"data folder {root}: {e}") from None


def build_eval_datasets(data_path: str, train_transform, val_transform, need_train: bool = True):
    """(train, val) datasets of data_path/train/ and data_path/val/ with the same classes: ImageFolderSkipBad, or
    TarImageDataset where a split is a tar, train.tar and val.tar (indexed by tools/infer_entries.py).

    One-line errors for a missing folder and for val/ classes that differ from train/'s;
    with need_train False, train/ may be missing and (None, val) is returned.
    """
    if not os.path.isdir(data_path):
        raise InputError(f"--data_path {data_path}: no such folder (it must hold train/ and val/ ImageFolders)")
    splits = {}
    for split in ("train", "val") if need_train else ("val",):
        tars = [os.path.join(data_path, split + suffix) for suffix in TAR_SUFFIXES]
        splits[split] = next((p for p in [os.path.join(data_path, split), *tars] if os.path.exists(p)), None)
        if splits[split] is None:
            raise InputError(f"--data_path {data_path}: no {split}/ folder (it must hold train/ and val/ "
                             f"ImageFolders, one subfolder per class, or train.tar and val.tar)")
    val = _eval_image_folder(splits["val"], val_transform)
    if not need_train:
        return None, val
    train = _eval_image_folder(splits["train"], train_transform)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise InputError(f"--data_path {data_path}: val/ has other classes than train/ (train/ {len(train.classes)}, "
                         f"val/ {len(val.classes)}; only in train/: {', '.join(only_train[:5]) or '-'}"
                         f"{' ...' if len(only_train) > 5 else ''}; only in val/: {', '.join(only_val[:5]) or '-'}"
                         f"{' ...' if len(only_val) > 5 else ''})")
    return train, val


def worker_start_method(num_workers: int):
    """How DataLoader workers start: 'forkserver' where the platform has it, None (the default) without workers.

    Forking the main process itself can deadlock the new worker when another thread holds a
    lock at that instant (pytorch/pytorch#130610): here the queue threads of the previous
    loader still exiting, or the process group's threads. The fork server is a fresh, single-
    threaded process that imported the script once, so workers still start fast.
    """
    import multiprocessing
    if num_workers == 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    return "forkserver"


class ShardedBatchSampler(torch.utils.data.Sampler):
    """The dataset's consecutive batches, in order, dealt round-robin to the processes (batch b to rank b % world).

    No image is repeated or dropped, and each batch is exactly the one a single process
    would form, so features computed by several processes equal a one-process run's.
    `num_rounds` is the number of batches of rank 0, the most any rank has.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.num_batches = math.ceil(num_samples / batch_size)
        self.num_rounds = math.ceil(self.num_batches / world_size)

    def __iter__(self):
        for b in range(self.rank, self.num_batches, self.world_size):
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples)))

    def __len__(self):
        return len(range(self.rank, self.num_batches, self.world_size))


def published_linear_weights_url(arch: str, patch_size: int) -> str:
    """URL of the published linear classifier of the published backbone: <folder>/<name>_linearweights.pth."""
    from vision_transformer import DINOV2_ARCHS
    if arch in DINOV2_ARCHS:  # DINOv2's linear heads read other features, in another layout
        raise InputError(f"--arch {arch}: no published linear classifier in this layout for DINOv2 backbones; "
                         f"give --linear_weights")
    return published_weights_url(arch, patch_size).replace("_pretrain.pth", "_linearweights.pth")


def build_frozen_backbone(args, device: torch.device) -> nn.Module:
    """The backbone of --arch/--patch_size with the evaluated weights, in eval mode, without gradients, on device.

    Weights: --pretrained_weights with --checkpoint_key, or the published ones for the arch when it is empty.
    """
    from vision_transformer import build_model
    model = build_model(args.arch, patch_size=args.patch_size)
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.eval().requires_grad_(False)
    patches = f" {args.patch_size}x{args.patch_size}" if hasattr(model, "patch_embed") else ""
    print_main(f"Model {args.arch}{patches} built.")
    return model.to(device)


def feature_loader(dataset, batch_size: int, num_workers: int, device: torch.device, persistent: bool = False):
    """The DataLoader extract_features reads: this process's ShardedBatchSampler batches of the dataset.

    persistent: keep the workers between passes (the k-NN monitoring reads the same images every few epochs; starting
    workers costs seconds each time, more than a small split's whole pass).
    """
    sampler = ShardedBatchSampler(len(dataset), batch_size, get_rank(), get_world_size())
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=device.type == "cuda", persistent_workers=persistent and num_workers > 0,
                                       multiprocessing_context=worker_start_method(num_workers))


@torch.inference_mode()
def extract_features(model: nn.Module, data_loader, device: torch.device, storage: torch.device):
    """L2-normalised features (N, D) of the dataset's readable images, in dataset order, and their labels (N,).

    data_loader: feature_loader's. The model runs on device and the features are kept on storage. Each process runs
    the batches ShardedBatchSampler deals it; after every round the batches of all processes are gathered with
    their indices, so every process ends with all features.
    An unreadable image is skipped (ImageFolderSkipBad warns) and left out of features and labels.
    """
    dataset, sampler = data_loader.dataset, data_loader.batch_sampler
    batch_size = sampler.batch_size
    dim = model.embed_dim
    features = torch.zeros(len(dataset), dim, device=storage)
    readable = torch.zeros(len(dataset), dtype=torch.bool, device=storage)
    local_batches, local_indices = iter(data_loader), iter(sampler)
    start = time.time()
    for r in range(sampler.num_rounds):
        # every rank takes part in every gather: a rank without a batch this round sends only padding (index -1)
        feats = torch.zeros(batch_size, dim, device=device)
        index = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        ok = torch.zeros(batch_size, dtype=torch.bool, device=device)
        idx = next(local_indices, None)
        if idx is not None:
            images, _ = next(local_batches)
            feats[:len(idx)] = model(images.to(device, non_blocking=True)).float()
            index[:len(idx)] = torch.as_tensor(idx)
            ok[:len(idx)] = ~dataset.bad[idx].to(device)  # a skipped image was replaced by another one
        feats, index, ok = all_gather_cat(feats), all_gather_cat(index), all_gather_cat(ok)
        keep = index >= 0
        features[index[keep].to(storage)] = feats[keep].to(storage)
        readable[index[keep].to(storage)] = ok[keep].to(storage)
        if r % 20 == 0 or r == sampler.num_rounds - 1:
            print_main(f"  [{r + 1}/{sampler.num_rounds}] batches of {batch_size} x {get_world_size()} "
                       f"processes, {time.time() - start:.1f}s")
    elapsed = time.time() - start
    print_main(f"Extracted {len(dataset)} features in {elapsed:.1f}s "
                     f"({len(dataset) / elapsed:.1f} images/s, {get_world_size()} processes)")
    skipped = len(dataset) - int(readable.sum())
    if skipped:
        print_main(f"WARNING: {skipped} unreadable images of {dataset.root} skipped")
        features = features[readable]
    features.div_(features.norm(dim=1, keepdim=True).clamp_min(1e-12))  # L2 normalisation in place
    labels = torch.tensor(dataset.targets, dtype=torch.long, device=storage)[readable]
    return features, labels


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, nb_knn, T: float, num_classes: int,
                   test_chunk: int = 0, train_chunk: int = 2**17, rank: int = 0, world_size: int = 1) -> dict:
    """{k: (top1, top5)} in percent for each k in nb_knn, features L2-normalised, labels in [0, num_classes).

    For every query, the k training features of highest cosine similarity vote for their
    labels with weight exp(sim / T); classes are ranked by total vote (ties: lower class index
    first), top-5 counting the first min(5, k) classes as the original does. Similarities are
    computed in blocks of test_chunk queries x train_chunk bank rows, keeping a running top-k,
    so a bank of any size fits in memory; the largest k is searched once and the smaller ks
    are read from its prefix. Several processes split the query chunks and sum their counts.
    """
    n_train = len(train_features)
    too_big = [k for k in nb_knn if k > n_train]
    if too_big:
        print_main(f"WARNING: skipping k = {', '.join(map(str, too_big))}: only {n_train} training images")
    nb_knn = [k for k in nb_knn if k <= n_train]
    if not nb_knn:
        raise InputError(f"--nb_knn: every k is more than the {n_train} training images")
    max_k = max(nb_knn)
    train_chunk = min(train_chunk, n_train)
    test_chunk = test_chunk or max(1, 2**26 // train_chunk)  # at most 64M similarities (256 MB) at a time
    device = test_features.device
    correct = torch.zeros(len(nb_knn), 2, dtype=torch.long, device=device)  # (k, [top1, top5])
    for start in range(rank * test_chunk, len(test_features), test_chunk * world_size):
        queries = test_features[start:start + test_chunk]  # (c, D)
        targets = test_labels[start:start + test_chunk]
        best_sim = torch.empty(len(queries), 0, device=device)
        best_idx = torch.empty(len(queries), 0, dtype=torch.long, device=device)
        for t0 in range(0, n_train, train_chunk):
            sim = queries @ train_features[t0:t0 + train_chunk].T  # (c, train_chunk)
            sim, idx = sim.topk(min(max_k, sim.shape[1]), dim=1)
            best_sim, order = torch.cat((best_sim, sim), dim=1).topk(min(max_k, best_sim.shape[1] + sim.shape[1]),
                                                                     dim=1)
            best_idx = torch.gather(torch.cat((best_idx, idx + t0), dim=1), 1, order)
        neighbour_labels = train_labels[best_idx]  # (c, max_k), by decreasing similarity
        weights = (best_sim / T).exp()
        for j, k in enumerate(nb_knn):
            votes = torch.zeros(len(queries), num_classes, dtype=weights.dtype, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])  # (c, num_classes)
            n_top = min(5, k, num_classes)
            predictions = votes.sort(dim=1, descending=True, stable=True).indices[:, :n_top]
            hits = predictions == targets[:, None]
            correct[j, 0] += hits[:, 0].sum()
            correct[j, 1] += hits.any(dim=1).sum()
    if world_size > 1:
        correct = all_reduce_sum(correct)
    total = len(test_features)
    return {k: (100.0 * correct[j, 0].item() / total, 100.0 * correct[j, 1].item() / total)
            for j, k in enumerate(nb_knn)}


# ============ schedules ============


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: float = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Per-iteration values: linear warmup from start_warmup_value, then cosine from base_value to final_value.
    warmup_epochs may be a fraction of the epochs (rounded to whole iterations)."""
    warmup_iters = round(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# ============ augmentation ============

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur with radius U(radius_min, radius_max), applied with probability p."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """PIL solarization (invert pixels >= 128) with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class DataAugmentationDINO:
    """Multi-crop augmentation of the paper: 2 global crops and local_crops_number local crops per image.

    Global crop 1 is always blurred; global crop 2 is blurred with p=0.1 and solarized
    with p=0.2; local crops are blurred with p=0.5 (BYOL's asymmetric recipe).
    """

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number: int,
                 global_crops_size: int = 224, local_crops_size: int = 96):
        from torchvision import transforms
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                   p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(1.0), normalize])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(0.1), Solarization(0.2), normalize])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(p=0.5), normalize])

    def __call__(self, image) -> list:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops


# The batched multi-crop (--augmentation gpu) draws crops from DataAugmentationDINO's distributions, in two halves.
# DataLoader workers decode each image, cut its crops (RandomResizedCrop's box on the full image, bicubic resize)
# and draw every random parameter of the later steps; the training device applies flip, colour jitter, grayscale,
# blur, solarization and normalisation to the whole batch at once. Crop boxes differ in size from image to image,
# so cutting stays in the workers, with torchvision's uint8 tensor resize (antialiased bicubic, at most 1 grey level
# from PIL's, and 1.6x faster); the per-pixel steps, two thirds of the original's per-image time, batch well on a GPU.


def sample_photometric_params(blur_p: torch.Tensor, solarize_p: torch.Tensor) -> dict:
    """Random parameters of DataAugmentationDINO's steps after the crop, for len(blur_p) crops (one row each).

    flip p 0.5; colour jitter p 0.8 with ColorJitter(0.4, 0.4, 0.2, 0.1)'s factors (brightness and contrast
    U(0.6, 1.4), saturation U(0.8, 1.2), hue U(-0.1, 0.1)) applied in a uniformly random order (`order[i, k]` is
    the k-th operation: 0 brightness, 1 contrast, 2 saturation, 3 hue); grayscale p 0.2; Gaussian blur with
    probability blur_p[i] and sigma U(0.1, 2.0) (PIL's radius is the Gaussian's sigma); solarization with
    probability solarize_p[i].
    """
    n = len(blur_p)
    coins, uniforms = torch.rand(n, 5), torch.rand(n, 5)
    low, high = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    return {
        "flip": coins[:, 0] < 0.5,
        "jitter": coins[:, 1] < 0.8,
        "order": torch.rand(n, 4).argsort(dim=1),  # the ranks of 4 i.i.d. uniforms: a uniform permutation
        "jitter_factors": low + (high - low) * uniforms[:, :4],  # (n, 4) in the order of `order`'s codes
        "gray": coins[:, 2] < 0.2,
        "blur": coins[:, 3] < blur_p,
        "sigma": 0.1 + 1.9 * uniforms[:, 4],
        "solarize": coins[:, 4] < solarize_p,
    }


class MultiCropGeometry:
    """Worker half of the batched multi-crop: the crops of DataAugmentationDINO before flip and colour, as uint8.

    Returns (crops, params): crops a list of (3, S, S) uint8 tensors, 2 global then local_crops_number local, each
    a RandomResizedCrop (box drawn by torchvision's get_params on the full image, ratio (3/4, 4/3)) resized with
    torchvision's antialiased bicubic tensor resize; params the random parameters of the remaining steps
    (sample_photometric_params) with the original's per-crop probabilities: blur 1.0 on global crop 1, 0.1 on
    global crop 2, 0.5 on local crops; solarization 0.2 on global crop 2 only.
    """

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number: int,
                 global_crops_size: int = 224, local_crops_size: int = 96):
        self.crops = [(global_crops_size, tuple(global_crops_scale))] * 2
        self.crops += [(local_crops_size, tuple(local_crops_scale))] * local_crops_number
        self.blur_p = torch.tensor([1.0, 0.1] + [0.5] * local_crops_number)
        self.solarize_p = torch.tensor([0.0, 0.2] + [0.0] * local_crops_number)

    def __call__(self, image) -> tuple:
        from torchvision.transforms import InterpolationMode, RandomResizedCrop
        from torchvision.transforms.v2.functional import resized_crop
        # (3, H, W) view of PIL's (H, W, 3) pixels: torch's uint8 bicubic resize is fastest on this layout
        image = image if image.mode == "RGB" else image.convert("RGB")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        crops = []
        for size, scale in self.crops:
            i, j, h, w = RandomResizedCrop.get_params(pixels, list(scale), [3 / 4, 4 / 3])
            crops.append(resized_crop(pixels, i, j, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True))
        return crops, sample_photometric_params(self.blur_p, self.solarize_p)


GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize inverts uint8 values >= 128


class MultiCropOnDevice:
    """Device half of the batched multi-crop: MultiCropGeometry's collated uint8 crops in, normalised crops out.

    Every operation follows torchvision's tensor implementation (float images in [0, 1]) with one parameter per
    crop instead of one per call: flip, then colour jitter in each crop's own order, grayscale, Gaussian blur
    (kernel radius 6 = 3 sigma at the largest sigma 2.0, reflect padding), solarization, normalisation. Which crops
    an operation touches is read from the parameters on the host, so nothing here waits for the device.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.gray_weights = torch.tensor(GRAYSCALE_WEIGHTS, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, crops: list, params: dict) -> list:
        """crops: one (B, 3, S, S) uint8 tensor per crop; params: (B, ncrops, ...) tensors. Returns (B, 3, S, S)s."""
        out, start = [], 0
        for end in range(1, len(crops) + 1):  # the crops of one size are augmented as one batch
            if end < len(crops) and crops[end].shape == crops[start].shape:
                continue
            x = torch.cat([c.to(self.device, non_blocking=True) for c in crops[start:end]])  # (n*B, 3, S, S)
            x = x.float().div_(255)
            p = {k: v[:, start:end].transpose(0, 1).flatten(0, 1) for k, v in params.items()}  # crop-major, as x
            out += list(self.augment(x, p).chunk(end - start))
            start = end
        return out

    def augment(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """x: (N, 3, H, W) floats in [0, 1]; p: sample_photometric_params' dict with N rows, on the host."""
        on_device = {k: self._to_device(v) for k, v in p.items()}
        x = torch.where(on_device["flip"].view(-1, 1, 1, 1), x.flip(-1), x)

        # colour jitter: at step k, each operation runs on the crops that have it k-th in their order
        masks = [p["jitter"] & (p["order"][:, k] == op) for k in range(4) for op in range(4)]
        masks += [p["gray"], p["blur"]]
        *jitter_idx, gray_idx, blur_idx = self._indices_to_device(masks)
        operations = (adjust_brightness_batched, self.adjust_contrast, self.adjust_saturation, adjust_hue_batched)
        for (k, op), idx in zip([(k, op) for k in range(4) for op in range(4)], jitter_idx):
            if len(idx):
                factors = on_device["jitter_factors"][idx, op]
                x.index_copy_(0, idx, operations[op](x.index_select(0, idx), factors))

        if len(gray_idx):
            x.index_copy_(0, gray_idx, self.grayscale(x.index_select(0, gray_idx)).expand(-1, 3, -1, -1))
        if len(blur_idx):
            x.index_copy_(0, blur_idx, gaussian_blur_batched(x.index_select(0, blur_idx),
                                                             on_device["sigma"][blur_idx]))
        solarize = on_device["solarize"].view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD)
        x = torch.where(solarize, 1 - x, x)
        return x.sub_(self.mean).div_(self.std)

    def grayscale(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1, H, W) luma."""
        return (x * self.gray_weights).sum(dim=1, keepdim=True)

    def adjust_contrast(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Blend with the mean luma of each image (torchvision's adjust_contrast), one factor per image."""
        mean = self.grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(x, mean, factor)

    def adjust_saturation(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Blend with the image's own luma (torchvision's adjust_saturation), one factor per image."""
        return _blend(x, self.grayscale(x), factor)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and not t.is_pinned():
            t = t.pin_memory()  # page-locked, so the copy below does not make the host wait
        return t.to(self.device, non_blocking=True)

    def _indices_to_device(self, masks: list) -> list:
        """Each host mask's row indices, on the device, with a single copy."""
        idx = [m.nonzero().flatten() for m in masks]
        return list(self._to_device(torch.cat(idx)).split([len(i) for i in idx]))


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (torchvision's _blend), one factor per image."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def adjust_brightness_batched(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black (torchvision's adjust_brightness), one factor per image."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_hue_batched(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Shift the hue of each image by hue[i] turns in HSV space (torchvision's adjust_hue); x: (N, 3, H, W)."""
    r, g, b = x.unbind(dim=1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    gray = chroma == 0  # hue and saturation are 0 where r == g == b; the divisors below avoid 0/0
    saturation = chroma / torch.where(gray, 1.0, value)
    chroma = torch.where(gray, 1.0, chroma)
    rc, gc, bc = (value - r) / chroma, (value - g) / chroma, (value - b) / chroma
    h = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h6 = ((h + hue.view(-1, 1, 1)) % 1.0) * 6.0  # hue in sixths of a turn, in [0, 6)
    # HSV back to RGB: channel n (5 red, 3 green, 1 blue) is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n) % 6.0
        out.append(value - value * saturation * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(out, dim=1)


def gaussian_blur_batched(x: torch.Tensor, sigma: torch.Tensor, radius: int = 6) -> torch.Tensor:
    """Gaussian blur of each image with its own sigma; kernel 2*radius+1 wide, reflect padding, as torchvision's.

    Separable: one depthwise convolution along rows, one along columns.
    """
    n, c, h, w = x.shape
    radius = min(radius, h - 1, w - 1)  # reflect padding needs the image wider than the pad
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, 2*radius+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)  # along rows
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)  # along columns
    return y.view(n, c, h, w)


# ============ attention maps ============


def build_attention_backbone(args, device: torch.device) -> nn.Module:
    """The ViT (DINO's or DINOv2's) of --arch/--patch_size in eval mode on device, for attention maps and PCA.

    Weights: --pretrained_weights with --checkpoint_key, or when it is empty the published
    weights the paper's figures use (attention_weights_url: the 300-epoch ViT-S/8 for vit_small/8).
    """
    from vision_transformer import DINOV2_ARCHS, VIT_ARCHS, build_model
    if args.arch not in VIT_ARCHS and args.arch not in DINOV2_ARCHS:
        raise InputError(f"--arch {args.arch}: attention maps need a ViT ({', '.join(VIT_ARCHS)}, "
                         f"{', '.join(DINOV2_ARCHS)})")
    model = build_model(args.arch, patch_size=args.patch_size)
    url = "" if args.pretrained_weights else attention_weights_url(args.arch, args.patch_size)
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size, url=url)
    return model.eval().requires_grad_(False).to(device)


def attention_transform(image_size=None):
    """PIL image to normalised tensor, first resized by torchvision's Resize(image_size) (bilinear) when given.

    image_size: one int (shorter side) or (height, width), as the original attention scripts.
    """
    from torchvision import transforms
    resize = [transforms.Resize(image_size)] if image_size else []
    return transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def crop_to_patch_multiple(img: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Crop (..., H, W) at the bottom and right so that H and W are multiples of patch_size."""
    h, w = img.shape[-2:]
    return img[..., :h - h % patch_size, :w - w % patch_size]


@torch.no_grad()
def cls_attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[CLS]-to-patch attention of every head of the last block, (B, heads, H // p, W // p), on the patch grid.

    Each head's full [CLS] row (itself, DINOv2's registers and the N patches) sums to 1; the patches
    alone a little less. The registers are left out.
    """
    p = model.patch_embed.patch_size
    attn = model.get_last_selfattention(images)  # (B, heads, T, T), T = prefix tokens + N
    B, nh = attn.shape[:2]
    return attn[:, :, 0, model.num_prefix_tokens:].reshape(B, nh, images.shape[-2] // p, images.shape[-1] // p)


def attention_mass_mask(attentions: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per map (last two dims), the smallest set of patches holding a fraction `threshold` of its attention mass.

    As the original: sort ascending, normalise, keep the patches whose cumulative mass
    exceeds 1 - threshold, i.e. the largest values until they hold `threshold` of the mass.
    """
    flat = attentions.flatten(-2)  # (..., N)
    val, idx = torch.sort(flat, dim=-1)
    val = val / val.sum(dim=-1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=-1) > (1 - threshold)
    mask = torch.zeros_like(keep_sorted).scatter_(-1, idx, keep_sorted)  # back to patch order
    return mask.reshape(attentions.shape)


def upsample_patches(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, h, w) patch-grid maps to (B, C, h * p, w * p) pixels, nearest neighbour (each patch a flat square)."""
    return F.interpolate(maps.float(), scale_factor=patch_size, mode="nearest")


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normed last-layer patch tokens of a ViT, (B, H // p, W // p, D) on the patch grid; [CLS], registers left out."""
    p = model.patch_embed.patch_size
    tokens = model.get_intermediate_layers(images, 1)[0]  # (B, prefix tokens + N, D)
    return tokens[:, model.num_prefix_tokens:].reshape(len(images), images.shape[-2] // p, images.shape[-1] // p, -1)


def border_patches(h: int, w: int) -> torch.Tensor:
    """(h, w) mask of the patches on the border of an h x w grid."""
    border = torch.ones(h, w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    return border


@dataclasses.dataclass
class PatchPCA:
    """The first principal axes of patch features, and the range of the features' scores on them (to map them to RGB).

    Fitted by an SVD of the centred features (torch.linalg.svd: exact, deterministic). The sign of a
    principal component is arbitrary; it is fixed by one stated rule, so that the same features give
    the same colours every run: each component's score of largest magnitude is made positive, except
    that with `border` (a mask of the features on the image border) the first component's mean score
    over the border is made negative. The border is then taken for background, and the foreground has
    the positive first-component scores, as DINOv2's paper thresholds them.
    """
    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (k, D), orthonormal rows, k = min(n_components, number of features, D)
    low: torch.Tensor  # (k,): the lowest score of the fitted features on each component
    high: torch.Tensor  # (k,): the highest
    std: torch.Tensor  # (k,): the scores' standard deviation

    @classmethod
    def fit(cls, features: torch.Tensor, n_components: int = 3, border: torch.Tensor = None) -> "PatchPCA":
        """PCA of (N, D) features; border: an (N,) mask, or None."""
        features = features.float()
        mean = features.mean(dim=0)
        u, s, vh = torch.linalg.svd(features - mean, full_matrices=False)  # (N, r), (r,), (r, D)
        k = min(n_components, len(s))
        scores = u[:, :k] * s[:k]  # (N, k)
        signs = scores.gather(0, scores.abs().argmax(dim=0, keepdim=True))[0].sign()
        if border is not None and border.any() and not border.all():  # a grid of 1 or 2 rows is all border
            signs[0] = -scores[border, 0].mean().sign()
        signs[signs == 0] = 1
        scores = scores * signs
        std = s[:k] / max(len(features) - 1, 1) ** 0.5
        return cls(mean, vh[:k] * signs[:, None], scores.min(dim=0).values, scores.max(dim=0).values, std)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features to their (N, k) scores on the components."""
        return (features.float() - self.mean) @ self.components.T

    def rgb(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 3) colours in [0, 1]: the first 3 scores, each min-max scaled over the fitted features (then clamped).

        A component of constant score, or one that fewer than 3 features lack, is black.
        """
        scaled = ((self.scores(features) - self.low) / (self.high - self.low).clamp_min(1e-12))[:, :3]
        return F.pad(scaled.clamp(0, 1), (0, 3 - scaled.shape[1]))


def pca_pictures(features: torch.Tensor, threshold: float = 0.0) -> tuple:
    """The colours of pca.png and pca_foreground.png on the patch grid, (3, h, w) each, and the foreground mask (h, w).

    features: (h, w, D) patch features of one image. pca.png: the first 3 principal components of all
    its patches. Foreground: the patches whose first-component score, in standard deviations of that
    score, is above threshold (0: the positive scores, DINOv2's rule); pca_foreground.png colours them
    by a second PCA of the foreground patches alone and leaves the background black.
    """
    h, w, dim = features.shape
    flat = features.reshape(h * w, dim).float()
    pca = PatchPCA.fit(flat, border=border_patches(h, w).flatten().to(flat.device))
    foreground = pca.scores(flat)[:, 0] / pca.std[0].clamp_min(1e-12) > threshold
    foreground_rgb = torch.zeros(h * w, 3, device=flat.device)
    if foreground.any():
        foreground_rgb[foreground] = PatchPCA.fit(flat[foreground]).rgb(flat[foreground])
    return (pca.rgb(flat).T.reshape(3, h, w), foreground_rgb.T.reshape(3, h, w), foreground.reshape(h, w))


# ============ loss and teacher ============


class MultiCropWrapper(nn.Module):
    """Backbone over all crops, grouped by resolution, then the head once on every feature.

    Consecutive crops of the same size are concatenated into one backbone batch
    (2 global crops, then the local crops), so each resolution costs one forward pass.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()  # no classifier on top of the features
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        if not isinstance(x, (list, tuple)):
            x = [x]
        backbone, head = self.__dict__.get("_compiled", (self.backbone, self.head))
        sizes = [inp.shape[-1] for inp in x]
        outputs, start = [], 0
        for end in range(1, len(x) + 1):  # group runs of equal resolution
            if end == len(x) or sizes[end] != sizes[start]:
                out = backbone(torch.cat(x[start:end]))
                outputs.append(out[0] if isinstance(out, tuple) else out)
                start = end
        return head(torch.cat(outputs))

    def compile_parts(self, **compile_kwargs) -> None:
        """torch.compile the backbone and the head for this wrapper's forward (state dict keys unchanged).

        Static shapes: batch and crop sizes are fixed during training, so each crop resolution gets its own
        specialised graph instead of one graph with symbolic shapes. `self.backbone` itself stays eager, so the
        k-NN monitoring, which runs it at other batch sizes under inference mode, compiles nothing.
        """
        compiled = tuple(torch.compile(m, dynamic=False, **compile_kwargs) for m in (self.backbone, self.head))
        self.__dict__["_compiled"] = compiled  # not a submodule: the compiled wrappers share the parameters


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over all cross-view pairs."""

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        if warmup_teacher_temp_epochs > nepochs:
            raise InputError(f"--warmup_teacher_temp_epochs {warmup_teacher_temp_epochs} is more than "
                             f"--epochs {nepochs}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # teacher temperature: linear warmup, then constant (a too high temperature early makes training unstable)
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                with_entropies: bool = False):
        """student_output: (ncrops * B, K); teacher_output: (2 * B, K), global crops only.

        with_entropies: also return teacher_entropies of this batch's teacher distributions (no gradient).
        """
        # one log-softmax per student crop, reused for both teacher crops
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)  # (ncrops * B, K)
        temp = self.teacher_temp_schedule[epoch]
        teacher_q = F.softmax((teacher_output.float() - self.center) / temp, dim=-1).detach()  # (2 * B, K)
        teacher_p = teacher_q.chunk(2)

        # Each teacher crop is compared with every student crop except the same view: 2 * (ncrops - 1) terms
        # mean_b sum_k -q * logp. Grouped by teacher crop, the local crops enter both groups only through the sum
        # of their log-probabilities, so the same total takes 2 products over (B, K) instead of 2 * (ncrops - 1).
        batch = len(student_output) // self.ncrops
        logp_global = student_logp[:2 * batch].chunk(2)
        logp_local = student_logp[2 * batch:].unflatten(0, (self.ncrops - 2, batch)).sum(0) if self.ncrops > 2 else 0
        total_loss = (torch.sum(-teacher_p[0] * (logp_global[1] + logp_local), dim=-1).mean()
                      + torch.sum(-teacher_p[1] * (logp_global[0] + logp_local), dim=-1).mean())
        n_loss_terms = 2 * (self.ncrops - 1)
        self.update_center(teacher_output)
        loss = total_loss / n_loss_terms
        return (loss, teacher_entropies(teacher_q)) if with_entropies else loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the batch mean of teacher outputs, the mean taken over every process."""
        batch_center = all_reduce_sum(torch.sum(teacher_output.float(), dim=0, keepdim=True))
        batch_center = batch_center / (len(teacher_output) * get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


# Collapse diagnostics (the quantities of the paper's Sec. 5.3 and Fig. 7). With q the teacher's distribution of an
# image, the loss averages H(q, p) = H(q) + KL(q || p) over cross-view pairs, and every pair of a teacher crop has the
# same H(q): so KL = loss - mean H(q), with no further product. Uniform collapse: every q near uniform, mean H(q) near
# ln(K). One-dimension collapse: every q on the same dimension, so even the batch's mean distribution has an entropy
# near 0. A healthy teacher is sharp per image (low mean H(q)) and spread over the batch (H(mean q) high).


@torch.no_grad()
def teacher_entropies(teacher_p: torch.Tensor) -> torch.Tensor:
    """[mean per-image entropy, entropy of the batch-mean distribution] in nats, of (N, K) distributions."""
    teacher_p = teacher_p.float()
    return torch.stack((torch.special.entr(teacher_p).sum(-1).mean(), torch.special.entr(teacher_p.mean(0)).sum()))


COLLAPSE_CURES = "lower --teacher_temp, lower --momentum_teacher, or a longer --freeze_last_layer"


class CollapseCounter:
    """Counts an epoch's steps at uniform collapse (the teacher's mean entropy within `near` * ln(out_dim) of
    ln(out_dim)) and at one-dimension collapse (the entropy of its batch-mean distribution below near * ln(out_dim)),
    and words a warning when every step of the epoch, over all processes, sat at one of them."""

    def __init__(self, out_dim: int, near: float = 0.1):
        self.ln_k, self.near = math.log(out_dim), near
        self.steps = self.uniform = self.one_dimension = 0

    def add(self, entropy: float, batch_entropy: float) -> None:
        self.steps += 1
        self.uniform += entropy > (1 - self.near) * self.ln_k
        self.one_dimension += batch_entropy < self.near * self.ln_k

    def warning(self, epoch: int) -> str:
        """The warning line for this epoch, or ''. Every process must call it (one all-reduce of the counts)."""
        steps, uniform, one_dimension = all_reduce_sum(
            torch.tensor([self.steps, self.uniform, self.one_dimension], dtype=torch.float64)).tolist()
        if steps and uniform == steps:
            return (f"warning: uniform collapse in epoch {epoch}: the teacher's mean entropy stayed above "
                    f"{1 - self.near:.0%} of ln(out_dim) = {self.ln_k:.2f} at every step (its outputs are near "
                    f"uniform, the loss sits near ln(out_dim)); usual cures: {COLLAPSE_CURES}")
        if steps and one_dimension == steps:
            return (f"warning: one-dimension collapse in epoch {epoch}: the entropy of the teacher's batch-mean "
                    f"distribution stayed below {self.near:.0%} of ln(out_dim) = {self.ln_k:.2f} at every step "
                    f"(every image on the same few dimensions); usual cures: {COLLAPSE_CURES}")
        return ""


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA of the student's parameters into the teacher's: teacher = m * teacher + (1 - m) * student."""
    s_params = [p.detach() for p in student.parameters()]
    t_params = [p.detach() for p in teacher.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1 - momentum)  # t + (1 - m)(s - t): one kernel per group of tensors


def has_batchnorms(model: nn.Module) -> bool:
    """True if any module is a batch norm (then the teacher needs SyncBatchNorm and DDP too)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ============ optimisation ============


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


# ============ logging ============


class SmoothedValue:
    """A series of values with its median and average over a window and globally."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.6f} ({global_avg:.6f})"):
        self.deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over processes (the window stays local)."""
        t = all_reduce_sum(torch.tensor([self.count, self.total], dtype=torch.float64))
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else float("nan")

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else float("nan")

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named SmoothedValues and an iterator wrapper that prints progress, time per iteration and ETA."""

    def __init__(self, delimiter: str = "  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            self.meters[k].update(v.item() if torch.is_tensor(v) else float(v))

    def __getattr__(self, attr):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'MetricLogger' object has no attribute {attr!r}")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq: int, header: str = ""):
        n = len(iterable)
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        width = len(str(n))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i - 1)))
                mem = (f"  max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
                       if torch.cuda.is_available() else "")
                print_main(f"{header} [{i:>{width}}/{n}]  eta: {eta}  {self}  "
                           f"time: {iter_time}  data: {data_time}{mem}")
            end = time.time()
        total = time.time() - start
        print_main(f"{header} Total time: {datetime.timedelta(seconds=int(total))} ({total / max(n, 1):.4f} s / it)")


def logged_epochs(output_dir: str) -> set:
    """The epochs that output_dir/log.txt has a line for (empty without the file)."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isfile(path):
        return set()
    epochs = set()
    with open(path) as f:
        for line in f:
            try:
                epochs.add(json.loads(line)["epoch"])
            except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write, or not ours
                continue
    return epochs


def append_log(output_dir: str, stats: dict) -> None:
    """Append one JSON object to output_dir/log.txt on rank 0."""
    if is_main_process() and output_dir:
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(stats) + "\n")


def git_description() -> str:
    """sha and dirty state of the code, for the log (empty outside a git checkout)."""
    cwd = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD"], cwd=cwd, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"sha: {sha}{', uncommitted changes' if dirty else ''}" if sha else ""

