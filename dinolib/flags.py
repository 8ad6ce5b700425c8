"""Command-line flags shared by several scripts, their types, and the domains their values must lie in."""
import argparse
import math

import torch

from dinolib.errors import InputError
from vision_transformer import DINOV2_ARCHS, DINOV2_PATCH_SIZE, VIT_ARCHS


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
    """--arch and --patch_size; any name is accepted here and checked by build_model (no network at parse time).
    --patch_size is None when not given: resolve_patch_size(args, patch_size) gives the arch's own."""
    parser.add_argument("--arch", default="vit_small", type=str,
                        help="""Name of architecture: vit_tiny, vit_small, vit_base (deit_tiny and deit_small are
        aliases), a DINOv2 backbone (dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14, each also with _reg:
        4 register tokens; patch size 14), any torchvision model name such as resnet50, or an XCiT name from the
        facebookresearch/xcit hub.""")
    parser.add_argument("--patch_size", default=None, type=int, help=f"""Size in pixels of input square
        patches. When not given: {DINOV2_PATCH_SIZE} for the DINOv2 archs (the only size they have), {patch_size}
        for the others ({patch_size}x{patch_size} patches). Smaller values lead to better performance but require
        more memory. Applies only for ViTs (vit_tiny, vit_small and vit_base); a DINOv2 arch accepts
        {DINOV2_PATCH_SIZE} only.""")


def resolve_patch_size(args: argparse.Namespace, default: int) -> argparse.Namespace:
    """A copy of args whose patch_size is the one given, else the arch's own: 14 for a DINOv2 arch, else default
    (the script's). args itself is left as parsed."""
    resolved = argparse.Namespace(**vars(args))
    if resolved.patch_size is None:
        resolved.patch_size = DINOV2_PATCH_SIZE if resolved.arch in DINOV2_ARCHS else default
    return resolved


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
