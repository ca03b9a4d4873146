"""Self-distillation losses: MoCo v3's symmetric InfoNCE and DINO's centred cross-entropy."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpt.models.losses.gather import gather_with_grad, world_info


def moco_infonce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss of queries against the keys of the global batch.

    ``CE(q_n @ k_n.T / T, arange) * 2T`` with L2-normalised rows; on several ranks the keys
    are all-gathered (no gradient flows into keys) and each query's positive is its own key.

    Args:
        q: (B, D) queries (student predictor outputs).
        k: (B, D) keys (teacher projector outputs of the other view).
        temperature: T.

    Returns:
        Scalar loss.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    rank, _ = world_info()
    keys = gather_with_grad(k)
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def moco_v3_loss(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Symmetric MoCo v3 loss ``infonce(q1, k2) + infonce(q2, k1)`` (:func:`moco_infonce`).

    Args:
        q1, q2: (B, D) student predictions of views 1 and 2.
        k1, k2: (B, D) teacher projections of views 1 and 2.
        temperature: Softmax temperature (0.2 in SSL4EO-S12).
    """
    return moco_infonce(q1, k2, temperature) + moco_infonce(q2, k1, temperature)


def dino_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    global_crops: int = 2,
) -> torch.Tensor:
    """DINO's cross-entropy between sharpened, centred teacher and student crop outputs.

    With ``P_t = softmax((t - center) / teacher_temp)`` and
    ``log P_s = log_softmax(s / student_temp)``, the loss averages
    ``sum_k -P_t[k] log P_s[k]`` over the batch and over every pair (teacher crop i, student
    crop v) with ``v != i`` (teacher crops are the global ones, the first student crops).

    Args:
        student: (V * B, K) student logits of V crops, crop-major (global crops first).
        teacher: (global_crops * B, K) teacher logits of the global crops, crop-major.
        center: (K,) or (1, K) running centre of the teacher logits.
        student_temp, teacher_temp: Temperatures (0.1; teacher 0.04 to 0.07).
        global_crops: Number of global crops.

    Returns:
        Scalar loss.
    """
    b = teacher.shape[0] // global_crops
    if teacher.shape[0] != global_crops * b or student.shape[0] % b:
        raise ValueError(f"crop-major outputs expected: {student.shape}, {teacher.shape}")
    s_logp = F.log_softmax(student.float() / student_temp, dim=-1).chunk(student.shape[0] // b)
    t_prob = F.softmax((teacher.float() - center.float()) / teacher_temp, dim=-1).detach()
    total, terms = student.new_zeros((), dtype=torch.float32), 0
    for i, t in enumerate(t_prob.chunk(global_crops)):
        for v, s in enumerate(s_logp):
            if v == i:
                continue
            total = total + (-t * s).sum(dim=-1).mean()
            terms += 1
    return total / terms


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> torch.Tensor:
    """DINO's centre update ``c = m * c + (1 - m) * mean(teacher)``, the mean over all ranks.

    Args:
        center: (1, K) running centre; updated in place and returned.
        teacher: (N, K) teacher logits of this rank's global crops.
        momentum: Centre momentum (0.9).
    """
    batch = teacher.float().sum(dim=0, keepdim=True)
    count = torch.tensor(float(teacher.shape[0]), device=teacher.device)
    if world_info()[1] > 1:
        dist.all_reduce(batch)
        dist.all_reduce(count)
    center.mul_(momentum).add_(batch / count, alpha=1 - momentum)
    return center


__all__ = ["dino_loss", "moco_infonce", "moco_v3_loss", "update_center"]
