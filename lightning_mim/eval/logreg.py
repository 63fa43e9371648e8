"""A linear probe trained to convergence: multinomial logistic regression on frozen, standardised features, fitted
full-batch with L-BFGS (strong-Wolfe line search) on the features' device, its L2 strength chosen on a held-out part
of the training split.

Objective of one fit on n standardised features x_i (rows of X, float32) with labels y_i in 0..K-1:

    L(W, b) = (1 / n) * sum_i CE(x_i W + b, y_i) + (l2 / 2) * ||W||_F^2        (the bias b is not penalised)

which is scikit-learn's `LogisticRegression(C=1 / (n * l2), solver="lbfgs")` objective (C * sum_i CE + ||W||^2 / 2)
divided by n * C: the same minimiser.

Memory: the features live on the device in float32. `fit_logistic_regression` adds the gradient of W and b and, per
`chunk_size` rows, the logits and their gradient (3 x chunk_size x K floats); `linear_probe` holds about three copies
of the N x D training features at once (the raw ones, the standardised fit part and hold-out, then the standardised
whole split): ImageNet-1k with ViT-B (1.28 M x 768) is about 4 GB a copy.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# Down to 1e-8: on the demo encoders' features the held-out top-1 still rose at 1e-6 and stops changing below it (the
# penalty's gradient l2 * W falls under the tolerance, so the fit no longer moves: `saturated`).
DEFAULT_L2_GRID = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# The weakest strengths took 1,000-2,400 L-BFGS iterations on the demo encoders' 128-d features.
DEFAULT_MAX_ITER = 5000
# Stop the strong-to-weak sweep once this many strengths in a row fall below the best held-out top-1.
FALLING_STRENGTHS = 2


@dataclass
class LogisticFit:
    """A fitted classifier on standardised features: logits = x @ weight + bias."""

    weight: Tensor  # (D, K)
    bias: Tensor  # (K,)
    l2: float
    iterations: int
    gradient: float  # the largest entry of the objective's gradient at the solution
    stop: str  # "gradient" (below the tolerance), "stalled" (no decrease left in float32) or "cap" (max_iter)

    @property
    def converged(self) -> bool:
        return self.stop != "cap"

    def logits(self, features: Tensor) -> Tensor:
        return features @ self.weight + self.bias


def _objective_and_gradient(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, l2: float,
                            chunk_size: int) -> Tensor:
    """L(W, b) as a 0-d tensor, its gradient written into weight.grad and bias.grad. Closed form (softmax minus
    one-hot) rather than autograd: the weight gradient is then G^T X, several times faster on the CPU than autograd's
    X^T G, and only chunk_size x K logits exist at a time."""
    n = features.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=features.device)
    weight_grad, bias_grad = torch.zeros_like(weight), torch.zeros_like(bias)
    for start in range(0, n, chunk_size):
        chunk, targets = features[start:start + chunk_size], labels[start:start + chunk_size]
        log_probs = torch.log_softmax(chunk @ weight + bias, dim=1)
        total -= log_probs.gather(1, targets[:, None]).sum().double()
        residual = log_probs.exp_()
        residual[torch.arange(targets.shape[0], device=targets.device), targets] -= 1.0
        weight_grad += (residual.T @ chunk).T
        bias_grad += residual.sum(dim=0)
    weight.grad = weight_grad.div_(n).add_(weight, alpha=l2)
    bias.grad = bias_grad.div_(n)
    return (total / n + 0.5 * l2 * weight.double().pow(2).sum()).float()


def fit_logistic_regression(features: Tensor, labels: Tensor, num_classes: int, l2: float,
                            max_iter: int = DEFAULT_MAX_ITER,
                            tolerance: float = 1e-4, init: LogisticFit | None = None,
                            chunk_size: int = 65536) -> LogisticFit:
    """Minimise the module's objective by full-batch L-BFGS on the device of `features` (float32, already
    standardised). Stops when the largest gradient entry is below `tolerance` (the default is scikit-learn's `tol`
    for lbfgs, on the same per-sample-mean objective), when the loss no longer decreases at
    float32 precision (the function values then cannot guide the line search any further), or after `max_iter`
    iterations, warning in that last case. `init` warm-starts from another fit (the minimiser is unique for
    l2 > 0, so only the time changes)."""
    if l2 <= 0:
        raise ValueError(f"the L2 strength must be positive (the minimiser is unique), got {l2}")
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"need features (N, D) and labels (N,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    features = features.float()
    labels = labels.to(features.device, torch.int64)
    if init is None:
        weight = torch.zeros(features.shape[1], num_classes, device=features.device)
        bias = torch.zeros(num_classes, device=features.device)
    else:
        weight, bias = init.weight.clone(), init.bias.clone()
    max_evals = 2 * max_iter
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=max_evals,
                                  tolerance_grad=tolerance, tolerance_change=0.0, history_size=20,
                                  line_search_fn="strong_wolfe")
    optimizer.step(lambda: _objective_and_gradient(features, labels, weight, bias, l2, chunk_size))
    state = optimizer.state[weight]
    iterations = int(state["n_iter"])
    _objective_and_gradient(features, labels, weight, bias, l2, chunk_size)
    gradient = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
    if gradient <= tolerance:
        stop = "gradient"
    elif iterations >= max_iter or int(state["func_evals"]) >= max_evals:
        stop = "cap"
        warnings.warn(f"logistic regression (l2={l2:g}) stopped at the iteration cap {max_iter} with gradient "
                      f"{gradient:.1e} > tolerance {tolerance:.0e}: raise --logreg-max-iter", stacklevel=2)
    else:
        stop = "stalled"
    return LogisticFit(weight, bias, l2, iterations, gradient, stop)


def standardiser(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std (population) of `features`; a constant feature gets std 1 (it becomes 0)."""
    mean = features.mean(dim=0)
    std = features.std(dim=0, correction=0)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return 100.0 * float((top == labels[:, None]).any(dim=1).float().mean())


