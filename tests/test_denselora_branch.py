"""The fused DenseLoRA branch computes what the written-out branch computes, and its dropout is Bernoulli(p)."""

import math

import peft
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import densemod
from conftest import PAPER_TARGETS, make_tiny_llama
from densemod.denselora import dropout as sparse_dropout
from densemod.denselora import layer as denselora_layer
from densemod.denselora.branch import dense_branch
from densemod.denselora.dropout import draw_drops, drop_mask, drop_positions, zero_at

# With dropout the two branches apply 1 / (1 - p) at different places, so they round differently.
FP32 = dict(rtol=1e-4, atol=1e-5)
# bfloat16 keeps 8 bits of mantissa: a model's loss and gradients through either branch differ by rounding only.
BF16 = dict(rtol=2e-2, atol=2e-2)


def keep_mask(count: int, p: float, device: torch.device) -> torch.Tensor:
    return zero_at(torch.ones(count, device=device), draw_drops(count, p, device))


@pytest.fixture(params=["positions", "mask"])
def dropout_path(request, monkeypatch):
    """Each of dropout's two draws on CPU tensors: the CPU's positions, and the mask a GPU draws."""
    if request.param == "mask":
        monkeypatch.setattr(sparse_dropout, "uses_mask", lambda device: True)
    return request.param


def written_out_branch(x, w_e, m, w_d, scaling, dropout, activate):
    """The branch as plain autograd composes it: nn.Dropout's x * mask / (1 - p) at the masks the fused one draws."""
    rows = x.shape[:-1].numel()
    masks = [keep_mask(rows * width, dropout, x.device) for width in (w_e.shape[1], m.shape[0], w_d.shape[0])]

    def drop(t, mask):
        return t * mask.view(t.shape).to(t.dtype) * (1 / (1 - dropout)) if dropout else t

    act = F.gelu if activate else (lambda t: t)
    flat = x.reshape(rows, -1).to(m.dtype)
    hidden = drop(act(F.linear(drop(flat, masks[0]), w_e)), masks[1])
    out = drop(act(F.linear(F.linear(hidden, m), w_d)), masks[2]) * scaling
    return out.view(*x.shape[:-1], -1)


