"""The square roots of the output Hessian Λ that every curvature is built from."""

import pytest
import torch

from curvop.likelihoods import Likelihood, TokenClassification, softmax_hessian_sqrt

F64 = torch.float64


@pytest.mark.parametrize("C", [1, 2, 3, 10])
def test_softmax_hessian_sqrt_has_rank_many_columns(C):
    gen = torch.Generator().manual_seed(C)
    f = 4 * torch.randn(9, C, dtype=F64, generator=gen)
    f[0, 0] = 60.0  # one class at probability 1 - 1e-26: the reflection stays well defined
    f[1] = 0.0  # uniform
    f[2, -1] = 60.0  # the reflected class itself at probability ~1
    p = torch.softmax(f, -1)
    S = softmax_hessian_sqrt(p)
    assert S.shape == (9, C, max(C - 1, 1))
    Lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    torch.testing.assert_close(S @ S.mT, Lam, rtol=0, atol=1e-15)
    assert torch.equal(Likelihood.CLASSIFICATION.sqrt_output_hessian(f), S)
    torch.testing.assert_close(Likelihood.CLASSIFICATION.output_hessian(f), Lam, rtol=0,
                               atol=1e-15)


def test_regression_sqrt_is_the_identity():
    S = Likelihood.REGRESSION.sqrt_output_hessian(torch.zeros(4, 3, dtype=F64))
    assert torch.equal(S, torch.eye(3, dtype=F64).expand(4, 3, 3))


def test_token_sqrt_is_block_diagonal_with_ignored_tokens_zero():
    T, C = 3, 4
    f = torch.randn(2, T * C, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[0, -100, 3], [2, 2, 1]])
    lik = TokenClassification(C)
    S = lik.sqrt_output_hessian(f, y)
    assert S.shape == (2, T * C, T * (C - 1))
    p = torch.softmax(f.reshape(2, T, C), -1)
    blocks = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    blocks[0, 1] = 0  # the ignored token
    dense = torch.zeros(2, T * C, T * C, dtype=F64)
    for t in range(T):
        dense[:, t * C:(t + 1) * C, t * C:(t + 1) * C] = blocks[:, t]
    torch.testing.assert_close(S @ S.mT, dense, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_categorical_is_multinomial_for_one_sample_and_unbiased_for_several(dtype):
    from curvop.likelihoods import sample_categorical

    p = torch.softmax(torch.randn(50, 6, dtype=dtype, generator=torch.Generator().manual_seed(1)),
                      -1)
    got = sample_categorical(p, 1, torch.Generator().manual_seed(3))
    want = torch.multinomial(p, 1, replacement=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    q = torch.tensor([[0.05, 0.15, 0.0, 0.8]], dtype=dtype)
    labels = sample_categorical(q, 40000, torch.Generator().manual_seed(0))
    assert labels.shape == (1, 40000)
    freq = torch.bincount(labels[0], minlength=4).double() / 40000
    assert freq[2] == 0  # a zero-probability class is never drawn
    torch.testing.assert_close(freq, q[0].double(), rtol=0, atol=0.01)  # 5 sigma is < 0.01
