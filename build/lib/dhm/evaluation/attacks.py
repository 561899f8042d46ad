"""White-box L-inf attacks over an epsilon grid, in [0, 1] pixel space: FGSM and PGD.

FGSM (Goodfellow et al. 2015): one gradient of the cross-entropy per batch, reused for every
epsilon: x_adv = clamp(x + eps * sign(grad), 0, 1). Epsilons are therefore comparable across
datasets (the thesis code attacked normalized inputs without clamping). Cost per batch: one
forward and one backward pass, plus one forward per non-zero epsilon (eps = 0 reuses the
clean predictions).

PGD (Madry et al. 2018): from a uniform random start in the eps-ball, ``steps`` signed-gradient
steps, each projected back onto the ball and [0, 1]. An image counts as broken when any point
the attacks reached is misclassified: its FGSM point, or a PGD iterate. PGD accuracy is
therefore never above FGSM accuracy on the same images, by construction. Cost: E x steps
forward + backward passes per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Classify = Callable[[torch.Tensor], torch.Tensor]


def _input_grad(classify: Classify, x: torch.Tensor, y: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = classify(x)
        # Sum, not mean: the sign of the gradient is what matters, and a sum keeps each
        # image's gradient independent of the batch size.
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return logits.detach(), grad


def fgsm_predictions(
    classify: Classify, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float]
) -> torch.Tensor:
    """Predicted classes [E, B] of FGSM images for every epsilon.

    classify: pixels [B,3,H,W] in [0,1] -> logits [B,C] (normalization inside, eval mode);
    x: clean pixels in [0,1]; y: true labels [B]; epsilons in pixel units.
    """
    logits, grad = _input_grad(classify, x, y)
    clean = logits.argmax(1)
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


def pgd_predictions(
    classify: Classify,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilons: Sequence[float],
    steps: int,
    step_size: float | None = None,
    *,
    seed: int = 0,
    fgsm_pred: torch.Tensor | None = None,
    random_start: bool = True,
) -> torch.Tensor:
    """Predicted classes [E, B] under PGD for every epsilon (see the module docstring).

    ``step_size`` in pixel units (None: 2.5 * eps / steps). The random start is drawn on the
    CPU from ``seed`` (the caller makes it a function of the batch's images), so results do
    not depend on the device (``random_start=False`` starts at x). ``fgsm_pred`` [E, B]: where
    FGSM already misclassifies, that prediction stands. eps = 0 gives the clean prediction.
    """
    x = x.detach()
    g = torch.Generator().manual_seed(seed)
    preds = []
    clean = None
    for e, eps in enumerate(epsilons):
        if eps == 0 or steps == 0:
            if clean is None:
                with torch.no_grad():
                    clean = classify(x).argmax(1)
            preds.append(clean if eps == 0 else (fgsm_pred[e] if fgsm_pred is not None else clean))
            continue
        alpha = step_size if step_size is not None else 2.5 * eps / steps
        start = torch.empty(x.shape, dtype=x.dtype).uniform_(-eps, eps, generator=g)
        if not random_start:
            start.zero_()
        lo, hi = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        x_adv = torch.max(torch.min(x + start.to(x.device), hi), lo)
        broken = torch.zeros(y.shape, dtype=torch.bool, device=y.device)
        found = torch.zeros_like(y)
        for _ in range(steps):
            logits, grad = _input_grad(classify, x_adv, y)
            pred = logits.argmax(1)
            new = ~broken & (pred != y)
            found = torch.where(new, pred, found)
            broken |= new
            x_adv = torch.max(torch.min(x_adv + alpha * grad.sign(), hi), lo)
        with torch.no_grad():
            pred = classify(x_adv).argmax(1)
        pred = torch.where(broken, found, pred)
        if fgsm_pred is not None:
            pred = torch.where(fgsm_pred[e] != y, fgsm_pred[e], pred)
        preds.append(pred)
    return torch.stack(preds)
