"""FGSM (Goodfellow et al. 2015) over an epsilon grid, in [0, 1] pixel space.

One gradient of the cross-entropy per batch, reused for every epsilon: x_adv = clamp(x + eps *
sign(grad), 0, 1). Epsilons are therefore comparable across datasets (the thesis code attacked
normalized inputs without clamping). Cost per batch: one forward and one backward pass, plus one
forward per non-zero epsilon (eps = 0 reuses the clean predictions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def fgsm_predictions(
    classify: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    epsilons: Sequence[float],
) -> torch.Tensor:
    """Predicted classes [E, B] of FGSM images for every epsilon.

    classify: pixels [B,3,H,W] in [0,1] -> logits [B,C] (normalization inside, eval mode);
    x: clean pixels in [0,1]; y: true labels [B]; epsilons in pixel units.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = classify(x)
        # Sum, not mean: the sign of the gradient is what matters, and a sum keeps each
        # image's gradient independent of the batch size.
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    clean = logits.detach().argmax(1)
    direction = grad.sign()
    preds = []
    with torch.no_grad():
        for eps in epsilons:
            if eps == 0:
                preds.append(clean)
                continue
            x_adv = (x.detach() + eps * direction).clamp_(0.0, 1.0)
            preds.append(classify(x_adv).argmax(1))
    return torch.stack(preds)
