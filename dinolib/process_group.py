"""This process in its process group: rank, world size, rank-0 printing, and the collectives.

Every function works without a process group too (one process: rank 0 of 1, collectives are no-ops), so the
losses, the k-NN and the logger run the same in one process and in many.
"""
import torch
import torch.distributed as dist


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
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a tensor over processes, in place, and return it; a no-op in one process."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not is_dist_avail_and_initialized():
        return t
    buf = t.to(_group_device(t.device))
    dist.all_reduce(buf, op=op)
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
