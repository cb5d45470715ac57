"""The native CPU kernels (fxqp.native, fxqp.ops.fused): same values and gradients as the
torch ops, gradients masked into new tensors (never in place), a cache that is never
half-written, a cached library that does not load built again once, and a clean fallback
without a compiler or when the rebuilt library does not load either."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import warnings

import hypothesis.extra.numpy as hnp
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec, native
from fxqp.ops import accelerate, fused
from fxqp.ops.chain import WeightChain

HAVE_COMPILER = shutil.which(os.environ.get("CC") or "cc") is not None
needs_kernels = pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine: the native kernels cannot be built")


@needs_kernels
def test_the_kernels_build_and_load_on_a_machine_with_a_compiler():
    assert native.available(), native.unavailable_reason()
    assert native.unavailable_reason() == ""
    with native.disabled():
        assert not native.available()
        assert "disabled" in native.unavailable_reason()
    assert native.available()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.ReLU(),
    )


def _spec(weight_ops: Quantize | list, activation_ops: list) -> Spec:
    """``weight_ops``: a list, or a Quantize that follows a 50% Prune."""
    weight = weight_ops if isinstance(weight_ops, list) else [Prune(sparsity=0.5), weight_ops]
    return Spec(rules=[Rule(modules=["Conv2d", "Linear"], weight=weight), Rule(modules=["ReLU"], activation=activation_ops)])


def _train_both(spec: Spec, steps: int, x: torch.Tensor, y: torch.Tensor):
    """The same transformed net trained eagerly with and without the native kernels: per step
    the outputs, the gradients, the state and an eval-mode output of each."""
    fast = fxqp.transform(_net(), spec, example_inputs=(x,))
    slow = copy.deepcopy(fast)
    history = []
    for _ in range(steps):
        record = []
        for model, off in ((fast, False), (slow, True)):
            with native.disabled() if off else contextlib.nullcontext():
                model.train()
                for p in model.parameters():
                    p.grad = None
                out = model(x)
                F.cross_entropy(out, y).backward()
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
                model.eval()
                evaluated = model(x)
            record.append(
                (
                    out.detach(),
                    [p.grad for p in model.parameters()],
                    {k: v.clone() for k, v in model.state_dict().items()},
                    evaluated.detach(),
                )
            )
        history.append(record)
    return history


def _assert_same(history):
    for step, ((out, grads, state, evaluated), (out2, grads2, state2, evaluated2)) in enumerate(history):
        assert torch.equal(out, out2), f"step {step}: outputs differ"
        for i, (g, g2) in enumerate(zip(grads, grads2, strict=True)):
            assert torch.equal(g, g2), f"step {step}: gradient {i} differs"
        assert state.keys() == state2.keys()
        for key in state:
            assert torch.equal(state[key], state2[key]), f"step {step}: {key} differs"
        assert torch.equal(evaluated, evaluated2), f"step {step}: eval outputs differ"


@needs_kernels
@pytest.mark.parametrize(
    "weight_quantize, activation_ops",
    [
        (Quantize(bits=8), [Prune(sparsity=0.5), Quantize(bits=8)]),
        (Quantize(bits=4, symmetric=False), [Prune(sparsity=0.3, start=1, end=4, every=1), Quantize(bits=3, symmetric=True)]),
        (Quantize(bits=2, per_channel=False), [Prune(sparsity=0.6, start=2), Quantize(bits=2, start=1)]),
        ([Prune(sparsity=0.5, start=1, end=3)], [Prune(sparsity=0.5)]),
        ([Quantize(bits=4), Prune(sparsity=0.5, start=1, end=3)], [Quantize(bits=8), Prune(sparsity=0.3, start=1, end=3)]),
    ],
)
def test_a_model_trains_to_the_same_values_with_and_without_the_kernels(weight_quantize, activation_ops):
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    spec = _spec(weight_quantize, activation_ops)
    history = _train_both(spec, 5, x, y)
    _assert_same(history)
    # and the fused ops really ran: their autograd nodes are in the graph
    model = fxqp.transform(_net(), spec, example_inputs=(x,))
    assert isinstance(model.get_submodule("0").parametrizations["weight"].forward, WeightChain)
    for _ in range(3):  # every op of the spec has started by the fourth step
        model(x)
    kinds, seen, pending = set(), set(), [model(x).grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds.add(type(node).__name__)
        pending += [n for n, _ in node.next_functions]
    assert "_RoundMaskedBackward" in kinds  # weights: fused pairs and lone ops alike


floats = hnp.arrays(
    "float32",
    hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=7),
    elements=st.floats(-1e4, 1e4, width=32) | st.sampled_from([0.0, -0.0, 1.5, -2.5]),
)


@needs_kernels
@settings(deadline=None, max_examples=60)
@given(w=floats, bits=st.integers(2, 8), symmetric=st.booleans(), per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_weight_quantization_of_a_masked_weight_matches_the_torch_ops(w, bits, symmetric, per_channel, seed):
    from fxqp.ops.quantize import WeightQuantizer

    w = torch.from_numpy(w)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(w.shape, generator=generator) < 0.5
    quantizer = WeightQuantizer(Quantize(bits=bits, symmetric=symmetric, per_channel=per_channel), "w", 0 if per_channel else None)
    weight = w.clone().requires_grad_()
    fast = accelerate.quantize_weight(quantizer, weight, mask.to(torch.uint8))
    reference_weight = w.clone().requires_grad_()
    with native.disabled():
        slow = quantizer.quantize(reference_weight * mask.float())
    torch.testing.assert_close(fast, slow, rtol=0, atol=0, equal_nan=True)
    upstream = torch.randn(w.shape, generator=generator)
    fast.backward(upstream)
    slow.backward(upstream)
    torch.testing.assert_close(weight.grad, reference_weight.grad, rtol=0, atol=0)


@needs_kernels
def test_a_per_tensor_grid_over_several_blocks_and_nan_inf():
    from fxqp.ops.quantize import WeightQuantizer

    torch.manual_seed(0)
    w = torch.randn(3, 3 * fused.BLOCK + 17)
    w[1, 5] = float("inf")
    quantizer = WeightQuantizer(Quantize(bits=8, per_channel=False), "w", None)
    mask = (torch.rand(w.shape) < 0.7).to(torch.uint8)
    for weight in (w[:, 100:].contiguous(), w):  # finite: a per-tensor scale from several blocks; with inf: NaN as torch gives
        with native.disabled():
            slow = quantizer.quantize(weight * mask[:, : weight.shape[1]].float())
        fast = accelerate.quantize_weight(quantizer, weight, mask[:, : weight.shape[1]].contiguous())
        torch.testing.assert_close(fast, slow, rtol=0, atol=0, equal_nan=True)
    lo, hi = fused.row_range(w, None, 1)
    assert hi.item() == float("inf") and lo.item() == w.min().item()
    w[2, 7] = float("nan")
    lo, hi = fused.row_range(w, None, 3)
    assert not lo[:2].isnan().any() and lo[2].isnan() and hi[2].isnan()


@needs_kernels
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_rows_with_nan_inf_zero_and_constant_channels_match_the_torch_ops(symmetric):
    from fxqp.ops.quantize import WeightQuantizer

    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    w[0, 1, 1, 1] = float("nan")
    w[1, 0, 0, 0] = float("inf")
    w[2] = 0.0
    w[3] = 0.25  # one value: a collapsed range
    w[4] = -3.0
    mask = torch.rand(w.shape) < 0.6
    mask[5] = False  # a channel pruned whole
    quantizer = WeightQuantizer(Quantize(bits=4, symmetric=symmetric), "w", 0)
    with native.disabled():
        slow = quantizer.quantize(w * mask.float())
    fast = accelerate.quantize_weight(quantizer, w, mask.to(torch.uint8))
    torch.testing.assert_close(fast, slow, rtol=0, atol=0, equal_nan=True)
    assert fast[0].isnan().all() and not fast[2:].isnan().any()


def _pruned_conv():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3)
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5), Quantize(bits=8)])])
    return fxqp.transform(nn.Sequential(conv), spec, example_inputs=(torch.randn(1, 3, 5, 5),))


@needs_kernels
def test_the_weight_gradient_is_masked_into_a_new_tensor(monkeypatch):
    """A gradient is never modified in place, whoever else may hold it: the masked gradient
    is written by the native kernel into new memory."""
    calls = []
    plain = fused.mask_multiply
    monkeypatch.setattr(fused, "mask_multiply", lambda g, m: calls.append(g) or plain(g, m))
    model = _pruned_conv()
    conv = model.get_submodule("0")
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    original, mask = conv.parametrizations["weight"].original, conv.parametrizations["weight"][0].mask
    assert len(calls) == 1 and calls[0].data_ptr() != original.grad.data_ptr()
    assert (calls[0][~mask] != 0).any()  # the engine's gradient is left as it was
    assert (original.grad[~mask] == 0).all() and (original.grad[mask] != 0).any()


@needs_kernels
def test_a_gradient_held_elsewhere_is_not_changed():
    model = _pruned_conv()
    conv = model.get_submodule("0")
    original, mask = conv.parametrizations["weight"].original, conv.parametrizations["weight"][0].mask
    x = torch.randn(2, 3, 5, 5)
    kept = []
    weight = conv.weight
    weight.register_hook(kept.append)
    F.conv2d(x, weight).sum().backward()
    assert (kept[0][~mask] != 0).any(), "the hook's gradient (dL/dQ(w)) must stay unmasked"
    assert torch.equal(original.grad, kept[0] * mask)
    # one gradient tensor handed to two nodes by an addition: each gets its masked copy
    original.grad = None
    F.conv2d(x, conv.weight + conv.weight).sum().backward()
    fast = original.grad.clone()
    original.grad = None
    with native.disabled():
        F.conv2d(x, conv.weight + conv.weight).sum().backward()
    assert torch.equal(fast, original.grad)


@needs_kernels
def test_second_order_gradients_go_through_torch_ops():
    model = _pruned_conv()
    conv = model.get_submodule("0")
    original = conv.parametrizations["weight"].original
    x = torch.randn(2, 3, 5, 5)
    results = []
    for off in (False, True):
        with native.disabled() if off else contextlib.nullcontext():
            (g,) = torch.autograd.grad((F.conv2d(x, conv.weight) ** 2).sum(), original, create_graph=True)
            (gg,) = torch.autograd.grad(g.pow(2).sum(), original)
        results.append((g.detach(), gg))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _reset_kernels(monkeypatch, **env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    saved = dict(native._state)
    native._state.clear()
    return saved


@needs_kernels
def test_the_cache_gets_one_whole_library_and_nothing_else(tmp_path, monkeypatch):
    saved = _reset_kernels(monkeypatch, FXQP_CACHE_DIR=str(tmp_path / "cache"))
    try:
        assert native.available(), native.unavailable_reason()
        files = sorted(p.name for p in (tmp_path / "cache").iterdir())
        assert len(files) == 1 and files[0].startswith("kernels-") and files[0].endswith(".so")
        native._state.clear()
        assert native.available()  # loaded from the cache, not built again
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == files
    finally:
        native._state.clear()
        native._state.update(saved)


def test_without_a_working_compiler_fxqp_warns_once_and_runs_the_torch_ops(tmp_path, monkeypatch):
    saved = _reset_kernels(monkeypatch, FXQP_CACHE_DIR=str(tmp_path / "cache"), CC="false")  # exits 1
    try:
        with pytest.warns(RuntimeWarning, match="building the native kernels failed"):
            assert not native.available()
        assert "false" in native.unavailable_reason()
        leftovers = list((tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else []
        assert leftovers == [], "a failed build leaves nothing in the cache"
        model = _pruned_conv()
        x = torch.randn(2, 3, 5, 5)
        model(x).sum().backward()  # the torch ops
        conv = model.get_submodule("0")
        assert (conv.parametrizations["weight"].original.grad[~conv.parametrizations["weight"][0].mask] == 0).all()
    finally:
        native._state.clear()
        native._state.update(saved)


def _cached_library(tmp_path, monkeypatch, contents=None, **env):
    """Reset the kernels to a fresh cache in ``tmp_path`` and put ``contents`` (bytes, or a C
    source to compile) at the path the library is cached at; returns that path and the saved state."""
    saved = _reset_kernels(monkeypatch, FXQP_CACHE_DIR=str(tmp_path / "cache"), **env)
    path = native._library_path(os.environ.get("CC") or "cc", native._source())
    path.parent.mkdir(parents=True)
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    elif contents is not None:
        (tmp_path / "part.c").write_text(contents)
        subprocess.run([os.environ.get("CC") or "cc", "-shared", "-fPIC", str(tmp_path / "part.c"), "-o", str(path)], check=True)
    return path, saved


@needs_kernels
@pytest.mark.parametrize(
    "contents",
    [b"not a library", "void fxqp_block_range(void) {}\n"],
    ids=["junk", "missing-kernels"],
)
def test_a_cached_library_that_does_not_load_is_built_again(tmp_path, monkeypatch, contents):
    path, saved = _cached_library(tmp_path, monkeypatch, contents)
    before = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            assert native.available(), native.unavailable_reason()
        assert path.read_bytes() != before
        assert all(hasattr(native.kernels(), name) for name in native._SIGNATURES)
        assert [p.name for p in path.parent.iterdir()] == [path.name]
        model = _pruned_conv()
        model(torch.randn(2, 3, 5, 5)).sum().backward()  # through the rebuilt kernels
    finally:
        native._state.clear()
        native._state.update(saved)


@needs_kernels
def test_a_bad_library_another_process_removed_first_is_still_built_again(tmp_path, monkeypatch):
    path, saved = _cached_library(tmp_path, monkeypatch, b"not a library")
    bind = native._bind

    def removed_meanwhile(where):
        if where == path:
            path.unlink()  # the other process's cleanup, between our failed load and our unlink
            raise OSError("invalid ELF header")
        return bind(where)

    monkeypatch.setattr(native, "_bind", removed_meanwhile)
    try:
        assert native.available(), native.unavailable_reason()
        assert path.exists()
    finally:
        native._state.clear()
        native._state.update(saved)


def test_a_rebuilt_library_that_does_not_load_either_falls_back_with_one_warning(tmp_path, monkeypatch):
    log = tmp_path / "builds"
    cc = tmp_path / "junk-cc"  # a "compiler" whose libraries are junk; it logs each build
    cc.write_text(
        f'#!/bin/sh\ncase "$1" in --version) echo junk-cc 1.0; exit 0;; esac\n'
        f'for arg; do out="$arg"; done\necho build >> "{log}"\nprintf "not a library" > "$out"\n'
    )
    cc.chmod(0o755)
    path, saved = _cached_library(tmp_path, monkeypatch, b"not a library either", CC=str(cc))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.kernels() is None
            assert not native.available() and native.kernels() is None
            reason = native.unavailable_reason()
        assert (log.read_text() if log.exists() else "").splitlines() == ["build"], "built again once, not in a loop"
        assert [w.category for w in caught] == [RuntimeWarning]
        assert str(path) in str(caught[0].message) and str(path) in reason and "does not load" in reason
        assert list(path.parent.iterdir()) == [], "a library that does not load is not cached"
        model = _pruned_conv()
        model(torch.randn(2, 3, 5, 5)).sum().backward()  # the torch ops
    finally:
        native._state.clear()
        native._state.update(saved)


def test_fxqp_native_0_turns_the_kernels_off(monkeypatch):
    saved = _reset_kernels(monkeypatch, FXQP_NATIVE="0")
    try:
        assert not native.available()
        assert native.unavailable_reason() == "disabled by FXQP_NATIVE"
    finally:
        native._state.clear()
        native._state.update(saved)


@needs_kernels
def test_a_pending_graph_keeps_its_weight_while_the_next_forward_computes_another():
    grads = []
    for off in (False, True):
        model = _pruned_conv()
        original = model.get_submodule("0").parametrizations["weight"].original
        x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3), requires_grad=True)
        with native.disabled() if off else contextlib.nullcontext():
            first = model(x)  # its graph saved this step's quantized weight
            with torch.no_grad():
                original.mul_(-2.0)
            model(x)  # another quantized weight, while the first is still needed
            first.sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
