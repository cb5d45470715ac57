"""The statistics of benchmarks/train_step.py."""

from __future__ import annotations

import copy
import pathlib
import sys

import pytest
import torch
from torch import nn

import fxqp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from train_step import NO_LAYOUT_VARIANTS, TORCH_OPS, baseline_of, build, make_step, paired_ratio  # noqa: E402


def test_paired_ratio_gives_the_quartiles_of_the_per_round_ratios():
    # rounds: 2/1, 3/1, 4/2, 5/2 -> ratios 2, 3, 2, 2.5; sorted 2, 2, 2.5, 3
    q1, median, q3 = paired_ratio([2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 2.0, 2.0])
    assert (q1, median, q3) == pytest.approx((2.0, 2.25, 2.625))


def test_paired_ratio_cancels_a_slow_round():
    # the third round is ten times slower for both sides: each round's ratio is still 1.1
    variant = [1.1, 2.2, 11.0]
    baseline = [1.0, 2.0, 10.0]
    assert paired_ratio(variant, baseline) == pytest.approx([1.1, 1.1, 1.1])


def test_paired_ratio_of_one_round_and_of_unequal_lengths():
    assert paired_ratio([3.0], [2.0]) == [1.5, 1.5, 1.5]
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])


def test_each_variant_is_compared_with_float_run_the_same_way():
    assert baseline_of("fxqp eager") == "float eager"
    assert baseline_of("fxqp eager: weights") == "float eager"
    assert baseline_of("torch.ao prepare_qat_fx") == "float eager"
    assert baseline_of("fxqp compiled") == "float compiled"
    assert baseline_of("float compiled") == "float compiled"
    float_no_layout, fxqp_no_layout = NO_LAYOUT_VARIANTS
    assert baseline_of(fxqp_no_layout) == float_no_layout
    assert baseline_of(float_no_layout) == float_no_layout


def test_the_torch_ops_variant_is_fxqp_eager_run_with_the_native_kernels_off():
    import contextlib

    from fxqp import native

    assert baseline_of(TORCH_OPS) == "float eager"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    model = build(TORCH_OPS, net, x)
    assert hasattr(model, "fxqp_schedule")
    states = []

    @contextlib.contextmanager
    def watched():
        with native.disabled():
            states.append(native.available())
            yield

    make_step(model, x, y, watched)()
    assert states == [False]  # the step ran inside the context, with the kernels off


def test_inference_variants_are_evaluation_forwards_after_one_training_step():
    from train_step import INFERENCE_VARIANTS, inference_model, make_forward

    assert baseline_of("fxqp compiled inference") == "float compiled inference"
    assert baseline_of("fxqp eager inference") == "float eager inference"
    assert baseline_of("float eager inference") == "float eager inference"
    assert len(INFERENCE_VARIANTS) == 4
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    before = copy.deepcopy(net.state_dict())
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    model = inference_model("fxqp eager inference", net, x, y)
    assert not model.training
    assert int(model.fxqp_schedule.step) == 1
    pruners = [m for m in model.modules() if isinstance(m, fxqp.ops.WeightPruner)]
    assert pruners and all(abs(p.actual_sparsity() - 0.5) < 0.01 for p in pruners)
    for key, value in before.items():  # the base model is copied, not trained
        assert torch.equal(net.state_dict()[key], value)
    steps_before = int(model.fxqp_schedule.step)
    make_forward(model, x)()
    assert int(model.fxqp_schedule.step) == steps_before  # evaluation does not advance the schedule
