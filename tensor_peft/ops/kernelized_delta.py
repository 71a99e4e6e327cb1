"""``kernelized_delta``: the SNELL/SNELLA kernelized low-rank update ΔW_raw (dense).

``out_emb`` ``(H, m, p)`` holds the row vectors b_j^(h), ``in_emb`` ``(H, n, p)`` the
column vectors a_i^(h) (H chunks, rank q = H·p); b_j, a_i are the chunks concatenated.
Kernels κ giving ΔW_raw[j, i]:

- ``piecewise_linear`` (SNELL's released kernel): Σ_h coeff[h]·sqrt(‖b_j^(h) − a_i^(h)‖² + eps)
- ``rbf``: alpha·exp(−beta·‖b_j − a_i‖²) + gamma
- ``sigmoid``: alpha·σ(beta·b_j·a_i) + gamma
- ``linear``: b_j·a_i (plain LoRA)
- ``mixture`` (SNELLA): P + alpha·softmax(P/gamma over j, for each i) + beta, with P the
  piecewise_linear kernel; gamma must be positive (layers keep it so by a softplus): 0 or
  less raises ValueError (a tensor gamma is read for this check, except under
  torch.compile).

Every parameter given as a tensor is differentiable; floats are constants. With m = 0 or
n = 0, ΔW is empty and every gradient zero, without running a backend; H = 0 or p = 0 are
empty sums (b_j·a_i = 0, ‖b_j − a_i‖² = 0) that the backends compute. The backends run
it as their ``kernelized_sparse_delta`` with no sparsification (mode None, k = 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..backends.kernelized_ops import (
    PROBLEM_SCHEMA, KernelProblem, flat_problem, problem_gradients, rebuilt_problem, with_problem,
)  # fmt: skip
from ..backends.registry import run
from ..config import KERNELS, check_choice, check_real
from ._common import check_same_device, check_tensor, compute_dtype, custom_op, prepare, register_backward

# The parameters each kernel (each of config.KERNELS) takes, with their defaults (coeff's
# default depends on H). A kernel takes all of SCALAR_PARAMS or none, and its positive ones
# come last in that order: the adapters build the ops' scalars in one piece (nn.snell).
KERNEL_PARAMS: dict[str, dict[str, float | None]] = {
    "piecewise_linear": {"coeff": None, "eps": 1e-12},
    "rbf": {"alpha": 1.0, "beta": 1.0, "gamma": 0.0},
    "sigmoid": {"alpha": 1.0, "beta": 1.0, "gamma": 0.0},
    "linear": {},
    "mixture": {"coeff": None, "eps": 1e-12, "alpha": 1.0, "beta": 0.0, "gamma": 1.0},
}
SCALAR_PARAMS = ("alpha", "beta", "gamma")
# The parameters that must be positive (ValueError otherwise).
POSITIVE_PARAMS = {"mixture": ("gamma",)}


def default_coeff(chunks: int) -> list[float]:
    """SNELL's chunk coefficients 0.1·(−1)^h: (+0.1, −0.1) for the default H = 2."""
    return [0.1 * (-1) ** h for h in range(chunks)]


@custom_op(
    "kernelized_delta", fake=with_problem(lambda problem: problem.out_emb.new_empty(problem.shape)),
    schema=f"({PROBLEM_SCHEMA}) -> Tensor",
)  # fmt: skip
@with_problem
def _kernelized_delta(problem: KernelProblem) -> Tensor:
    if problem.is_empty:
        return problem.out_emb.new_empty(problem.shape)
    return run("kernelized_sparse_delta", problem.out_emb.device, problem, 0)[0]


@custom_op(
    "kernelized_sparse_delta_backward", fake=with_problem(lambda problem, grad, tau: fake_kernel_grads(problem)),
    schema=f"({PROBLEM_SCHEMA}, Tensor grad, Tensor? tau) -> Tensor[]",
)  # fmt: skip
@with_problem
def kernel_gradients(problem: KernelProblem, grad: Tensor, tau: Tensor | None) -> list[Tensor]:
    """The kernel's gradients from ΔW's (sparsified by ``problem.mode`` with ``tau``, or dense)."""
    if problem.is_empty:  # the loss does not depend on the inputs
        return [torch.zeros_like(t) for t in problem.differentiable()]
    return run("kernelized_sparse_delta_backward", problem.out_emb.device, grad, problem, tau)


def fake_kernel_grads(problem: KernelProblem) -> list[Tensor]:
    return [torch.empty_like(t) for t in problem.differentiable()]


def save_problem(ctx, problem: KernelProblem, *tensors: Tensor | None) -> None:
    """Keep ``problem`` and ``tensors`` on an autograd ``ctx`` for ``saved_problem``."""
    ctx.save_for_backward(*problem.differentiable(), *tensors)
    ctx.kernel, ctx.eps, ctx.mode = problem.kernel, problem.eps, problem.mode


def saved_problem(ctx) -> tuple[KernelProblem, list[Tensor | None]]:
    """(the problem, the other tensors) kept by ``save_problem``, each unpacked once
    (activation checkpointing unpacks a saved tensor once)."""
    out_emb, in_emb, coeff, params, *tensors = ctx.saved_tensors
    return KernelProblem(out_emb, in_emb, ctx.kernel, coeff, params, ctx.eps, ctx.mode), tensors


