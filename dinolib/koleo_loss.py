"""DINOv2's KoLeo regulariser: the Kozachenko-Leonenko differential entropy estimator (Sablayrolles et al., "Spreading
vectors for similarity search", ICLR 2019), which spreads the features of a batch over the sphere."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class KoLeoLoss(nn.Module):
    """-mean_i log(d_i + eps), d_i the distance from L2-normalised feature i to its nearest neighbour in the batch.

    Per process, as DINOv2 applies it: the neighbours are searched within the rows given, never gathered.
    """

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)  # ||x - y + eps||: DINOv2's distance, eps added inside

    @staticmethod
    @torch.no_grad()
    def pairwise_NNs_inner(x: torch.Tensor) -> torch.Tensor:
        """Index of each row's nearest other row, for L2-normalised rows (the largest inner product)."""
        dots = x @ x.t()  # (B, B)
        dots.fill_diagonal_(-1)  # a row is not its own neighbour; -1 is the least a unit vector can score
        return dots.argmax(dim=1)

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """student_output: (B, D) backbone features of one crop of B images (B >= 2); in fp32 whatever autocast."""
        with torch.autocast(student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            nearest = self.pairwise_NNs_inner(x)
            distances = self.pdist(x, x[nearest])  # (B,)
            return -torch.log(distances + eps).mean()