def branch_inputs(requires_grad=(True, True, True)):
    """x: 4 x 32 rows of 64; W_e 8 x 64, M 8 x 8, W_d 96 x 8."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, requires_grad=True)
    weights = [torch.randn(shape) / math.sqrt(shape[1]) for shape in ((8, 64), (8, 8), (96, 8))]
    return x, [w.requires_grad_(flag) for w, flag in zip(weights, requires_grad)]


def outputs_and_grads(branch, precision, dropout, activate, requires_grad=(True, True, True)):
    x, weights = branch_inputs(requires_grad)
    grad_out = torch.randn(4, 32, 96, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        out = branch(x, *weights, 1.5, dropout, activate)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), x.grad, *(w.grad for w in weights)]


@pytest.mark.parametrize("activate", [True, False], ids=["gelu", "only_matrix"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_without_dropout_the_fused_branch_equals_the_written_out_one_bit_for_bit(precision, activate):
    fused = outputs_and_grads(dense_branch, precision, 0.0, activate)
    reference = outputs_and_grads(written_out_branch, precision, 0.0, activate)
    assert fused[0].dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)
    for got, expected in zip(fused, reference):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("activate", [True, False], ids=["gelu", "only_matrix"])
def test_with_dropout_the_fused_branch_equals_the_written_out_one_under_the_same_seed(dropout_path, activate):
    fused = outputs_and_grads(dense_branch, "float32", 0.2, activate)
    reference = outputs_and_grads(written_out_branch, "float32", 0.2, activate)
    for got, expected in zip(fused, reference):
        torch.testing.assert_close(got, expected, **FP32)
    # dropout acted: about a fifth of the output is exactly zero, in the same places
    zeros = fused[0] == 0
    assert torch.equal(zeros, reference[0] == 0) and 0.1 < zeros.float().mean() < 0.3


@pytest.mark.parametrize("activate", [True, False], ids=["gelu", "only_matrix"])
def test_with_dropout_in_bfloat16_the_fused_branch_is_as_accurate_as_the_written_out_one(dropout_path, activate):
    # The two round in different places, so each is compared with the float32 result: over 20 seeds the fused
    # branch's error was 0.98-1.01 times the written-out one's on average, 1.26 times at worst (2026-11-29).
    truth = outputs_and_grads(written_out_branch, "float32", 0.2, activate)
    fused = outputs_and_grads(dense_branch, "bfloat16", 0.2, activate)
    written_out = outputs_and_grads(written_out_branch, "bfloat16", 0.2, activate)
    for exact, got, reference in zip(truth, fused, written_out):
        assert got.dtype == reference.dtype
        error, reference_error = (float((t.float() - exact).norm() / exact.norm()) for t in (got, reference))
        assert reference_error < 0.02 and error < 1.5 * reference_error


def test_frozen_projections_get_no_gradient(dropout_path):
    fused = outputs_and_grads(dense_branch, "float32", 0.2, True, requires_grad=(False, True, False))
    reference = outputs_and_grads(written_out_branch, "float32", 0.2, True, requires_grad=(False, True, False))
    assert fused[2] is None and fused[4] is None
    for got, expected in zip(fused[:2] + fused[3:4], reference[:2] + reference[3:4]):
        torch.testing.assert_close(got, expected, **FP32)


def saved_shapes(branch, dropout):
    x, weights = branch_inputs()
    shapes = []

    def pack(tensor):
        shapes.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        branch(x, *weights, 1.5, dropout, True)
    return shapes


def test_backward_keeps_the_input_and_r_wide_tensors_only():
    # 128 rows, in 64, r 8, out 96: nothing out-wide is kept, where autograd keeps the decoder's output and a mask
    floats = [shape for shape, dtype in saved_shapes(dense_branch, 0.1) if dtype.is_floating_point]
    assert sorted(floats) == sorted([(128, 64), (8, 64), (8, 8), (96, 8), (128, 8), (128, 8), (128, 8)])
    assert (128, 96) in [shape for shape, _ in saved_shapes(written_out_branch, 0.1)]
    positions = [shape for shape, dtype in saved_shapes(dense_branch, 0.1) if dtype == torch.int64]
    assert len(positions) == 3 and sum(s[0] for s in positions) < 0.15 * 128 * (64 + 8 + 96)


def test_on_the_mask_path_backward_keeps_a_byte_per_dropout_element(monkeypatch):
    monkeypatch.setattr(sparse_dropout, "uses_mask", lambda device: True)
    shapes = saved_shapes(dense_branch, 0.1)
    assert sorted(shape for shape, dtype in shapes if dtype.is_floating_point) == sorted(
        [(128, 64), (8, 64), (8, 8), (96, 8), (128, 8), (128, 8), (128, 8)]
    )
    assert sorted(shape for shape, dtype in shapes if not dtype.is_floating_point) == [
        (128 * 8,), (128 * 64,), (128 * 96,)
    ]
    assert all(dtype == torch.bool for _, dtype in shapes if not dtype.is_floating_point)


def test_dropout_draws_positions_on_a_cpu_and_a_mask_elsewhere():
    assert draw_drops(1000, 0.5, "cpu").dtype == torch.int64
    assert draw_drops(1000, 0.5, "meta").dtype == torch.bool
    assert not sparse_dropout.uses_mask(torch.device("cpu")) and sparse_dropout.uses_mask(torch.device("cuda", 0))


def test_the_mask_path_reads_nothing_back_to_the_host(monkeypatch):
    # Fake tensors hold no data, so any read of a value on the host (.item(), int(t), .tolist(), an `if` on a value,
    # nonzero's data-dependent shape) raises under FakeTensorMode, as the positions path shows. The branch running
    # forward and backward there on the mask path proves that path, and the branch around it, read nothing back.
    # (A fake CUDA tensor would take the mask path unforced, but autograd on one aborts a build without CUDA.)
    monkeypatch.setattr(sparse_dropout, "uses_mask", lambda device: True)
    with FakeTensorMode():
        with pytest.raises(DataDependentOutputException):
            drop_positions(1000, 0.1)
        for activate in (True, False):
            x = torch.empty(4, 32, 64, requires_grad=True)
            weights = [torch.empty(shape, requires_grad=True) for shape in ((8, 64), (8, 8), (96, 8))]
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
                out = dense_branch(x, *weights, 1.5, 0.2, activate)
            out.backward(torch.empty_like(out))
            assert saved.count(torch.bool) == 3
            assert x.grad.shape == x.shape and [w.grad.shape for w in weights] == [w.shape for w in weights]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: this checks that the branch on one never "
                    "synchronises with the host, under torch.cuda.set_sync_debug_mode('error')")
@pytest.mark.parametrize("activate", [True, False], ids=["gelu", "only_matrix"])
def test_on_a_gpu_the_branch_never_syncs_with_the_host(activate):
    x, weights = branch_inputs()
    leaves = [t.detach().cuda().requires_grad_() for t in (x, *weights)]
    grad_out = torch.randn(4, 32, 96, device="cuda")  # made before the check: a copy from the host syncs

    def fresh():
        for t in leaves:
            t.grad = None
        torch.manual_seed(7)

    def run(branch):
        out = branch(*leaves, 1.5, 0.2, activate)
        out.backward(grad_out)
        return [out.detach(), *(t.grad for t in leaves)]

    run(dense_branch)  # libraries initialise on a first call, once per process rather than once per step
    fresh()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused = run(dense_branch)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    # and it is still dropout, with the written-out branch's output and gradients at the same masks
    assert 0.15 < float((fused[0] == 0).float().mean()) < 0.25
    fresh()
    for got, expected in zip(fused, run(written_out_branch)):
        torch.testing.assert_close(got, expected, **FP32)


def fast_and_written_out(monkeypatch, model_for, run):
    """run(model) once with the fused branch and once with the written-out one, from the same seed."""
    results = []
    for branch in (dense_branch, written_out_branch):
        monkeypatch.setattr(denselora_layer, "dense_branch", branch)
        torch.manual_seed(3)
        results.append(run(model_for()))
    return results


def loss_and_grads(model, precision):
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("share_scope", ["kind", "layer"])
@pytest.mark.parametrize("variant", ["denselora", "freeze", "only_matrix"])
def test_a_model_trains_alike_with_either_branch(monkeypatch, dropout_path, variant, share_scope, precision):
    def model_for():
        def config(**settings):
            return densemod.DenseLoraConfig(r=8, lora_dropout=0.1, init_weights=False, **settings)

        model = peft.get_peft_model(
            make_tiny_llama(), config(target_modules=PAPER_TARGETS, variant=variant, share_scope=share_scope)
        )
        # a second adapter of the other share scope, active at once with the first
        other_scope = "layer" if share_scope == "kind" else "kind"
        model.add_adapter("second", config(target_modules=["q_proj", "up_proj"], share_scope=other_scope))
        model.base_model.set_adapter(["default", "second"])
        return model

    def run(model):
        return loss_and_grads(model, precision)

    (fast_loss, fast_grads), (loss, grads) = fast_and_written_out(monkeypatch, model_for, run)
    tolerance = BF16 if precision == "bfloat16" else FP32
    torch.testing.assert_close(fast_loss, loss, **tolerance)
    assert fast_grads.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], **tolerance, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_redraws_the_same_dropout(dropout_path, reentrant):
    def grads(checkpointing):
        model = peft.get_peft_model(
            make_tiny_llama(), densemod.DenseLoraConfig(r=8, lora_dropout=0.2, target_modules=PAPER_TARGETS,
                                                        init_weights=False),
        )
        if checkpointing:
            model.base_model.model.activation_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        torch.manual_seed(5)
        return loss_and_grads(model, "float32")

    (plain_loss, plain), (loss, checkpointed) = grads(False), grads(True)
    assert torch.equal(plain_loss, loss)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


DRAWS = {"positions": drop_positions, "mask": drop_mask}


def dropped_positions(path: str, n: int, p: float) -> torch.Tensor:
    drops = DRAWS[path](n, p)
    return drops if path == "positions" else drops.nonzero().view(-1)


@pytest.mark.parametrize("path", DRAWS)
def test_drops_are_reproducible(path):
    torch.manual_seed(0)
    first = DRAWS[path](10_000, 0.3)
    torch.manual_seed(0)
    assert torch.equal(first, DRAWS[path](10_000, 0.3))


def test_dropped_positions_are_sorted_and_distinct():
    torch.manual_seed(0)
    positions = drop_positions(10_000, 0.3)
    assert positions.dtype == torch.int64 and bool((positions[1:] > positions[:-1]).all())
    assert 0 <= int(positions[0]) and int(positions[-1]) < 10_000


def test_the_drop_mask_is_one_flag_per_element():
    torch.manual_seed(0)
    mask = drop_mask(10_000, 0.3)
    assert mask.dtype == torch.bool and mask.shape == (10_000,)


@pytest.mark.parametrize("path", DRAWS)
def test_no_dropout_draws_nothing(path):
    state = torch.get_rng_state()
    assert DRAWS[path](1000, 0.0).numel() == 0
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("path", DRAWS)
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_a_probability_outside_0_1_is_refused(path, p):
    with pytest.raises(ValueError, match=rf"dropout probability must be in \[0, 1\), got {p}"):
        DRAWS[path](10, p)


@pytest.mark.parametrize(
    "path, spare", [("positions", 8.0), ("positions", -4.0), ("mask", None)],
    ids=["positions, one batch", "positions, batches short of the end", "mask"],
)
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_drops_are_independent_bernoulli(monkeypatch, path, p, spare):
    # With -4 deviations to spare the first batch of gaps almost never reaches the end: the rest must still be drawn.
    if spare is not None:
        monkeypatch.setattr(sparse_dropout, "_SPARE_DEVIATIONS", spare)
    n, width = 400_000, 64
    torch.manual_seed(11)
    positions = dropped_positions(path, n, p)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[positions] = True

    # the count is Binomial(n, p)
    assert stats.binomtest(int(mask.sum()), n, p).pvalue > 1e-3
    # every stretch of the tensor, the last one included, drops at the same rate
    per_stretch = mask.view(20, -1).sum(1).numpy()
    assert stats.chisquare(per_stretch).pvalue > 1e-3
    # columns of a (rows, 64) view are alike: no pattern tied to the row length
    assert stats.chisquare(mask.view(-1, width).sum(0).numpy()).pvalue > 1e-3
    # the runs of kept elements between drops are geometric: P(gap = g) = (1 - p)^g p
    gaps = torch.diff(positions) - 1
    top = int(math.log(1e-3) / math.log1p(-p))
    observed = torch.bincount(gaps.clamp(max=top), minlength=top + 1).numpy()
    expected = [(1 - p) ** g * p for g in range(top)] + [(1 - p) ** top]
    assert stats.chisquare(observed, [e * len(gaps) for e in expected]).pvalue > 1e-3
    # consecutive drops are uncorrelated
    pairs = mask[:-1].float(), mask[1:].float()
    assert abs(float(torch.corrcoef(torch.stack(pairs))[0, 1])) < 4 / math.sqrt(n)
