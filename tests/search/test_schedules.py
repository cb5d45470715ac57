"""fxqp.search.schedules: the Pareto front of metric against bytes, references, constraints."""

from __future__ import annotations

import pytest
import torch
from tiny import X, evaluate_fn, make_model, train_fn

import fxqp
from fxqp import Spec
from fxqp.experiment import order_spec
from fxqp.lower.artifact import serialize
from fxqp.search import SchedulePoint, SearchError, dominates, pareto_front, read_study, schedules

SPACE = {
    "groups": [
        {
            "name": "w",
            "modules": ["Conv2d"],
            "exclude": ["conv1"],
            "weight": {
                "quantize": {"bits": [2, 8], "start": ["10%", "60%"]},
                "prune": {"sparsity": [0.2, 0.8], "start": ["10%", "60%"], "length": ["10%", "30%"]},
            },
        },
        {"name": "a", "functions": ["relu"], "activation": {"quantize": {"bits": 8, "start": ["10%", "60%"]}}},
    ]
}


def _point(number, metric, size, feasible=True):
    return SchedulePoint(number, Spec(), metric, size, feasible=feasible)


def test_the_front_holds_the_points_no_other_dominates():
    a, b, c, d, e = _point(0, 90, 100), _point(1, 80, 50), _point(2, 85, 120), _point(3, 95, 300, feasible=False), _point(4, 90, 100)
    assert dominates(a, c) and not dominates(a, b) and not dominates(b, a) and not dominates(a, e)
    assert [p.number for p in pareto_front([a, b, c, d, e])] == [1, 0]  # by bytes; equal points once; infeasible out


def test_schedules_trains_every_trial_from_the_same_start_and_returns_the_front():
    references = {"baseline": Spec(), "Q": order_spec("Q", modules=("Conv2d",), activations=(), functions=("relu",))}
    front = schedules(
        make_model,
        train_fn,
        evaluate_fn,
        space=SPACE,
        total_steps=20,
        example_inputs=(X[:2],),
        n_trials=5,
        references=references,
        progress=False,
    )
    assert len(front.trials) == 5 and set(front.references) == {"baseline", "Q"}
    for point in front.trials:  # each trial's spec in fractions, its measured size and metric
        assert point.spec.rules[0].weight[0].start.endswith("%") and point.artifact_bytes > 0
        if point not in front.pareto:
            assert any(dominates(p, point) or (p.metric, p.artifact_bytes) == (point.metric, point.artifact_bytes) for p in front.pareto)
    assert all(not any(dominates(other, p) for other in front.trials) for p in front.pareto)
    # the baseline reference is exactly a plain run from the same seed
    torch.manual_seed(0)
    gm = fxqp.transform(make_model(), Spec(), total_steps=20, example_inputs=(X[:2],))
    torch.manual_seed(0)
    train_fn(gm, 20)
    lowered = fxqp.lower(gm)
    baseline = front.references["baseline"]
    assert baseline.metric == evaluate_fn(lowered)["metric"] and baseline.artifact_bytes == len(serialize(lowered))
    table = str(front.table())
    assert "reference" in table and "trial " in table


def test_a_bytes_constraint_keeps_larger_trials_off_the_front(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    front = schedules(
        make_model,
        train_fn,
        evaluate_fn,
        space=SPACE,
        total_steps=20,
        n_trials=6,
        constraints={"bytes": 6000},
        storage=storage,
        study_name="c",
        progress=False,
    )
    record = read_study(storage, "c")
    sizes = {t.number: t.attrs["artifact_bytes"] for t in record.complete()}
    assert all(t.attrs["constraints"] == {"bytes": sizes[t.number] - 6000} for t in record.complete())
    assert all(p.artifact_bytes <= 6000 for p in front.pareto)
    assert record.meta["constraints"] == {"bytes": 6000}


def test_bad_arguments():
    with pytest.raises(SearchError, match=r"sampler: 'cmaes'"):
        schedules(make_model, train_fn, evaluate_fn, space=SPACE, total_steps=20, sampler="cmaes", progress=False)
    with pytest.raises(SearchError, match=r"a ramp of 10% of a run of 9 steps is shorter than one step"):
        schedules(make_model, train_fn, evaluate_fn, space=SPACE, total_steps=9, progress=False)
    with pytest.raises(SearchError, match=r"the schedule search maximizes a metric: return a number or a mapping with 'metric'"):
        schedules(make_model, train_fn, lambda model: {"loss": 1.0}, space=SPACE, total_steps=20, n_trials=1, progress=False)
    with pytest.raises(SearchError, match=r"trial 0: train_fn\(model, 20\) advanced the model's step counter by 10"):
        schedules(
            make_model,
            lambda model, steps: train_fn(model, steps // 2),
            evaluate_fn,
            space=SPACE,
            total_steps=20,
            n_trials=1,
            progress=False,
        )
