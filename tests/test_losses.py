"""losses.py: focal loss against cross-entropy and a hand-computed value; class weights."""

import math

import torch
import torch.nn.functional as F

from losses import FocalLoss, class_weights

MELD_TRAIN_COUNTS = [4710, 1205, 268, 683, 1743, 271, 1109]  # meld.EMOTIONS order


def test_gamma_zero_uniform_weights_is_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(32, 7, requires_grad=True), torch.randint(0, 7, (32,))
    ours, reference = FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(reference, logits)[0])
    smoothed = FocalLoss(gamma=0.0, label_smoothing=0.1)(logits, target)
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, target, label_smoothing=0.1))


def test_focal_loss_matches_a_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 1])
    alpha = torch.tensor([0.5, 2.0, 1.0])
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = math.exp(1) / (1 + math.exp(1) + math.exp(3))
    expected = (0.5 * (1 - p0) ** 2 * -math.log(p0) + 2.0 * (1 - p1) ** 2 * -math.log(p1)) / 2  # mean over samples
    assert math.isclose(FocalLoss(gamma=2.0, alpha=alpha)(logits, target).item(), expected, rel_tol=1e-6)


def test_mean_is_over_samples_so_micro_batches_add_up():
    torch.manual_seed(1)
    logits, target = torch.randn(16, 7), torch.tensor([0] * 10 + [2, 2, 5, 6, 6, 6])
    criterion = FocalLoss(gamma=2.0, alpha=class_weights(MELD_TRAIN_COUNTS))
    whole = criterion(logits, target)
    parts = sum(criterion(logits[i:i + 4], target[i:i + 4]) for i in range(0, 16, 4)) / 4
    torch.testing.assert_close(whole, parts)


def test_class_weights_on_meld_train_counts():
    w = class_weights(MELD_TRAIN_COUNTS)
    counts = torch.tensor(MELD_TRAIN_COUNTS, dtype=torch.float32)
    assert math.isclose((w * counts).sum().item() / counts.sum().item(), 1.0, rel_tol=1e-6)
    ratio = w / w[0]  # relative to neutral: sqrt(4710 / n_c)
    torch.testing.assert_close(ratio, (counts[0] / counts).sqrt())
    assert w.argmax() == 2 and w.argmin() == 0  # fear rarest, neutral most common
    assert class_weights([5, 0, 5])[1] == 0
