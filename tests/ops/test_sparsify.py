"""The competition sparsification through the public ops: how many entries drop, the
threshold above 2^24 entries, and the gradients with τ (and hard mode's |ΔW|) held constant."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops
from tensor_peft.backends import registry
from tensor_peft.ops.kernelized_delta import check_kernel_inputs
from tensor_peft.ops.kernelized_sparse_delta import sparse_delta_and_threshold, sparse_linear
from tensor_peft.ops.sparsify import dropped_count

from ..conftest import backends_with
from ..naive import naive_sparsify


@pytest.mark.parametrize(
    "sparsity,numel,expected",
    [(0.9, 10, 9), (0.3, 10, 3), (0.7, 10, 7), (0.0, 17, 0), (1.0, 17, 17), (0.5, 7, 4), (1 / 3, 9, 3)],
)
def test_dropped_count_is_the_ceiling_of_the_written_fraction(sparsity, numel, expected):
    assert dropped_count(sparsity, numel) == expected


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9, 1.0])
def test_sparsify_and_its_gradient_match_a_sort_based_formula(mode, sparsity):
    generator = torch.Generator().manual_seed(11)
    delta = torch.randn(13, 9, generator=generator, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(13, 9, generator=generator, dtype=torch.float64)
    out = ops.sparsify(delta, sparsity, mode=mode)
    expected = naive_sparsify(delta, sparsity, mode)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out, delta, upstream)
    (expected_grad,) = torch.autograd.grad(expected, delta, upstream)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_kernelized_sparse_delta_equals_sparsify_of_kernelized_delta(mode):
    """The fused op, forward and gradients, against the composition of the two ops."""
    generator = torch.Generator().manual_seed(12)
    out_emb = torch.randn(2, 11, 3, generator=generator, dtype=torch.float64).requires_grad_()
    in_emb = torch.randn(2, 8, 3, generator=generator, dtype=torch.float64).requires_grad_()
    gamma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(11, 8, generator=generator, dtype=torch.float64)
    inputs = (out_emb, in_emb, gamma)
    fused = ops.kernelized_sparse_delta(out_emb, in_emb, 0.6, "mixture", mode, gamma=gamma)
    composed = naive_sparsify(ops.kernelized_delta(out_emb, in_emb, "mixture", gamma=gamma), 0.6, mode)
    torch.testing.assert_close(fused, composed, rtol=1e-12, atol=1e-12)
    for got, expected in zip(
        torch.autograd.grad(fused, inputs, upstream), torch.autograd.grad(composed, inputs, upstream)
    ):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", ["piecewise_linear", "mixture"])
def test_given_threshold_rebuilds_the_same_delta(kernel):
    """The τ a call returned, given back, rebuilds its ΔW bit for bit (a layer's backward
    relies on it), and the gradients through the rebuilt ΔW are those of the original."""
    generator = torch.Generator().manual_seed(13)
    out_emb = torch.randn(2, 40, 3, generator=generator).requires_grad_()
    in_emb = torch.randn(2, 30, 3, generator=generator).requires_grad_()
    upstream = torch.randn(40, 30, generator=generator)
    delta, tau = sparse_delta_and_threshold(out_emb, in_emb, 0.8, kernel)
    rebuilt, returned = sparse_delta_and_threshold(out_emb, in_emb, 0.1, kernel, tau=tau)
    assert torch.equal(rebuilt, delta) and returned.item() == tau.item()
    assert torch.count_nonzero(delta).item() == 40 * 30 - dropped_count(0.8, 40 * 30)
    for got, expected in zip(
        torch.autograd.grad(rebuilt, [out_emb, in_emb], upstream), torch.autograd.grad(delta, [out_emb, in_emb], upstream)
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


LINEAR_BACKENDS = backends_with("sparse_linear_backward")


@pytest.fixture
def sampling_short_batches(monkeypatch):
    """The cpu kernel samples Γ from a few tokens too (it does from _SAMPLED_MIN_TOKENS)."""
    if backends.why_unavailable("cpu", "cpu") is None:
        from tensor_peft.backends import cpu

        monkeypatch.setattr(cpu, "_SAMPLED_MIN_TOKENS", 1)


@pytest.mark.parametrize("backend,device", LINEAR_BACKENDS, ids=[f"{b}-{d}" for b, d in LINEAR_BACKENDS])
@pytest.mark.parametrize("kernel,mode", [("piecewise_linear", "hard"), ("mixture", "soft"), ("rbf", "hard")])
@pytest.mark.parametrize("sparsity", [0.97, 0.3])  # the cpu kernel samples Γ at 0.97, forms it whole at 0.3
@pytest.mark.usefixtures("sampling_short_batches")
def test_sparse_linear_equals_linear_of_the_merged_weight(backend, device, kernel, mode, sparsity):
    """sparse_linear, forward and every gradient, against F.linear with W0 + ΔW by the
    reference backend (Γ formed whole)."""
    generator = torch.Generator().manual_seed(14)

    def randn(*shape, grad=True):
        tensor = torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)
        return tensor.requires_grad_(grad)

    x, weight, bias = randn(2, 7, 30), randn(40, 30, grad=False), randn(40)
    out_emb, in_emb, alpha = randn(2, 40, 3), randn(2, 30, 3), torch.tensor(0.6, dtype=torch.float64, device=device)
    params = {"alpha": alpha.requires_grad_()} if kernel != "piecewise_linear" else {}
    inputs = [x, bias, out_emb, in_emb, *params.values()]
    upstream = torch.randn(2, 7, 40, generator=generator, dtype=torch.float64).to(device)
    with backends.use(backend):
        got = sparse_linear(x, weight, bias, out_emb, in_emb, sparsity, kernel, mode, **params)
        got_grads = torch.autograd.grad(got, inputs, upstream)
    with backends.use("reference"):
        delta = ops.kernelized_sparse_delta(out_emb, in_emb, sparsity, kernel, mode, **params)
        expected = torch.nn.functional.linear(x, weight + delta, bias)
        expected_grads = torch.autograd.grad(expected, inputs, upstream)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got_t, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_t, want, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="no cpu backend here")
def test_sampled_backward_across_token_tiles_column_blocks_and_row_chunks():
    """The cpu kernel's sampled Γ in tiles of 256 tokens and blocks of 256 columns, over
    chunks of 128 rows: 1100 tokens, 300 columns, 140 rows cross each boundary. Against the
    reference backend."""
    generator = torch.Generator().manual_seed(17)

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    x, weight, out_emb, in_emb = randn(1100, 300), randn(140, 300, grad=False), randn(2, 140, 2), randn(2, 300, 2)
    upstream = torch.randn(1100, 140, generator=generator, dtype=torch.float64)
    gradients = {}
    for backend in ("cpu", "reference"):
        with backends.use(backend):
            y = sparse_linear(x, weight, None, out_emb, in_emb, 0.98, "mixture")
            gradients[backend] = torch.autograd.grad(y, [x, out_emb, in_emb], upstream)
    for got, want in zip(gradients["cpu"], gradients["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", LINEAR_BACKENDS, ids=[f"{b}-{d}" for b, d in LINEAR_BACKENDS])
@pytest.mark.parametrize("trained", ["input", "embeddings", "bias"])
def test_sparse_linear_gives_just_the_gradients_asked_for(backend, device, trained):
    """With only the input, only the embeddings or only the bias asking for a gradient
    (a first layer, a frozen adapter), sparse_linear's gradients still equal F.linear's with
    W0 + ΔW by the reference backend."""
    generator = torch.Generator().manual_seed(15)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device).requires_grad_(grad)

    x, weight, bias = randn(3, 20, grad=trained == "input"), randn(24, 20), randn(24, grad=trained == "bias")
    out_emb, in_emb = randn(2, 24, 2, grad=trained == "embeddings"), randn(2, 20, 2, grad=trained == "embeddings")
    inputs = {"input": [x], "embeddings": [out_emb, in_emb], "bias": [bias]}[trained]
    upstream = randn(3, 24)
    with backends.use(backend):
        got = torch.autograd.grad(sparse_linear(x, weight, bias, out_emb, in_emb, 0.4, "mixture"), inputs, upstream)
    with backends.use("reference"):
        delta = ops.kernelized_sparse_delta(out_emb, in_emb, 0.4, "mixture")
        expected = torch.autograd.grad(torch.nn.functional.linear(x, weight + delta, bias), inputs, upstream)
    for got_t, want in zip(got, expected):
        torch.testing.assert_close(got_t, want, rtol=1e-10, atol=1e-12)


@pytest.fixture
def column_blocks_of_64(monkeypatch):
    """The cpu backward in blocks of 64 columns (the fewest it takes) on the small shapes here."""
    if backends.why_unavailable("cpu", "cpu") is None:
        from tensor_peft.backends import cpu

        monkeypatch.setattr(cpu, "_BLOCK_VALUES", 1)
        monkeypatch.setattr(cpu, "_MIN_BLOCK_COLUMNS", 64)


@pytest.mark.parametrize("backend,device", LINEAR_BACKENDS, ids=[f"{b}-{d}" for b, d in LINEAR_BACKENDS])
@pytest.mark.parametrize("kernel", ["piecewise_linear", "mixture", "rbf", "sigmoid"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("sparsity", [0.97, 0.3])  # the cpu kernel samples Γ at 0.97, forms it whole at 0.3
@pytest.mark.usefixtures("sampling_short_batches", "column_blocks_of_64")
def test_sparse_linear_backward_rebuilds_the_forward_delta_bit_for_bit(backend, device, kernel, mode, sparsity):
    """The ΔW a backend's sparse_linear_backward rebuilds for ∂input is the forward's ΔW (by
    the same backend, from the same τ) bit for bit: the mask of a rebuilt ΔW that differed
    in one rounding could keep another entry. Read through ∂input = I·ΔW (no weight), which
    the identity leaves exact; 150 columns cross the cpu backward's blocks of 64. Float32,
    where a rounding is likely to show."""
    generator = torch.Generator().manual_seed(16)
    out_emb, in_emb = (torch.randn(2, rows, 3, generator=generator).to(device) for rows in (37, 150))
    grad_out, x = torch.eye(37, device=device), torch.randn(37, 150, generator=generator).to(device)
    params = {} if kernel == "piecewise_linear" else {"alpha": 0.7, "gamma": 0.3}
    with backends.use(backend):
        delta, tau = sparse_delta_and_threshold(out_emb, in_emb, sparsity, kernel, mode, **params)
        problem = check_kernel_inputs(out_emb, in_emb, kernel, params)._replace(mode=mode)
        grad_input, *_ = registry.select("sparse_linear_backward", device)[1](
            grad_out, x, None, problem, sparsity, tau, grad_out
        )  # fmt: skip
    assert torch.equal(grad_input, delta)


@pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="no cpu backend here")
@pytest.mark.parametrize("kernel", ["piecewise_linear", "mixture", "rbf", "sigmoid", "linear"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("columns", [150, 40], ids=["three-blocks", "under-a-block"])
@pytest.mark.usefixtures("sampling_short_batches", "column_blocks_of_64")
def test_cpu_sparse_linear_in_column_blocks_equals_the_whole_delta(kernel, mode, sparsity, with_weight, columns):
    """The cpu backward in column blocks (150 columns: blocks of 64, 64 and 22; 40: fewer
    than a block), forward and every gradient, with and without W0, at the sparsity
    extremes, against F.linear with W0 + ΔW, ΔW formed whole in float64 by the reference
    backend."""
    generator = torch.Generator().manual_seed(31)

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    x, bias, out_emb, in_emb = randn(2, 5, columns), randn(23), randn(2, 23, 2), randn(2, columns, 2)
    weight = randn(23, columns, grad=False) if with_weight else None
    params = {} if kernel in ("piecewise_linear", "linear") else {
        name: torch.tensor(value, dtype=torch.float64, requires_grad=True)
        for name, value in {"alpha": 0.8, "beta": -0.1, "gamma": 0.6}.items()
    }  # fmt: skip
    if kernel == "piecewise_linear":
        params["coeff"] = torch.tensor([0.7, -1.2], dtype=torch.float64, requires_grad=True)
    inputs = [x, bias, out_emb, in_emb, *params.values()]
    upstream = torch.randn(2, 5, 23, generator=generator, dtype=torch.float64)
    with backends.use("cpu"):
        got = sparse_linear(x, weight, bias, out_emb, in_emb, sparsity, kernel, mode, **params)
        got_grads = torch.autograd.grad(got, inputs, upstream)
    with backends.use("reference"):
        delta = ops.kernelized_sparse_delta(out_emb, in_emb, sparsity, kernel, mode, **params)
        expected = torch.nn.functional.linear(x, delta if weight is None else weight + delta, bias)
        expected_grads = torch.autograd.grad(expected, inputs, upstream)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got_t, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_t, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", LINEAR_BACKENDS, ids=[f"{b}-{d}" for b, d in LINEAR_BACKENDS])
@pytest.mark.parametrize("gamma", [1e-3, 1e3])
@pytest.mark.usefixtures("column_blocks_of_64")
def test_mixture_softmax_with_a_small_or_large_temperature_stays_finite_and_exact(backend, device, gamma):
    """Mixture's column softmax by its column statistics (max, then the sum of exp((P − max)/γ)):
    a temperature of 1e-3 would overflow exp(P/γ) without the max (P/γ in the thousands);
    1e3 flattens it. 150 rows: the cpu kernel's statistics combine three chunks of rows,
    each sum scaled by exp((its maxima − the column's)/γ). Forward and every gradient, with
    no weight, against the reference backend's ΔW formed whole."""
    generator = torch.Generator().manual_seed(32)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)

    x, out_emb, in_emb, upstream = randn(6, 130), randn(2, 150, 3), randn(2, 130, 3), randn(6, 150)
    results = {}
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, out_emb, in_emb)]
        temperature = torch.tensor(gamma, dtype=torch.float64, device=device, requires_grad=True)
        with backends.use(name):
            y = sparse_linear(leaves[0], None, None, *leaves[1:], 0.6, "mixture", gamma=temperature)
            results[name] = [y, *torch.autograd.grad(y, [*leaves, temperature], upstream)]
    for got, want in zip(results[backend], results["reference"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_threshold_above_two_to_the_24_entries():
    """torch.quantile refuses more than 2^24 entries; the op must not."""
    side = 4097  # 4097² > 2^24
    delta = torch.randn(side, side, generator=torch.Generator().manual_seed(13))
    out = ops.sparsify(delta, 0.75)
    k = dropped_count(0.75, delta.numel())
    tau = delta.abs().flatten().sort().values[k - 1]
    kept = delta.abs() > tau
    assert torch.equal(out != 0, kept)
    torch.testing.assert_close(out[kept], (delta * delta.abs())[kept], rtol=0, atol=0)


def quantile_cases(seed, trials):
    """(delta, sparsity): random sizes up to a few thousand, random and decimal sparsities
    and ones that put s·(N − 1) on or next to an integer; half the deltas full of ties."""
    generator = torch.Generator().manual_seed(seed)
    for trial in range(trials):
        numel = int(torch.randint(1, 3000, (1,), generator=generator))
        choice = trial % 4
        if choice == 0:
            sparsity = float(torch.rand((), generator=generator, dtype=torch.float64))
        elif choice == 1:
            sparsity = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0][trial % 8]
        else:  # j/(N − 1), exactly or as the decimal written with 3 digits
            j = int(torch.randint(0, numel, (1,), generator=generator))
            sparsity = j / max(numel - 1, 1) if choice == 2 else round(j / max(numel - 1, 1), 3)
        delta = torch.randn(numel, generator=generator, dtype=torch.float64)
        if trial % 2:
            delta = torch.randint(-6, 7, (numel,), generator=generator).double() / 4
        yield delta, sparsity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantile_threshold_keeps_what_torch_quantile_keeps(dtype):
    for delta, sparsity in quantile_cases(21, 200):
        delta = delta.to(dtype)
        expected = delta.abs() > torch.quantile(delta.abs(), sparsity)
        out = ops.sparsify(delta, sparsity, threshold="quantile")
        assert torch.equal(out != 0, expected), (delta.numel(), sparsity)


def test_kernelized_sparse_delta_with_the_quantile_threshold():
    """The fused op and sparse_linear keep what torch.quantile of the dense ΔW keeps."""
    generator = torch.Generator().manual_seed(22)
    out_emb = torch.randn(2, 37, 3, generator=generator)
    in_emb = torch.randn(2, 23, 3, generator=generator)
    x = torch.randn(5, 23, generator=generator)
    weight = torch.randn(37, 23, generator=generator)
    raw = ops.kernelized_delta(out_emb, in_emb)
    for sparsity in (0.0, 0.25, 0.9, 0.999, 1.0):
        keep = raw.abs() > torch.quantile(raw.abs(), sparsity)
        fused = ops.kernelized_sparse_delta(out_emb, in_emb, sparsity, threshold="quantile")
        torch.testing.assert_close(fused, raw * raw.abs() * keep, rtol=0, atol=0)
        got = sparse_linear(x, weight, None, out_emb, in_emb, sparsity, threshold="quantile")
        torch.testing.assert_close(got, x @ (weight + fused).T, rtol=1e-6, atol=1e-6)


def test_sparsity_as_a_tensor_is_read_like_the_number():
    generator = torch.Generator().manual_seed(23)
    delta = torch.randn(9, 11, generator=generator)
    for sparsity in (0.0, 0.37, 0.9):
        as_tensor = ops.sparsify(delta, torch.tensor(sparsity, dtype=torch.float64))
        assert torch.equal(as_tensor, naive_sparsify(delta, sparsity, "hard"))


@pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="no cpu backend here")
@pytest.mark.parametrize("positions", [[], [31, 32, 63, 64], [0, 16383, 16384, 40000], list(range(96))])
def test_cpu_selection_finds_the_few_values_of_the_kth_bin_wherever_they_lie(positions):
    """float32: most values far from τ (first radix digits of their own), a few near it at
    the edges of the kernel's runs of 32 keys and chunks of 16384 values; τ and the mask
    against a sort, on the cpu backend's sparsify."""
    generator = torch.Generator().manual_seed(19)
    numel = 50000
    delta = torch.where(torch.rand(numel, generator=generator) < 0.5, 1e-3, 10.0)
    delta = delta * (1 + 0.01 * torch.rand(numel, generator=generator))
    near = torch.tensor(positions, dtype=torch.long)
    small = int((delta < 1).sum()) - int((delta[near] < 1).sum()) if positions else int((delta < 1).sum())
    delta[near] = 0.5 + 0.001 * torch.rand(len(positions), generator=generator)
    sparsity = (small + len(positions) // 2) / numel  # τ among the values near 0.5 (below them without any)
    with backends.use("cpu"):
        out = ops.sparsify(delta.reshape(500, 100), sparsity, mode="hard")
    torch.testing.assert_close(out, naive_sparsify(delta.reshape(500, 100), sparsity, "hard"), rtol=0, atol=0)


def test_sparse_linear_of_a_wider_weight_than_the_embeddings_sums_in_the_wider_dtype():
    """A float64 W0 under float32 embeddings: W0 + ΔW in float64 (ΔW's float32 buffer
    cannot hold it), forward and the input's gradient."""
    generator = torch.Generator().manual_seed(23)
    weight = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    out_emb, in_emb = torch.randn(2, 12, 2, generator=generator), torch.randn(2, 9, 2, generator=generator)
    x = torch.randn(4, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    got = sparse_linear(x, weight, None, out_emb, in_emb, 0.5)
    delta = ops.kernelized_sparse_delta(out_emb, in_emb, 0.5).to(torch.float64)
    expected = torch.nn.functional.linear(x, weight + delta)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(got, x, upstream)[0], upstream @ (weight + delta))


def _cpu_selection_cases():
    """(out_emb, in_emb, kernel): ΔW large enough for the cpu kernel's sample (at most one
    entry in 16 of it), one whose every other row is a thousand times smaller than the
    rest, and one whose ΔW is all ties (every entry undecided: the kernel selects by radix)."""
    generator = torch.Generator().manual_seed(24)
    for shape, kernel in (((1100, 700), "piecewise_linear"), ((37, 4100), "rbf"), ((600, 1030), "mixture")):
        yield torch.randn(2, shape[0], 3, generator=generator), torch.randn(2, shape[1], 3, generator=generator), kernel
    skewed = torch.randn(2, 1024, 3, generator=generator)
    skewed[:, 0::2] *= 1e-3
    yield skewed, torch.randn(2, 600, 3, generator=generator), "linear"
    yield torch.zeros(2, 700, 3), torch.randn(2, 600, 3, generator=generator), "linear"


@pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="no cpu backend here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_cpu_fused_selection_equals_a_sort_of_the_raw_delta(dtype, mode):
    """The cpu kernel selects τ among the entries its sample leaves undecided, masking the
    others while each row is made: τ and the sparsified ΔW equal a full sort of the same
    backend's raw ΔW, bit for bit, for every sparsity, also where all entries tie."""
    with backends.use("cpu"):
        for out_emb, in_emb, kernel in _cpu_selection_cases():
            out_emb, in_emb = out_emb.to(dtype), in_emb.to(dtype)
            raw = ops.kernelized_delta(out_emb, in_emb, kernel)
            for sparsity in (0.3, 0.9, 0.999, 1.0):
                got, tau = sparse_delta_and_threshold(out_emb, in_emb, sparsity, kernel, mode)
                k = dropped_count(sparsity, raw.numel())
                assert tau == raw.abs().flatten().sort().values[k - 1], (kernel, sparsity)
                torch.testing.assert_close(got, naive_sparsify(raw, sparsity, mode), rtol=0, atol=0)


@pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="no cpu backend here")
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.usefixtures("column_blocks_of_64")
def test_cpu_sparse_linear_adds_w0_of_any_layout_in_its_backward(layout):
    """The cpu backward writes W0 + ΔW itself from W0's unit-stride rows, and sums a W0 of
    another layout outside the kernel: the gradients either way against the reference
    backend's F.linear with W0 + ΔW, float32, three column blocks."""
    generator = torch.Generator().manual_seed(32)
    x = torch.randn(7, 150, generator=generator, requires_grad=True)
    out_emb = torch.randn(2, 23, 2, generator=generator, requires_grad=True)
    in_emb = torch.randn(2, 150, 2, generator=generator, requires_grad=True)
    weight = torch.randn(23, 150, generator=generator)
    if layout == "transposed":
        weight = weight.t().contiguous().t()
    upstream = torch.randn(7, 23, generator=generator)
    grads = {}
    for backend in ("cpu", "reference"):
        with backends.use(backend):
            y = sparse_linear(x, weight, None, out_emb, in_emb, 0.5)
            grads[backend] = torch.autograd.grad(y, [x, out_emb, in_emb], upstream)
    for got, want in zip(grads["cpu"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_sparse_linear_in_eager_mode_runs_the_registered_ops():
    """One path: an eager call on plain tensors (a SNELL layer's training step) runs the
    registered ``tensor_peft::sparse_linear`` and its registered backward, as torch.compile
    and tensor subclasses do, and its result and gradients are the reference's."""
    from tensor_peft.nn.snell import SNELLLayer

    torch.manual_seed(16)
    layer = SNELLLayer(torch.nn.Linear(12, 10).double(), r=4, sparsity=0.6, kernel="mixture")
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    trained = [x, *(p for p in layer.parameters() if p.requires_grad)]
    recorder = _OpNames()
    with recorder:
        got = layer(x)
        got_grads = torch.autograd.grad(got.sum(), trained)
    assert "tensor_peft::sparse_linear" in recorder.names
    assert "tensor_peft::sparse_linear_backward" in recorder.names
    with backends.use("reference"):
        delta = layer.delta_weight(layer.adapters["default"])
        expected = torch.nn.functional.linear(x, layer.weight + delta, layer.bias)
        expected_grads = torch.autograd.grad(expected.sum(), trained)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got_t, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_t, want, rtol=1e-10, atol=1e-12)
