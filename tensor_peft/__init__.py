"""tensor_peft: tensor-based parameter-efficient fine-tuning with fused kernels."""

__version__ = "0.1.0"
