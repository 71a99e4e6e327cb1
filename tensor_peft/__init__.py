"""tensor_peft: tensor-based parameter-efficient fine-tuning with fused kernels.

``tensor_peft.ops`` holds the differentiable ops, ``tensor_peft.backends`` the choice of
the backend that runs them, ``tensor_peft.nn`` the adapter layers, and the functions
below put adapters into whole models. Importing the package never initializes CUDA and
never fails because a compiled extension is missing (``python -m tensor_peft info``)."""

__version__ = "0.1.0"

from . import backends, nn, ops  # noqa: E402
from .allocator import SparsityAllocator  # noqa: E402
from .config import (  # noqa: E402
    AdapterConfig,
    FLoRAConfig,
    LieRAConfig,
    LoRAConfig,
    MTLoRAConfig,
    SNELLAConfig,
    SNELLConfig,
)
from .model import (  # noqa: E402
    delete_adapter,
    inject,
    load_adapter,
    merge,
    prepare_for_kbit_training,
    save_adapter,
    set_adapter,
    trainable_parameter_count,
    unload,
    unmerge,
)

__all__ = [
    "AdapterConfig",
    "FLoRAConfig",
    "LieRAConfig",
    "LoRAConfig",
    "MTLoRAConfig",
    "SNELLAConfig",
    "SNELLConfig",
    "SparsityAllocator",
    "backends",
    "delete_adapter",
    "inject",
    "load_adapter",
    "merge",
    "nn",
    "ops",
    "prepare_for_kbit_training",
    "save_adapter",
    "set_adapter",
    "trainable_parameter_count",
    "unload",
    "unmerge",
    "__version__",
]