def _describe(fit: LogisticFit, start: float) -> str:
    return (f"{fit.iterations} iterations, stop: {fit.stop}, gradient {fit.gradient:.1e}, "
            f"{time.perf_counter() - start:.1f} s")


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int, l2_grid: tuple[float, ...] = DEFAULT_L2_GRID, holdout: float = 0.1,
                 seed: int = 0, max_iter: int = DEFAULT_MAX_ITER, tolerance: float = 1e-4,
                 device: torch.device | str | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, object]:
    """The converged linear probe: hold out a seeded `holdout` fraction of the training split, fit on the rest at
    every L2 strength of `l2_grid` (standardised with the fit part's mean / std), pick the strength with the best
    held-out top-1 (the strongest one on a tie), refit on the whole training split (standardised with its own
    mean / std, which also standardise the test set) and score the test set.

    The sweep runs from the strongest strength to the weakest and ends early when a weaker strength no longer moves
    the fit (0 iterations from the previous solution: `saturated`, every weaker strength would give the same fit)
    or when the held-out top-1 has fallen below its best for FALLING_STRENGTHS strengths in a row; a best held-out
    top-1 at the weakest strength, still rising, warns.

    Returns top1 and top5 (top-k over min(5, K) classes) in percent, the chosen `l2`, `heldout_top1` (strength ->
    held-out top-1, for the strengths fitted), `sweep` (how the sweep ended) and the final fit's `iterations`,
    `stop` and `gradient` (`LogisticFit`). Runs on `device` (default: the features'). `log`, when given, receives one
    line per fit.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {holdout}")
    if not l2_grid:
        raise ValueError("the L2 grid is empty: give at least one strength")
    device = train_features.device if device is None else torch.device(device)
    x = train_features.to(device, torch.float32)
    y = train_labels.to(device, torch.int64)
    n = x.shape[0]
    held = max(1, math.ceil(holdout * n))
    if held >= n:
        raise ValueError(f"{n} training samples leave nothing to fit after holding out {held}: use more data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    fit_index, held_index = order[held:], order[:held]
    mean, std = standardiser(x[fit_index])
    fit_x, held_x = (x[fit_index] - mean) / std, (x[held_index] - mean) / std
    fit_y, held_y = y[fit_index], y[held_index]

    heldout_top1: dict[float, float] = {}
    previous: LogisticFit | None = None
    sweep = "grid end"
    for l2 in sorted(l2_grid, reverse=True):  # strong to weak: each fit warm-starts the next, slower-to-fit one
        start = time.perf_counter()
        fit = fit_logistic_regression(fit_x, fit_y, num_classes, l2, max_iter, tolerance, init=previous)
        heldout_top1[l2] = _accuracy(fit.logits(held_x), held_y, 1)
        if log is not None:
            log(f"logreg l2={l2:g}: held-out top-1 {heldout_top1[l2]:.2f} ({_describe(fit, start)})")
        weaker = [strength for strength in l2_grid if strength < l2]
        if previous is not None and fit.iterations == 0 and weaker:
            # the weaker penalty left the previous solution within the tolerance: so would every weaker one
            sweep = f"saturated at l2={l2:g}"
            break
        best = max(heldout_top1.values())
        recent = list(heldout_top1.values())[-FALLING_STRENGTHS:]
        if len(recent) == FALLING_STRENGTHS and all(accuracy < best for accuracy in recent) and weaker:
            sweep = f"held-out top-1 fell for {FALLING_STRENGTHS} strengths"
            break
        previous = fit
    del fit_x, held_x
    best = max(heldout_top1.values())
    chosen = max(l2 for l2, accuracy in heldout_top1.items() if accuracy == best)
    if sweep == "grid end" and chosen == min(l2_grid) and len(heldout_top1) > 1 and \
            heldout_top1[chosen] > max(accuracy for l2, accuracy in heldout_top1.items() if l2 != chosen):
        warnings.warn(f"logistic regression: the weakest L2 of the grid ({chosen:g}) has the best held-out top-1 and "
                      f"the accuracy was still rising there: add weaker strengths to --logreg-l2", stacklevel=2)
        sweep = "rising at the grid end"

    mean, std = standardiser(x)
    start = time.perf_counter()
    final = fit_logistic_regression((x - mean) / std, y, num_classes, chosen, max_iter, tolerance)
    if log is not None:
        log(f"logreg l2={chosen:g} refitted on all {n} training samples ({_describe(final, start)})")
    logits = final.logits((test_features.to(device, torch.float32) - mean) / std)
    targets = test_labels.to(device, torch.int64)
    return {"top1": _accuracy(logits, targets, 1), "top5": _accuracy(logits, targets, 5), "l2": chosen,
            "heldout_top1": dict(sorted(heldout_top1.items())), "sweep": sweep, "iterations": final.iterations,
            "stop": final.stop, "gradient": final.gradient}