def _setup_context(ctx, inputs, output):
    save_problem(ctx, rebuilt_problem(inputs)[0])


def _backward(ctx, grad):
    problem, _ = saved_problem(ctx)
    return problem_gradients(*kernel_gradients(*flat_problem(problem, grad.contiguous(), None)))


register_backward(_kernelized_delta, "kernelized_sparse_delta", _setup_context, _backward)


def prepared_problem(op: str | None, problem: KernelProblem) -> KernelProblem:
    """``problem``'s tensors as ``prepare(op, …)`` gives them (params, never half, in the compute dtype)."""
    out_emb, in_emb, coeff, params = prepare(op, *problem.differentiable())
    return problem._replace(out_emb=out_emb, in_emb=in_emb, coeff=coeff, params=params)


def _as_param(value: object, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A kernel parameter as a tensor of ``shape`` (a differentiable view if it was one;
    a number becomes a constant filled on ``like``'s device, in ``like``'s dtype)."""
    if isinstance(value, Tensor):
        tensor = check_tensor(value, name)
        check_same_device({"out_emb": like, name: tensor})
        if tensor.numel() != math.prod(shape):
            raise ValueError(
                f"{name} must have {math.prod(shape)} element(s), got shape {tuple(tensor.shape)}"
            )
        return tensor.reshape(shape)
    if name == "coeff":
        if not isinstance(value, Sequence) or len(value) != shape[0]:
            raise ValueError(f"coeff must hold one coefficient per chunk ({shape[0]}), got {value!r}")
        values = [like.new_full((), check_real(v, "coeff")) for v in value]
        return torch.stack(values) if values else like.new_zeros(0)
    return like.new_full((), check_real(value, name))  # a fill on the device: no host copy, no sync


def _check_positive(value: Tensor, name: str) -> None:
    """ValueError naming ``name`` if ``value`` is 0 or less (NaN passes: it propagates).
    Reads the value (a device sync on a GPU); skipped for meta tensors and under
    torch.compile, which cannot branch on data."""
    if value.device.type == "meta" or torch.compiler.is_compiling():
        return
    if bool(value <= 0):
        raise ValueError(f"{name} must be positive, got {value.item()}")


def check_kernel_inputs(out_emb: object, in_emb: object, kernel: object, kernel_params: dict) -> KernelProblem:
    """The validated problem: out_emb, in_emb, kernel, coeff ``(H,)``, params ``(alpha, beta,
    gamma)``, eps (no sparsification).

    Parameters the kernel does not use are rejected (TypeError); those it uses and that
    were not given take their defaults. Unused slots of coeff/params are zeros."""
    out_emb = check_tensor(out_emb, "out_emb", ndim=3)
    in_emb = check_tensor(in_emb, "in_emb", ndim=3)
    kernel = check_choice(kernel, "kernel", KERNELS)
    chunks, _, width = out_emb.shape
    if in_emb.shape[0] != chunks or in_emb.shape[2] != width:
        raise ValueError(
            f"in_emb must have shape ({chunks}, n, {width}) to match out_emb (H, m, p) = "
            f"{tuple(out_emb.shape)}, got {tuple(in_emb.shape)}"
        )
    check_same_device({"out_emb": out_emb, "in_emb": in_emb})
    accepted = KERNEL_PARAMS[kernel]
    unknown = sorted(set(kernel_params) - set(accepted))
    if unknown:
        raise TypeError(
            f"kernel {kernel!r} takes the parameters {sorted(accepted) or 'none'}; got {unknown}"
        )
    given = {**accepted, **kernel_params}
    # numbers become constants in the compute precision, never rounded to a half type
    like = out_emb.new_empty((), dtype=compute_dtype(out_emb, in_emb))
    coeff = like.new_zeros(chunks)
    if "coeff" in accepted:
        value = given["coeff"] if given["coeff"] is not None else default_coeff(chunks)
        coeff = _as_param(value, "coeff", (chunks,), like)
    scalars = [
        _as_param(given[name], name, (), like) if name in accepted else like.new_zeros(())
        for name in SCALAR_PARAMS
    ]
    for name in POSITIVE_PARAMS.get(kernel, ()):
        _check_positive(scalars[SCALAR_PARAMS.index(name)], name)
    params = torch.stack([s.to(compute_dtype(*scalars)) for s in scalars])
    eps = check_real(given.get("eps", 0.0), "eps")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    check_same_device({"out_emb": out_emb, "coeff": coeff, "params": params})
    return KernelProblem(out_emb, in_emb, kernel, coeff, params, eps)


def kernelized_delta(
    out_emb: Tensor, in_emb: Tensor, kernel: str = "piecewise_linear", **kernel_params
) -> Tensor:
    """Dense ΔW_raw ``(m, n)`` from the embeddings through the kernel ``kernel``.

    kernel_params: ``coeff`` (H chunk coefficients; piecewise_linear, mixture), ``eps``
    (piecewise_linear, mixture), ``alpha``/``beta``/``gamma`` (rbf, sigmoid, mixture).
    Returns out_emb's dtype."""
    problem = check_kernel_inputs(out_emb, in_emb, kernel, kernel_params)
    computed = prepared_problem("kernelized_sparse_delta", problem)
    return _kernelized_delta(*flat_problem(computed)).to(problem.out_emb.dtype)
