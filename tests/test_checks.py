"""adsparse.checks: the one block_size normalizer and the one density check."""

import pytest
import torch

from adsparse.checks import MAX_BLOCK_DIM, check_block_size, check_density


@pytest.mark.parametrize("value, expected", [
    (16, (16, 16)), ((16, 8), (16, 8)), ([4, 4], (4, 4)), ("16", (16, 16)), ("16x8", (16, 8)),
    ("16,8", (16, 8)), (torch.tensor([8, 4]), (8, 4)), ((MAX_BLOCK_DIM, 1), (MAX_BLOCK_DIM, 1)),
])
def test_block_size_normalized(value, expected):
    out = check_block_size(value)
    assert out == expected and all(type(s) is int for s in out)


@pytest.mark.parametrize("value", [0, -1, (0, 4), 2**63, (2**63, 1), MAX_BLOCK_DIM + 1, True,
                                   16.0, (16.0, 16), "a", "1x2x3", (1, 2, 3), (), None])
def test_block_size_refused_with_value_error(value):
    with pytest.raises(ValueError, match="block_size"):
        check_block_size(value)


def test_block_size_names_the_argument():
    with pytest.raises(ValueError, match="--block-size"):
        check_block_size(0, name="--block-size")


@pytest.mark.parametrize("value", [1, 1.0, 0.5, 1e-6])
def test_density_accepted(value):
    assert check_density(value) == float(value) and type(check_density(value)) is float


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.0001, float("nan"), float("inf"), True, "0.5",
                                   None])
def test_density_refused_with_value_error(value):
    with pytest.raises(ValueError, match="density"):
        check_density(value)
