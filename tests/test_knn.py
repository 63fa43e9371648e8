import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_mim.eval import extract_features, gather_features, knn_accuracy, knn_classify


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# 2-D unit vectors at 0, 90, 180 and 60 degrees; the query points at 0 degrees
BANK = torch.tensor([unit(0), unit(90), unit(180), unit(60)])
BANK_LABELS = torch.tensor([0, 1, 2, 1])
QUERY = torch.tensor([unit(0)])


def test_vote_scores_by_hand():
    # similarities 1, 0, -1, 0.5: the two nearest are the 0-degree (class 0) and the 60-degree (class 1) vectors
    scores = knn_classify(BANK, BANK_LABELS, QUERY, num_classes=3, k=2, temperature=0.5)
    expected = torch.tensor([[math.exp(1 / 0.5), math.exp(0.5 / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected)
    assert scores.argmax(1).item() == 0


def test_k_larger_than_bank_is_clipped():
    scores = knn_classify(BANK, BANK_LABELS, QUERY, num_classes=3, k=100, temperature=0.5)
    expected = torch.tensor([[math.exp(2.0), math.exp(0.0) + math.exp(1.0), math.exp(-2.0)]])
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores, knn_classify(BANK, BANK_LABELS, QUERY, 3, k=4, temperature=0.5))


def test_temperature_changes_the_winner():
    # one class-0 neighbour at 10 degrees against two class-1 neighbours at +-40 degrees:
    # class 1 wins iff 2 exp(cos40/T) > exp(cos10/T), i.e. T > (cos10 - cos40) / ln 2 = 0.316
    bank = torch.tensor([unit(10), unit(40), unit(-40)])
    labels = torch.tensor([0, 1, 1])
    sharp = knn_classify(bank, labels, QUERY, num_classes=2, k=3, temperature=0.07)
    smooth = knn_classify(bank, labels, QUERY, num_classes=2, k=3, temperature=1.0)
    assert sharp.argmax(1).item() == 0 and smooth.argmax(1).item() == 1
    cos10, cos40 = math.cos(math.radians(10)), math.cos(math.radians(40))
    torch.testing.assert_close(smooth, torch.tensor([[math.exp(cos10), 2 * math.exp(cos40)]]))


def test_chunked_equals_unchunked():
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=generator), dim=1)
    labels = torch.randint(0, 7, (300,), generator=generator)
    queries = F.normalize(torch.randn(53, 16, generator=generator), dim=1)
    whole = knn_classify(bank, labels, queries, 7, k=10, chunk_size=10_000)
    for chunk in (1, 7, 52, 53):
        chunked = knn_classify(bank, labels, queries, 7, k=10, chunk_size=chunk)
        # the similarity matmul may round differently per chunk shape (a few ulp, amplified by exp(sim / 0.07))
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)
        assert torch.equal(chunked.argmax(1), whole.argmax(1))


def clusters(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.eye(8)[:4] * 5
    labels = torch.arange(n) % 4
    return F.normalize(centres[labels] + torch.randn(n, 8, generator=generator), dim=1), labels


def test_accuracy_is_100_on_separable_clusters():
    generator = torch.Generator().manual_seed(0)
    bank, bank_labels = clusters(80, generator)
    test, test_labels = clusters(40, generator)
    assert knn_accuracy(bank, bank_labels, test, test_labels, num_classes=4) == {"top1": 100.0}


def test_accuracy_is_chance_on_random_labels():
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(2000, 32, generator=generator), dim=1)
    test = F.normalize(torch.randn(1000, 32, generator=generator), dim=1)
    result = knn_accuracy(bank, torch.randint(0, 10, (2000,), generator=generator), test,
                          torch.randint(0, 10, (1000,), generator=generator), num_classes=10)
    assert set(result) == {"top1", "top5"}
    assert 6.0 < result["top1"] < 14.0
    assert 44.0 < result["top5"] < 56.0


def batches(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 3-D float64 features whose labels are the running sample index."""
    generator = torch.Generator().manual_seed(0)
    out, start = [], 0
    for size in sizes:
        out.append((torch.randn(size, 3, dtype=torch.float64, generator=generator), torch.arange(start, start + size)))
        start += size
    return out


def test_extract_features_normalises_and_returns_float32_on_cpu():
    loader = batches([4, 3])
    features, labels = extract_features(lambda x: 2 * x, loader, "cpu")
    assert features.dtype == torch.float32 and labels.dtype == torch.int64 and features.device.type == "cpu"
    torch.testing.assert_close(features.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(features, F.normalize(torch.cat([x for x, _ in loader]).float(), dim=1))


def test_extract_features_without_normalize_keeps_the_raw_features():
    loader = batches([4, 3])
    features, _ = extract_features(lambda x: 2 * x, loader, "cpu", normalize=False)
    torch.testing.assert_close(features, 2 * torch.cat([x for x, _ in loader]).float())


def test_extract_features_runs_without_grad():
    grad_enabled = []

    def feature_fn(images):
        grad_enabled.append(torch.is_grad_enabled())
        assert not torch.is_inference_mode_enabled()
        return images

    extract_features(feature_fn, batches([2, 2]), "cpu")
    assert grad_enabled == [False, False]


def test_rank_sharding_covers_every_batch_once():
    loader = batches([4, 3, 5, 2, 4, 1, 3])
    seen = []
    for rank in range(2):
        _, labels = extract_features(lambda x: x, loader, "cpu", rank=rank, world_size=2)
        seen.append(labels)
    assert seen[0].tolist() == [0, 1, 2, 3] + [7, 8, 9, 10, 11] + [14, 15, 16, 17] + [19, 20, 21]
    assert sorted(torch.cat(seen).tolist()) == list(range(22))
    features, labels = extract_features(lambda x: x, loader, "cpu", rank=9, world_size=10)
    assert features.shape == (0, 0) and labels.shape == (0,)


def test_gather_is_a_no_op_for_world_size_one():
    features, labels = torch.randn(5, 3), torch.arange(5)
    for kwargs in ({}, {"world_size": 1}, {"world_size": 1, "all_gather": lambda t: t.unsqueeze(0)}):
        gathered_features, gathered_labels = gather_features(features, labels, **kwargs)
        assert gathered_features is features and gathered_labels is labels


def test_gather_without_a_backend_fails_clearly():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        gather_features(torch.randn(2, 3), torch.arange(2), world_size=2)


def _gather_worker(rank: int, world_size: int, tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=rank, world_size=world_size)
    try:
        uneven = extract_features(lambda x: x, batches([3, 2, 4]), "cpu", rank=rank, world_size=world_size)
        one_rank_empty = extract_features(lambda x: x, batches([3]), "cpu", rank=rank, world_size=world_size)
        torch.save((gather_features(*uneven), gather_features(*one_rank_empty)), tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_over_two_gloo_processes(tmp_path):
    # fork, not spawn: the children need not import torch again, which keeps the test at about a second
    context = mp.get_context("fork")
    processes = [context.Process(target=_gather_worker, args=(rank, 2, tmp_path)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    assert [process.exitcode for process in processes] == [0, 0]
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    cases = (([3, 2, 4], [0, 1, 2, 5, 6, 7, 8, 3, 4]), ([3], [0, 1, 2]))  # rank 0's batches, then rank 1's
    for case, (sizes, order) in enumerate(cases):
        reference_features, reference_labels = extract_features(lambda x: x, batches(sizes), "cpu")
        for rank in range(2):
            features, labels = results[rank][case]
            assert labels.tolist() == reference_labels[order].tolist()
            torch.testing.assert_close(features, reference_features[order])
