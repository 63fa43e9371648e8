"""The converged logistic-regression probe: its solver against scikit-learn's, its L2 choice on problems whose answer
is known in advance, and its standardisation."""
from __future__ import annotations

import warnings

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from lightning_mim.eval import logreg
from lightning_mim.eval.logreg import fit_logistic_regression, linear_probe, standardiser


def blobs(n: int, dimension: int, classes: int, spread: float, seed: int,
          frequencies: tuple[float, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around `classes` random centres (fixed by `seed`), labels drawn with `frequencies`."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dimension, generator=generator)
    weights = torch.tensor(frequencies) if frequencies is not None else torch.ones(classes)
    labels = torch.multinomial(weights, n, replacement=True, generator=generator)
    return centres[labels] + spread * torch.randn(n, dimension, generator=generator), labels


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_solver_matches_scikit_learn_multinomial_lbfgs(l2: float) -> None:
    features, labels = blobs(300, 8, 4, 1.5, seed=0)
    n = features.shape[0]
    fit = fit_logistic_regression(features, labels, 4, l2, tolerance=1e-6, chunk_size=128)  # 3 chunks
    # the objective (1/n) sum CE + (l2/2) ||W||^2 is scikit-learn's C sum CE + ||W||^2 / 2 with C = 1 / (n l2)
    reference = LogisticRegression(C=1.0 / (n * l2), tol=1e-10, max_iter=10_000).fit(features.double().numpy(),
                                                                                     labels.numpy())
    weight = torch.from_numpy(reference.coef_.T).float()
    assert weight.abs().max() > 0.3  # a fit far from the zero start
    assert torch.allclose(fit.weight, weight, atol=3e-4)
    # the intercepts are unpenalised, so defined up to a common shift: compare them centred
    bias = torch.from_numpy(reference.intercept_).float()
    assert torch.allclose(fit.bias - fit.bias.mean(), bias - bias.mean(), atol=3e-4)
    probabilities = torch.from_numpy(reference.predict_proba(features.double().numpy())).float()
    assert torch.allclose(torch.softmax(fit.logits(features), dim=1), probabilities, atol=3e-4)
    assert torch.equal(fit.logits(features).argmax(1), torch.from_numpy(reference.predict(features.double().numpy())))
    assert fit.converged and fit.gradient < 5e-5


def test_warm_start_reaches_the_same_minimiser() -> None:
    features, labels = blobs(200, 6, 3, 1.0, seed=1)
    cold = fit_logistic_regression(features, labels, 3, 1e-2, tolerance=1e-6)
    warm = fit_logistic_regression(features, labels, 3, 1e-2, tolerance=1e-6,
                                   init=fit_logistic_regression(features, labels, 3, 1e-1))
    assert torch.allclose(cold.weight, warm.weight, atol=2e-4)


def test_the_iteration_cap_warns_and_is_reported() -> None:
    features, labels = blobs(200, 6, 3, 1.0, seed=2)
    with pytest.warns(UserWarning, match="iteration cap 2"):
        fit = fit_logistic_regression(features, labels, 3, 1e-4, max_iter=2)
    assert fit.stop == "cap" and not fit.converged and fit.iterations == 2


def test_standardiser_leaves_constant_features_at_zero() -> None:
    features = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    mean, std = standardiser(features)
    assert torch.equal(mean, torch.tensor([2.0, 5.0])) and torch.equal(std, torch.tensor([1.0, 1.0]))
    assert torch.equal((features - mean) / std, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_one_signal_among_many_noise_dimensions_chooses_the_strong_l2() -> None:
    # 500 fitted samples in 400 dimensions, only the first informative: a weak penalty also fits the 399 noise
    # dimensions (near the interpolation threshold, where its variance peaks); a strong one keeps the weights near
    # the class-mean difference, dominated by the informative dimension
    generator = torch.Generator().manual_seed(3)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 2, (n,), generator=generator)
        features = torch.randn(n, 400, generator=generator)
        features[:, 0] += 2.0 * labels - 1.0
        return features, labels

    (features, labels), (test, test_labels) = sample(1000), sample(2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every fit stops before the iteration cap
        result = linear_probe(features, labels, test, test_labels, 2, l2_grid=(1e-4, 1.0), holdout=0.5,
                              tolerance=1e-6)  # fits to the minimiser, not regularised by stopping early
    assert result["l2"] == 1.0 and result["heldout_top1"][1.0] > result["heldout_top1"][1e-4] + 3.0
    assert 70.0 < result["top1"] < 84.2  # below the Bayes rate of the informative dimension alone


def test_separable_classes_choose_the_weak_l2() -> None:
    # well separated but unbalanced classes: a weak penalty fits them; a very strong one shrinks W until the scores
    # cannot overcome the unpenalised bias towards the frequent class, and the rare ones are lost
    features, labels = blobs(900, 4, 3, 0.3, seed=4, frequencies=(0.8, 0.1, 0.1))
    result = linear_probe(features[:600], labels[:600], features[600:], labels[600:], 3, l2_grid=(1e-5, 1e2),
                          holdout=0.2)
    assert result["l2"] == 1e-5
    assert result["heldout_top1"][1e-5] == 100.0 > result["heldout_top1"][1e2]
    assert result["top1"] == 100.0 and result["top5"] == 100.0  # top-5 of 3 classes: every class


def test_a_held_out_tie_picks_the_strongest_l2() -> None:
    features, labels = blobs(200, 4, 2, 0.1, seed=6)  # every strength separates these
    lines: list[str] = []
    result = linear_probe(features, labels, features, labels, 2, l2_grid=(1e-4, 1e-3, 1e-2), holdout=0.2,
                          log=lines.append)
    assert set(result["heldout_top1"].values()) == {100.0} and result["l2"] == 1e-2
    # one line per fit, strongest first (each warm-starts the next)
    assert [line.split(" (")[0] for line in lines] == [
        "logreg l2=0.01: held-out top-1 100.00", "logreg l2=0.001: held-out top-1 100.00",
        "logreg l2=0.0001: held-out top-1 100.00", "logreg l2=0.01 refitted on all 200 training samples"]


def test_bad_arguments_name_the_fix() -> None:
    features, labels = blobs(20, 3, 2, 1.0, seed=7)
    with pytest.raises(ValueError, match="must be positive"):
        fit_logistic_regression(features, labels, 2, 0.0)
    with pytest.raises(ValueError, match="held-out fraction"):
        linear_probe(features, labels, features, labels, 2, holdout=1.0)
    with pytest.raises(ValueError, match="need features"):
        fit_logistic_regression(features, labels[:5], 2, 1e-3)


def scripted_heldout(monkeypatch, accuracies: list[float]) -> None:
    """The sweep's held-out top-1 values in order (then 50.0 for the final scoring): the sweep's rules on known
    curves, whatever the fits."""
    script = iter(accuracies)
    monkeypatch.setattr(logreg, "_accuracy", lambda logits, labels, k: next(script, 50.0))


def test_the_sweep_stops_after_two_falling_strengths(monkeypatch) -> None:
    features, labels = blobs(100, 3, 2, 1.0, seed=8)
    scripted_heldout(monkeypatch, [70.0, 80.0, 75.0, 74.0, 99.0])
    result = linear_probe(features, labels, features, labels, 2, l2_grid=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1))
    assert result["heldout_top1"] == {1e-4: 74.0, 1e-3: 75.0, 1e-2: 80.0, 1e-1: 70.0}  # 1e-5 never fitted
    assert result["l2"] == 1e-2 and result["sweep"] == "held-out top-1 fell for 2 strengths"


def test_a_best_weakest_strength_still_rising_warns(monkeypatch) -> None:
    features, labels = blobs(100, 3, 2, 1.0, seed=8)
    scripted_heldout(monkeypatch, [70.0, 80.0, 85.0])
    with pytest.warns(UserWarning, match="still rising there: add weaker strengths"):
        result = linear_probe(features, labels, features, labels, 2, l2_grid=(1e-3, 1e-2, 1e-1))
    assert result["l2"] == 1e-3 and result["sweep"] == "rising at the grid end"


def test_the_sweep_stops_where_a_weaker_penalty_no_longer_moves_the_fit() -> None:
    # at this loose tolerance the 1e-6 solution already satisfies 1e-7 (0 iterations from it), so the sweep stops
    # there and never fits 1e-8; 1e-2 -> 1e-6 is a real change of penalty and moves the fit
    features, labels = blobs(200, 4, 2, 0.5, seed=9)
    result = linear_probe(features, labels, features, labels, 2, l2_grid=(1e-8, 1e-7, 1e-6, 1e-2), tolerance=1e-2)
    assert list(result["heldout_top1"]) == [1e-7, 1e-6, 1e-2]
    assert result["sweep"] == "saturated at l2=1e-07"
