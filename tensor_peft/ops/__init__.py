"""Differentiable, backend-dispatched ops, each a ``torch.library`` op
(``tensor_peft::<name>``) with a fake implementation, a registered autograd formula and
per-device kernels chosen by ``tensor_peft.backends``."""

from .kernelized_delta import kernelized_delta
from .kernelized_sparse_delta import kernelized_sparse_delta, sparse_linear
from .lowrank_hadamard_merge import hadamard_linear, lowrank_hadamard_merge
from .matrix_exp import matrix_exp
from .sparsify import sparsify
from .tucker_delta import tucker_delta
from .tucker_merge import tucker_merge

__all__ = [
    "hadamard_linear",
    "kernelized_delta",
    "kernelized_sparse_delta",
    "lowrank_hadamard_merge",
    "matrix_exp",
    "sparse_linear",
    "sparsify",
    "tucker_delta",
    "tucker_merge",
]
