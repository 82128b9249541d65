"""Focal loss and class weights.

    criterion = FocalLoss(gamma=2.0, alpha=class_weights(counts))
    loss = criterion(logits, target)          # logits [B, K], target long [B]

`--gamma 0` in train.py is the same class with gamma=0: weighted cross-entropy whose mean is over
samples, so that gradient accumulation stays exact (see FocalLoss).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al., 2017): mean over the batch of α_y · (1 − p_y)^γ · CE.

    The mean is over samples, Σ α_y (1 − p_y)^γ CE / N, as in the focal-loss paper, not the
    Σ w ℓ / Σ w of `F.cross_entropy(weight=…)`: with Σ w in the denominator, four micro-batches of
    different class mixes averaged do not give the gradient of the batch they make up together.
    alpha: per-class weights [K] or None (all 1). label_smoothing ε spreads ε of the target mass
    uniformly over the K classes in the cross-entropy term; (1 − p_y)^γ uses the true class.
    With gamma=0, alpha=None it equals `F.cross_entropy(logits, target, label_smoothing=ε)`.
    """

    def __init__(self, gamma=2.0, alpha=None, label_smoothing=0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, logits, target):
        B, K = logits.shape
        log_p = F.log_softmax(logits.float(), dim=-1)                    # [B, K], fp32 under autocast
        log_p_true = log_p.gather(1, target[:, None]).squeeze(1)          # [B]
        ce = -log_p_true
        if self.label_smoothing:
            ce = (1 - self.label_smoothing) * ce - self.label_smoothing * log_p.mean(dim=-1)
        weight = focal_weight(1 - log_p_true.exp(), self.gamma) if self.gamma else torch.ones_like(ce)
        if self.alpha is not None:
            weight = weight * self.alpha[target]
        return (weight * ce).mean()

    def extra_repr(self):
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}, alpha={self.alpha is not None}"


def focal_weight(q, gamma):
    """(1 - p)^γ from q = 1 - p, with a finite gradient for every γ > 0: where q is 0 (a sample
    predicted with certainty) the weight and its gradient are 0, where d/dq q^γ = γ q^(γ-1) is
    infinite for γ < 1 (the gradient is taken on a safe stand-in there, and then not used)."""
    positive = q > 0
    return torch.where(positive, torch.where(positive, q, 1.0).pow(gamma), 0.0)


def class_weights(counts):
    """Inverse square root of class frequency, scaled so that the mean weight over the training
    samples is 1 (Σ_c n_c w_c = N): the loss keeps the scale of the unweighted one, so learning
    rates carry over. A class with no samples gets weight 0. counts: [K] samples per class."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    weights = torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))
    return (weights * counts.sum() / (weights * counts).sum()).float()
