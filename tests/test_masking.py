import pytest
import torch

from lightning_mim.masking import block_masking, gather_tokens, random_masking


def test_random_masking_counts_and_inverse():
    draw = random_masking(3, 196, 0.75, generator=torch.Generator().manual_seed(0))
    assert draw.keep_idx.shape == (3, 49)
    assert torch.all(draw.mask.sum(1) == 147)
    rows = torch.arange(3)[:, None]
    assert torch.all(draw.mask[rows, draw.keep_idx] == 0)
    assert torch.equal(torch.gather(draw.shuffle_idx, 1, draw.restore_idx), torch.arange(196).expand(3, -1))
    # gather then unshuffle is an identity on a marker tensor
    marker = torch.arange(196.0).expand(3, -1)[..., None]
    shuffled = gather_tokens(marker, draw.shuffle_idx)
    assert torch.equal(gather_tokens(shuffled, draw.restore_idx), marker)


def test_random_masking_known_noise():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    draw = random_masking(1, 4, 0.5, noise=noise)
    assert draw.keep_idx.tolist() == [[1, 3]]
    assert draw.mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_random_masking_reproducible_from_seed():
    a = random_masking(2, 64, 0.6, generator=torch.Generator().manual_seed(7))
    b = random_masking(2, 64, 0.6, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.mask, b.mask)
    assert a.mask.sum(1).tolist() == [64 - int(64 * 0.4)] * 2


@pytest.mark.parametrize("num_patches, ratio, rule, masked", [
    (9, 0.75, "keep", 7),  # keep int(9 x 0.25) = int(2.25) = 2
    (9, 0.75, "mask", 6),  # mask int(9 x 0.75) = int(6.75) = 6
    (196, 0.75, "keep", 147),  # keep int(196 x 0.25) = 49
    (196, 0.75, "mask", 147),  # mask int(196 x 0.75) = 147
    (196, 0.6, "keep", 118),  # keep int(78.4) = 78
    (196, 0.6, "mask", 117),  # mask int(117.6) = 117
])
def test_random_masking_count_rules(num_patches, ratio, rule, masked):
    noise = torch.rand(2, num_patches, generator=torch.Generator().manual_seed(0))
    draw = random_masking(2, num_patches, ratio, noise=noise, count_rule=rule)
    assert draw.mask.sum(1).tolist() == [float(masked)] * 2
    assert draw.keep_idx.shape == (2, num_patches - masked)
    smallest_noise = torch.argsort(noise, dim=1)[:, :num_patches - masked]  # the kept ones have the smallest noise
    assert torch.equal(draw.keep_idx, smallest_noise)


def test_random_masking_refuses_an_unknown_count_rule():
    with pytest.raises(ValueError, match="unknown count_rule 'masked'"):
        random_masking(1, 9, 0.75, count_rule="masked")


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_bad_mask_ratio(ratio):
    with pytest.raises(ValueError, match=r"mask ratio must lie in \(0, 1\)"):
        random_masking(1, 16, ratio)


def test_block_masking_properties():
    generator = torch.Generator().manual_seed(0)
    masks = block_masking(16, (14, 14), 75, generator=generator)
    assert masks.shape == (16, 196)
    counts = masks.sum(1)
    assert torch.all(counts <= 75) and torch.all(counts >= 60)
    exact = block_masking(16, (14, 14), 75, exact=True, generator=torch.Generator().manual_seed(1))
    assert torch.all(exact.sum(1) == 75)
    again = block_masking(16, (14, 14), 75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_block_masking_is_blockwise():
    # a block mask has far fewer isolated masked patches than a random mask of the same size
    masks = block_masking(32, (14, 14), 75, generator=torch.Generator().manual_seed(3)).reshape(32, 14, 14)
    padded = torch.nn.functional.pad(masks, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    isolated = ((masks == 1) & (neighbours == 0)).sum() / masks.sum()
    assert isolated < 0.02
