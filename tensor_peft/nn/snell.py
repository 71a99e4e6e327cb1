"""SNELL / SNELLA: a kernelized low-rank update sparsified by competition (Shen et al.,
NeurIPS 2024; SNELLA 2025).

ΔW = sparsify(κ(Out, In), s, mode, threshold) on the weight's matrix view ``(m, n)``: the
embeddings ``Out (H, m, q/H)`` and ``In (H, n, q/H)`` give ΔW_raw[j, i] = κ(b_j, a_i) (see
``ops.kernelized_delta``), and only the entries with the largest |ΔW_raw| survive (a
fraction ``s`` is zeroed, counted by the ``threshold`` rule, see ``ops.sparsify``). With
``sparsity=None`` nothing is sparsified: ΔW = κ(Out, In), the released code's kernelized
LoRA. Init: kaiming-uniform(a=√5) of each embedding, as in the papers, so ΔW is small but
NOT zero: unlike the other methods, the layer does not start exactly equal to its base.

The ``mixture`` kernel P + α·softmax_j(P/γ) + β starts at α = 1, γ = 1 as in the released
code, but at β = −1/m instead of its 0: each column of the softmax sums to 1, so with β = 0
every entry of ΔW_raw gets about +1/m, a shift of the same sign in every weight that
changes the layer's output at init by tens of percent. β = −α/m removes the term's mean
over j, leaving only α·(softmax − 1/m) ≈ (P − mean_j P)/(γm), small like P; α starting at
0 would also start near W0, but would give γ and the softmax path no gradient at first.

Training memory is the point of the method, so the layer never keeps anything of size
m×n for backward: ΔW comes from ``ops.kernelized_sparse_delta`` (which saves only the
embeddings, kernel parameters and τ). A Linear runs as one op (``sparse_linear``) whose
backward rebuilds W0 + ΔW from τ a block of columns at a time (on the cpu backend), and
so does the update's own output x·ΔWᵀ over a base that computes W0·x itself (a quantized
one, or several adapters: ``delta_forward``); a conv rebuilds the effective weight W0 + ΔW
it would save in backward instead (``recomputed_in_backward``), from the τ of the forward
so that no selection runs twice.

SNELLA (``SNELLALayer``) is the same layer with the ``mixture`` kernel whose sparsity is
set per layer during training by ``SparsityAllocator`` (``tensor_peft.allocator``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..backends.kernelized_ops import KernelProblem
from ..config import KERNELS, MODES, THRESHOLDS, check_choice, check_chunks, check_rank, check_sparsity
from ..ops.kernelized_delta import KERNEL_PARAMS, POSITIVE_PARAMS, SCALAR_PARAMS, default_coeff, kernelized_delta
from ..ops.kernelized_sparse_delta import prepared_sparse_linear, softplus_tail, sparse_delta_and_threshold
from ..ops.sparsify import dropped_count
from .base import Adapter, AdapterLayer, adapter_dtype_for, recomputed_in_backward


def learned_params(kernel: str) -> tuple[str, ...]:
    """The parameters of ``kernel`` (``ops.kernelized_delta.KERNEL_PARAMS``) an adapter
    learns, in the table's order: all but ``eps``, the op's constant."""
    return tuple(name for name in KERNEL_PARAMS[kernel] if name != "eps")


def is_positive(kernel: str, name: str) -> bool:
    """Whether parameter ``name`` must be positive (mixture's temperature gamma): the
    adapter stores it through a softplus, gamma = softplus(raw)."""
    return name in POSITIVE_PARAMS.get(kernel, ())


def legacy_key(kernel: str, name: str) -> str:
    """The key of scalar ``name`` in adapters saved with a parameter per scalar:
    ``<name>_raw`` for a positive one, else ``name``."""
    return f"{name}_raw" if is_positive(kernel, name) else name


def initial_value(kernel: str, name: str, rows: int) -> float:
    """A learned scalar's start: the op's default, except mixture's beta = −alpha/m (see
    the module doc)."""
    defaults = KERNEL_PARAMS[kernel]
    if (kernel, name) == ("mixture", "beta"):
        return -defaults["alpha"] / max(rows, 1)
    return defaults[name]


class SNELLAdapter(Adapter):
    """Embeddings ``snell_out (H, m, r/H)``, ``snell_in (H, n, r/H)``, the kernel's
    parameters, and the current sparsity (SNELLA's allocator changes it; it is saved
    with the adapter as its extra state, a float64 tensor no dtype cast of the model
    rounds; None, no sparsification, is saved as an empty one).

    The kernel's learned scalars (``scalar_names``, in ``SCALAR_PARAMS`` order) are one
    parameter, ``scalars``, a positive one stored as softplus⁻¹ of its value: a
    parameter each would cost an optimizer's per-tensor loop a step each. Adapters saved
    with a parameter per scalar (``legacy_key``) still load.

    The sparsity is held as a float64 0-dim CPU tensor, ``sparsity_tensor``, that a new
    value overwrites in place: a torch.compile'd model reads it as a graph input and does
    not recompile. It is a plain attribute, not a buffer, so ``model.to(device)`` and
    dtype casts leave it on the CPU in float64, where the ops read it without a sync."""

    def __init__(self, layer: AdapterLayer, r, sparsity, kernel, mode, chunks, learnable_coeff, dropout, dtype,
                 threshold="count"):  # fmt: skip
        super().__init__(dropout)
        self.r = check_rank(r)
        chunks = check_chunks(chunks, self.r)
        self.kernel = check_choice(kernel, "kernel", KERNELS)
        self.mode = check_choice(mode, "mode", MODES)
        self.threshold = check_choice(threshold, "threshold", THRESHOLDS)
        factory = dict(dtype=adapter_dtype_for(layer.weight, dtype), device=layer.weight.device)
        rows, columns = layer.weight.shape[0], layer.weight[0].numel()
        self.snell_out = nn.Parameter(torch.empty(chunks, rows, self.r // chunks, **factory))
        self.snell_in = nn.Parameter(torch.empty(chunks, columns, self.r // chunks, **factory))
        for embedding in (self.snell_out, self.snell_in):
            nn.init.kaiming_uniform_(embedding, a=math.sqrt(5))
        self.uses_coeff = "coeff" in learned_params(kernel)
        if self.uses_coeff:
            coeff = torch.tensor(default_coeff(chunks), **factory)
            if learnable_coeff:
                self.coeff = nn.Parameter(coeff)
            else:
                self.register_buffer("coeff", coeff)
        self.scalar_names = tuple(name for name in SCALAR_PARAMS if name in learned_params(kernel))
        self.positive_scalars = sum(is_positive(kernel, name) for name in self.scalar_names)
        if self.scalar_names:
            values = [initial_value(kernel, name, rows) for name in self.scalar_names]
            stored = [math.log(math.expm1(value)) if is_positive(kernel, name) else value  # softplus⁻¹
                      for name, value in zip(self.scalar_names, values)]  # fmt: skip
            self.scalars = nn.Parameter(torch.tensor(stored, **factory))
        self.sparsity_tensor: Tensor | None = None
        self.sparsity = sparsity

    @property
    def sparsity(self) -> float | None:
        """The fraction of ΔW's entries zeroed (None: no sparsification)."""
        return None if self.sparsity_tensor is None else float(self.sparsity_tensor)

    @sparsity.setter
    def sparsity(self, value: float | None) -> None:
        if value is None:
            self.sparsity_tensor = None
        elif self.sparsity_tensor is None:
            self.sparsity_tensor = torch.tensor(check_sparsity(value), dtype=torch.float64)
        else:
            self.sparsity_tensor.fill_(check_sparsity(value))

    def dropped_count(self, sparsity: float) -> int:
        """The number of ΔW's entries the ops drop at ``sparsity`` (this adapter's rule and dtype)."""
        numel = self.snell_out.shape[1] * self.snell_in.shape[1]
        return dropped_count(sparsity, numel, self.threshold, torch.promote_types(self.snell_out.dtype, torch.float32))

    def get_extra_state(self) -> Tensor:
        return torch.tensor([] if self.sparsity is None else self.sparsity, dtype=torch.float64)

    def set_extra_state(self, state: Tensor) -> None:
        self.sparsity = None if state.numel() == 0 else float(state)

    def upgrade_saved(self, tensors: dict, prefix: str) -> None:
        old = [prefix + legacy_key(self.kernel, name) for name in self.scalar_names]
        if old and prefix + "scalars" not in tensors and all(key in tensors for key in old):
            tensors[prefix + "scalars"] = torch.cat([tensors.pop(key).reshape(1) for key in old])

    def kernel_params(self) -> dict[str, Tensor]:
        """The keyword arguments of ``ops.kernelized_delta`` for this adapter's kernel (the
        learned scalars in ``SCALAR_PARAMS`` order, the positive ones last)."""
        params = {"coeff": self.coeff} if self.uses_coeff else {}
        values = softplus_tail(self.scalars, self.positive_scalars) if self.scalar_names else None
        return params | {name: values[index] for index, name in enumerate(self.scalar_names)}

    def op_problem(self, dtype: torch.dtype) -> KernelProblem:
        """The problem in ``dtype`` for ``prepared_sparse_linear``: the form the ops' checks
        give ``kernel_inputs`` (zeros for what the kernel does not use), except that the last
        ``positive_scalars`` params are as stored (``softplus_tail``, which the op applies);
        built with few operations: a layer's forward runs it every call."""
        out_emb = self.snell_out.to(dtype).contiguous()
        coeff = self.coeff.to(dtype) if self.uses_coeff else out_emb.new_zeros(out_emb.shape[0])
        if self.scalar_names:  # a kernel with scalars learns them all (SCALAR_PARAMS)
            params = self.scalars.to(dtype)
        else:
            params = out_emb.new_zeros(len(SCALAR_PARAMS))
        return KernelProblem(
            out_emb=out_emb, in_emb=self.snell_in.to(dtype).contiguous(), kernel=self.kernel, coeff=coeff.contiguous(),
            params=params, eps=KERNEL_PARAMS[self.kernel].get("eps", 0.0), mode=self.mode,
        )  # fmt: skip

    def kernel_inputs(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The embeddings and the kernel's parameters in ``dtype``."""
        params = {name: value.to(dtype) for name, value in self.kernel_params().items()}
        return self.snell_out.to(dtype), self.snell_in.to(dtype), params

    def delta(self, dtype: torch.dtype, tau: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(ΔW on the matrix view ``(m, n)`` in ``dtype``, its threshold τ, None without
        sparsification). Given the τ of an earlier call (the parameters unchanged since),
        the selection is skipped."""
        out_emb, in_emb, params = self.kernel_inputs(dtype)
        if self.sparsity_tensor is None:
            return kernelized_delta(out_emb, in_emb, self.kernel, **params), None
        return sparse_delta_and_threshold(
            out_emb, in_emb, self.sparsity_tensor, self.kernel, self.mode, tau, self.threshold, **params
        )  # fmt: skip


class SNELLLayer(AdapterLayer):
    """A frozen Linear/Conv1d/Conv2d/Conv3d with SNELL adapters (drop-in replacement).

    ``SNELLLayer(nn.Linear(768, 3072), r=8, sparsity=0.9)``; ``kernel`` one of
    piecewise_linear (default), rbf, sigmoid, linear, mixture; ``mode`` hard or soft;
    ``chunks`` H (must divide r); ``learnable_coeff`` trains piecewise's chunk coefficients;
    ``threshold`` count (default) or quantile (the released code's count, see
    ``ops.sparsify``); ``sparsity=None`` sparsifies nothing."""

    method = "snell"
    no_low_rank_form = "SNELL's sparsified kernelized ΔW has no low-rank form: peft's LoRA (W0 + B·A) cannot hold it"
    default_kernel = "piecewise_linear"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        sparsity: float = 0.9,
        kernel: str | None = None,
        mode: str = "hard",
        chunks: int = 2,
        learnable_coeff: bool = False,
        dropout: float = 0.0,
        adapter_name: str = "default",
        dtype: torch.dtype | None = None,
        threshold: str = "count",
    ):
        super().__init__(
            base_layer, adapter_name, r=r, sparsity=sparsity, kernel=kernel, mode=mode, chunks=chunks,
            learnable_coeff=learnable_coeff, dropout=dropout, dtype=dtype, threshold=threshold,
        )  # fmt: skip

    def _new_adapter(self, kernel: str | None, **options) -> Adapter:
        return SNELLAdapter(self, kernel=self.default_kernel if kernel is None else kernel, **options)

    def delta_weight(self, adapter: Adapter, tau: Tensor | None = None) -> Tensor:
        return self.delta_weight_and_threshold(adapter, tau)[0]

    def base_operation(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """As ``AdapterLayer.base_operation``; an embedding looks up the whole ΔW (or W0 +
        ΔW): ``whole_weight_rows``, whose padding row trains."""
        if self.is_embedding:
            return self.whole_weight_rows(x, weight)
        return super().base_operation(x, weight, bias)

    def delta_weight_and_threshold(self, adapter: Adapter, tau: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        delta, tau = adapter.delta(self.compute_dtype(adapter), tau)
        return delta.reshape(self.weight_shape), tau

    def delta_forward(self, adapter: Adapter, x: Tensor) -> Tensor:
        if self.kind == "linear" and adapter.sparsity_tensor is not None:
            return self.sparse_linear(adapter, x, None)
        delta, tau = self.delta_weight_and_threshold(adapter)
        with recomputed_in_backward(delta, lambda: self.delta_weight(adapter, tau)):
            return self.base_operation(x, delta)

    def sparse_linear(self, adapter: Adapter, x: Tensor, weight: Tensor | None, bias: Tensor | None = None) -> Tensor:
        """``x·(weight + ΔW)ᵀ + bias`` (ΔW alone for ``weight=None``) by the op
        ``sparse_linear``, which keeps nothing m×n for backward."""
        return prepared_sparse_linear(
            adapter.op_problem(self.compute_dtype(adapter)), x, weight, bias, adapter.sparsity_tensor,
            adapter.threshold, adapter.positive_scalars,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        adapter = self.single_active_adapter()
        if adapter is None:
            return super().forward(x)
        if self.kind == "linear" and not self.weight.requires_grad and adapter.sparsity_tensor is not None:
            return self.sparse_linear(adapter, x, self.weight, self.bias)

        def effective_weight(delta: Tensor) -> Tensor:  # merge_weight, with the τ kept for backward
            return (self.weight + delta).to(self.operation_dtype(x))

        delta, tau = self.delta_weight_and_threshold(adapter)
        weight = effective_weight(delta)
        with recomputed_in_backward(weight, lambda: effective_weight(self.delta_weight(adapter, tau))):
            return self.base_operation(x, weight, self.bias)


class SNELLALayer(SNELLLayer):
    """SNELLA: SNELL with the ``mixture`` kernel by default; its sparsity is reallocated
    during training by ``tensor_peft.SparsityAllocator``."""

    method = "snella"
    default_kernel = "mixture"
