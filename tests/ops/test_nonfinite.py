"""One rule for non-finite inputs on every backend (issue 15, item 11; docs/guarantees.md):
every backend gives non-finite values exactly where the reference does, which writes each
formula directly in IEEE arithmetic: a non-finite input propagates through sums, products
and square roots (0·inf = NaN, inf − inf = NaN), and saturating functions give finite
values (exp(−inf) = 0, σ(±inf) = 1 or 0). Which of ±inf and NaN may differ between backends
(the order of a sum decides whether inf meets −inf), never finite against non-finite; the
finite entries agree. In particular:

- ``sparsify``: NaN counts as the largest magnitude in the selection; a non-finite entry's
  output and gradient are non-finite, kept or dropped (the derivative's factor times 0).
- ``matrix_exp``: a matrix with a non-finite entry gives NaN everywhere (result and
  gradient); a finite matrix whose exponential overflows gives non-finite entries."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops

from ..conftest import DEVICES

INF, NAN = float("inf"), float("nan")
OTHERS = [(name, device) for device in DEVICES for name in backends.available(device) if name != "reference"]


def _randn(g, *shape, grad=True):
    return torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def _poisoned(tensor, index, value):
    tensor = tensor.detach().clone()
    tensor[index] = value
    return tensor.requires_grad_(True)


def _kernelized(kernel, tensor, value, **params):
    def make(g):
        out_emb, in_emb = _randn(g, 2, 5, 3), _randn(g, 2, 4, 3)
        if tensor == "out":
            out_emb = _poisoned(out_emb, (1, 2, 0), value)
        else:
            in_emb = _poisoned(in_emb, (0, 1, 2), value)
        return ops.kernelized_delta, (out_emb, in_emb), {"kernel": kernel, **params}

    return make


def _tucker_core(value):
    def make(g):
        core = _poisoned(_randn(g, 3, 2), (1, 0), value)
        return ops.tucker_delta, (core, [_randn(g, 5, 3), _randn(g, 4, 2)]), {"scale": 1.5}

    return make


def _tucker_factor(value):
    def make(g):
        factors = [_randn(g, 5, 3), _poisoned(_randn(g, 4, 2), (2, 1), value)]
        return ops.tucker_delta, (_randn(g, 3, 2), factors), {}

    return make


def _hadamard(exp, tensor, value):
    def make(g):
        weight, B, A = _randn(g, 6, 5, grad=False), _randn(g, 6, 2), _randn(g, 2, 5)
        if tensor == "weight":
            weight = weight.clone()
            weight[3, 1] = value
        elif tensor == "B":
            B = _poisoned(B, (4, 0), value)
        else:
            A = _poisoned(A, (1, 3), value)
        return ops.lowrank_hadamard_merge, (weight, B, A, 0.5), {"exp": exp}

    return make


def _sparsify(mode, value, sparsity):
    def make(g):
        delta = _poisoned(_randn(g, 5, 4), (2, 3), value)
        return ops.sparsify, (delta, sparsity), {"mode": mode}

    return make


def _matrix_exp(value):
    def make(g):
        A = _poisoned(_randn(g, 3, 4, 4), (1, 2, 0), value)
        return ops.matrix_exp, (A,), {}

    return make


def _sparse(kernel, mode, value):
    def make(g):
        out_emb = _poisoned(_randn(g, 2, 5, 3), (0, 3, 1), value)
        return ops.kernelized_sparse_delta, (out_emb, _randn(g, 2, 4, 3), 0.5), {"kernel": kernel, "mode": mode}

    return make


CASES = {
    "tucker-inf-core": _tucker_core(INF),
    "tucker-nan-factor": _tucker_factor(NAN),
    "hadamard-exact-inf-weight": _hadamard("exact", "weight", INF),
    "hadamard-exact-nan-A": _hadamard("exact", "A", NAN),
    "hadamard-taylor1-inf-B": _hadamard("taylor1", "B", INF),
    "matrix_exp-inf": _matrix_exp(INF),
    "matrix_exp-nan": _matrix_exp(NAN),
    "sparsify-hard-nan-dropped": _sparsify("hard", NAN, 0.99),
    "sparsify-soft-nan-kept": _sparsify("soft", NAN, 0.3),
    "sparsify-hard-inf": _sparsify("hard", INF, 0.5),
    "sparsify-soft-inf-dropped": _sparsify("soft", -INF, 1.0),
    **{f"{kernel}-{value}-{tensor}": _kernelized(kernel, tensor, value)
       for kernel in ("piecewise_linear", "rbf", "sigmoid", "linear", "mixture")
       for tensor, value in (("out", INF), ("in", NAN))},
    "sparse-piecewise-hard-inf": _sparse("piecewise_linear", "hard", INF),
    "sparse-rbf-soft-nan": _sparse("rbf", "soft", NAN),
}  # fmt: skip

def _results(make, backend):
    op, args, kwargs = make(torch.Generator().manual_seed(0))
    inputs = [t for a in [*args, *kwargs.values()] for t in (a if isinstance(a, list) else [a])]
    inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with backends.use(backend):
        out = op(*args, **kwargs)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        grads = torch.autograd.grad(out, inputs, upstream)
    return [out.detach(), *grads]


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("backend,device", OTHERS)
def test_non_finite_inputs_follow_the_rule(case, backend, device):
    expected = _results(CASES[case], "reference")
    got = _results(CASES[case], backend)
    assert any(not torch.isfinite(t).all() for t in expected), "the case must produce a non-finite value"
    for index, (g, e) in enumerate(zip(got, expected)):
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(g), finite), f"result {index}: non-finite entries differ"
        torch.testing.assert_close(g[finite], e[finite], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["matrix_exp-inf", "matrix_exp-nan"])
def test_matrix_with_a_non_finite_entry_gives_nan_everywhere(case):
    out, grad = _results(CASES[case], "reference")
    assert torch.isnan(out[1]).all() and torch.isnan(grad[1]).all()
    assert torch.isfinite(out[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), *OTHERS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrix_exp_overflow_is_non_finite_not_an_error(backend, device, dtype):
    A = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    A = A * (1e30 / torch.linalg.matrix_norm(A, ord=1))[:, None, None]
    with backends.use(backend):
        out = ops.matrix_exp(A.to(device))
    assert not torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all()


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), *OTHERS])
def test_a_nan_gradient_of_a_dropped_entry_stays_nan(backend, device):
    """The reported discrepancy: sparsify's gradient at a NaN entry was 0 on cpu."""
    delta = torch.tensor([1.0, NAN, -2.0, 0.5], device=device, requires_grad=True)
    with backends.use(backend):
        ops.sparsify(delta, 0.5, "hard").sum().backward()
    assert torch.isnan(delta.grad[1]) and torch.isfinite(delta.grad[[0, 2, 3]]).all()
