"""tensor_peft: tensor-based parameter-efficient fine-tuning with fused kernels.

``tensor_peft.ops`` holds the differentiable ops, ``tensor_peft.backends`` the choice of
the backend that runs them. Importing the package never initializes CUDA and never
fails because a compiled extension is missing (``python -m tensor_peft info`` says why)."""

from . import backends, ops

__version__ = "0.1.0"

__all__ = ["backends", "ops", "__version__"]
