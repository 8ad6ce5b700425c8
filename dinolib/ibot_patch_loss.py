"""iBOT's masked-patch loss (Zhou et al., ICLR 2022) as DINOv2 trains it: the student's masked patch tokens against
the teacher's tokens at the same positions of the unmasked crops."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinolib.process_group import all_reduce_sum
from dinolib.sinkhorn_knopp import sinkhorn_knopp


class iBOTPatchLoss(nn.Module):
    """Cross-entropy between the teacher's centred (or Sinkhorn-Knopp), sharpened patch distributions and the
    student's, over the masked patches. Its center is its own, apart from the [CLS] loss's."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The teacher's patch distributions: minus the center, divided by teacher_temp, softmax; fp32.
        (M, K) in, (M, K) out (any leading dimensions), no gradient."""
        return F.softmax((teacher_patch_tokens.float() - self.center.squeeze(0)) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_masked_patches_tensor: torch.Tensor, n_iterations: int = 3) -> torch.Tensor:
        """Sinkhorn-Knopp over the masked patches of all processes: (M, K) in, (M, K) out, fp32, no gradient.
        n_masked_patches_tensor, this process's M, is summed over processes, as DINOv2 does (each process masks
        its own number of patches)."""
        n_samples = all_reduce_sum(n_masked_patches_tensor.detach().to(teacher_output.device, torch.float32, copy=True))
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples, n_iterations)

    def forward_masked(self, student_patch_tokens_masked: torch.Tensor, teacher_patch_tokens_masked: torch.Tensor,
                       student_masks_flat: torch.Tensor, n_masked_patches: int = None,
                       masks_weight: torch.Tensor = None) -> torch.Tensor:
        """sum over masked patches of masks_weight * H(teacher, student), divided by the number of crops.

        student_patch_tokens_masked (M, K): the student head's outputs on the masked patches;
        teacher_patch_tokens_masked (M, K): the teacher's distributions there; student_masks_flat (n_crops, N)
        bool, whose rows count the crops, masked or not. masks_weight (M,) is 1 / (masked patches of the patch's
        crop) when None, so every masked crop weighs the same and the loss is the mean over crops of each crop's
        mean cross-entropy (0 for crops without masks). n_masked_patches keeps the first so many rows (DINOv2 pads
        to a fixed size).
        """
        log_p = F.log_softmax(student_patch_tokens_masked.float() / self.student_temp, dim=-1)
        loss = torch.sum(teacher_patch_tokens_masked * log_p, dim=-1)  # (M,), minus the cross-entropies
        if masks_weight is None:
            masks_weight = ((1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                            .expand_as(student_masks_flat)[student_masks_flat])
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """EMA of the mean teacher patch output. As DINOv2's: each process's mean over its masked patches, averaged
        over the processes (not the mean over all processes' patches, which weighs a process by its patch count).
        A process without masked patches in this step contributes nothing (DINOv2's mean would be 0 / 0)."""
        tokens = teacher_patch_tokens.float().reshape(-1, teacher_patch_tokens.shape[-1])  # (M, K)
        local_mean = tokens.sum(dim=0) / max(len(tokens), 1)
        has_tokens = local_mean.new_full((1,), float(len(tokens) > 0))
        total = all_reduce_sum(torch.cat((local_mean, has_tokens)))  # (K + 1,): summed means, processes with tokens
        batch_center = (total[:-1] / total[-1].clamp(min=1)).view_as(self.center)
        updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(torch.where(total[-1] > 0, updated, self.center))  # no host sync to ask whether
