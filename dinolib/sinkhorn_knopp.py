"""DINOv2's Sinkhorn-Knopp teacher (its alternative to centering), shared by the [CLS] and the iBOT patch losses."""
import torch

from dinolib.process_group import all_reduce_max, all_reduce_sum


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, n_samples,
                   n_iterations: int = 3) -> torch.Tensor:
    """The teacher's distributions as a Sinkhorn-Knopp assignment of all processes' samples to the K prototypes:
    each prototype receives about n_samples / K of them and each sample's assignment sums to 1. (N, K) in, the
    rows of this process; (N, K) out, fp32, no gradient. n_samples is the number of rows over all processes
    (an int, or a one-element tensor on the device: no host sync).

    The matrix exp(teacher_output / teacher_temp), scaled to sum 1, is normalised n_iterations times, first per
    prototype (every process's rows summed) then per sample, as DINOv2 does. exp is taken after subtracting the
    maximum over all processes, a constant that the first normalisation removes: the result is DINOv2's, without
    its overflow when logits / teacher_temp pass 88. Values that would fall under fp32's smallest normal number
    (logits spread by more than 87 x teacher_temp) are raised to it, so that no sample's column is all zeros.
    """
    logits = teacher_output.float() / teacher_temp
    local_max = logits.max().reshape(1) if logits.numel() else logits.new_full((1,), float("-inf"))
    q = torch.exp(logits - all_reduce_max(local_max)).clamp_min_(torch.finfo(torch.float32).tiny)
    q = q.t()  # (K, N)
    n_prototypes = q.shape[0]
    q /= all_reduce_sum(q.sum().reshape(1))
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)) * n_prototypes  # each prototype's total: 1 / K
        q /= q.sum(dim=0, keepdim=True) * n_samples  # each sample's total: 1 / n_samples
    return (q * n_samples).t()
