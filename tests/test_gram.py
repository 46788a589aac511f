"""The shared symmetric Gram helper (curvop._gram): exact symmetry and agreement with X Xᵀ."""

import pytest
import torch

from curvop._gram import gram, gram_of_rows, gram_upper_, mirror_upper_

F64 = torch.float64


@pytest.mark.parametrize("d, m", [(50, 7), (1037, 300), (3000, 200)])
def test_gram_equals_the_product_and_is_exactly_symmetric(d, m):
    g = torch.Generator().manual_seed(d)
    X = torch.randn(d, m, dtype=F64, generator=g)
    ref = X @ X.T
    G = gram(X)
    assert torch.equal(G, G.mT)
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-10)
    base = torch.randn(d, d, dtype=F64, generator=g)
    base = base + base.T
    G = gram(X[:, ::2], base.clone())  # strided input, accumulated into a symmetric matrix
    torch.testing.assert_close(G, base + X[:, ::2] @ X[:, ::2].T, rtol=1e-12, atol=1e-10)
    assert torch.equal(G, G.mT)


@pytest.mark.parametrize("d", [40, 1500])
def test_gram_of_rows_sums_chunks(d):
    g = torch.Generator().manual_seed(d)
    chunks = [torch.randn(4, 50, d, dtype=F64, generator=g) for _ in range(3)]
    H = gram_of_rows(iter(chunks), chunks[0], d)
    ref = sum(c.reshape(-1, d).T @ c.reshape(-1, d) for c in chunks)
    assert torch.equal(H, H.mT)
    torch.testing.assert_close(H, ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("d", [30, 1100])
def test_overwrite_ignores_what_out_held(d):
    X = torch.randn(d, 64, dtype=F64, generator=torch.Generator().manual_seed(d))
    out = torch.full((d, d), float("nan"), dtype=F64)  # as an uninitialised buffer may be
    G = mirror_upper_(gram_upper_(out, X, overwrite=True))
    assert torch.equal(G, G.mT)
    torch.testing.assert_close(G, X @ X.T, rtol=1e-12, atol=1e-10)
    assert torch.equal(gram_of_rows(iter(()), X, 5), torch.zeros(5, 5, dtype=F64))
