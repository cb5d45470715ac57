"""fxqp.search.layer_ratios: the objective's terms, the two strategies, resuming, errors."""

from __future__ import annotations

import pytest
import torch
from tiny import BASE, X, evaluate_fn, make_model, train_fn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.search import SearchError, layer_ratios, read_study
from fxqp.search.ratios import compute_weight_masks, default_alpha


def _search(**kwargs):
    options = dict(example_inputs=X[:2], pretrain_steps=4, progress=False)
    options.update(kwargs)
    return layer_ratios(
        make_model, BASE, train_fn, kwargs.pop("evaluate", evaluate_fn), **{k: v for k, v in options.items() if k != "evaluate"}
    )


def test_the_objective_terms_match_a_hand_count_of_the_lowered_model():
    result = _search(n_trials=3, alpha=2.0, evaluate=lambda model: {"loss": 0.25, "metric": 50.0}, finalize=False)
    assert [g.name for g in result.groups] == ["conv2", "conv3"] and [g.channels for g in result.groups] == [16, 16]
    # trial 2 is the probe at max_ratio (0.4) for both layers: round(0.4 * 16) = 6 of 16 filters pruned
    assert result.ratios == {"conv2": 0.4, "conv3": 0.4}
    # parameters of the lowered model: conv1 (float), bn1, conv2 (10 of 16 filters), bn2, conv3
    # (10 filters reading 10 channels), bn3, fc (reading 10 channels) + bias
    unpruned = 3 * 8 * 9 + 2 * 8 + 8 * 16 * 9 + 2 * 16 + 16 * 16 * 9 + 2 * 16 + 16 * 4 + 4
    pruned = 3 * 8 * 9 + 2 * 8 + 8 * 10 * 9 + 2 * 10 + 10 * 10 * 9 + 2 * 10 + 10 * 4 + 4

    # bits by the paper's convention: 4-bit codes and one 32-bit scale per kept filter for the
    # quantized convolutions; conv1, fc and every batch-norm tensor (weight, bias, running mean
    # and variance) at 32 bits
    def bits(c2, c3):
        quantized = (8 * c2 * 9 + c2 * c3 * 9) * 4 + 32 * (c2 + c3)
        floats = 32 * (3 * 8 * 9 + 4 * 8 + 4 * c2 + 4 * c3 + c3 * 4 + 4)
        return quantized + floats

    terms = result.objective
    assert terms.loss == 0.25 and terms.alpha == 2.0
    assert terms.params_pct == pytest.approx(100 * pruned / unpruned)
    assert terms.bits_pct == pytest.approx(100 * bits(10, 10) / bits(16, 16))
    assert terms.value == pytest.approx(0.25 + 2.0 * pruned / unpruned + 0.5 * bits(10, 10) / bits(16, 16))


def test_joint_search_prunes_fine_tunes_and_lowers_the_best():
    result = _search(n_trials=6, final_steps=3)
    assert result.evaluations == 6 and len(result.studies) == 1
    assert set(result.ratios) == {"conv2", "conv3"} and all(0.0 <= r <= 0.4 for r in result.ratios.values())
    lowered = result.lowered
    for layer, ratio in result.ratios.items():
        assert lowered.get_submodule(layer).weight.shape[0] == 16 - round(ratio * 16)  # the filters are removed
    assert result.final is not None and set(result.evaluation) == {"loss", "metric"}
    assert int(result.model.fxqp_schedule.step) == 4 + 3  # pretraining, then the final fine-tuning
    rules = [r for r in result.best_spec.rules if r.names]
    for rule in rules:  # base ops first, then the filter pruning at the layer's ratio
        assert rule.weight[0] == Quantize(bits=4) and rule.weight[1] == Prune(
            sparsity=result.ratios[rule.names[0]], structure="filter", criterion="angle", score_from="next"
        )
    assert "filters kept" in str(result.table()) and "after the final fine-tuning" in str(result.table())
    with torch.no_grad():  # the result's spec, applied to the result's model state, is the result
        gm = fxqp.transform(make_model(), result.best_spec, example_inputs=(X[:2],))
        gm.load_state_dict(result.model.state_dict())
        gm.eval()
        result.model.eval()
        assert torch.equal(gm(X), result.model(X))


def test_layerwise_visits_layers_last_to_first_with_the_papers_probe_counts():
    calls = []

    def counting_train(model, steps):
        calls.append(steps)
        train_fn(model, steps)

    result = layer_ratios(
        make_model,
        BASE,
        counting_train,
        lambda model: {"loss": 0.0},
        example_inputs=X[:2],
        strategy="layerwise",
        pretrain_steps=4,
        finetune_steps=2,
        final_steps=3,
        progress=False,
    )
    assert [name.rsplit(".", 2)[1:] for name in result.studies] == [["layer00", "conv3"], ["layer01", "conv2"]]
    assert result.evaluations == 2 * (3 + 5 + 5)
    # a zero loss makes the smallest network best: each layer keeps the largest ratio, is
    # pruned >= 5%, so the network is fine-tuned after each layer, then once more at the end
    assert result.ratios == {"conv2": 0.4, "conv3": 0.4}
    assert calls == [4, 2, 2, 3]


def test_layerwise_studies_record_probes_and_the_fixed_later_layers(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    layer_ratios(
        make_model,
        BASE,
        train_fn,
        evaluate_fn,
        example_inputs=X[:2],
        strategy="layerwise",
        n_random=2,
        n_guided=1,
        pretrain_steps=4,
        storage=storage,
        study_name="lw",
        finalize=False,
        progress=False,
    )
    last = read_study(storage, "lw.layer00.conv3")
    first = read_study(storage, "lw.layer01.conv2")
    assert [t.params["conv3"] for t in last.trials[:3]] == [0.0, 0.2, 0.4] and len(last.trials) == 6
    chosen = min(last.complete(), key=lambda t: t.values[0]).params["conv3"]
    assert all(t.attrs["ratios"]["conv3"] == chosen for t in first.trials)  # the later layer stays as chosen
    assert first.meta["fixed"] == {"conv3": chosen} and first.meta["search"] == "layer_ratios"


def test_an_interrupted_search_resumes_its_trial_count(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    seen = []

    def interrupted(model):
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return evaluate_fn(model)

    with pytest.raises(KeyboardInterrupt):
        _search(n_trials=6, storage=storage, study_name="r", evaluate=interrupted, finalize=False)
    assert read_study(storage, "r").counts() == {"COMPLETE": 3, "FAIL": 1}
    seen.clear()
    _search(n_trials=6, storage=storage, study_name="r", evaluate=interrupted, finalize=False)
    assert len(seen) == 3  # 3 more trials, not 6
    assert read_study(storage, "r").counts() == {"COMPLETE": 6, "FAIL": 1}


def test_workers_must_share_the_trained_base(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    checkpoint = tmp_path / "base.safetensors"
    _search(n_trials=3, storage=storage, study_name="s", base_checkpoint=checkpoint, finalize=False)
    assert checkpoint.is_file()
    # a second worker loads the same base: it joins the study
    _search(n_trials=4, storage=storage, study_name="s", base_checkpoint=checkpoint, finalize=False, pretrain_steps=9)
    assert read_study(storage, "s").counts() == {"COMPLETE": 4}
    # a worker whose base was trained otherwise is refused
    with pytest.raises(SearchError, match="'base_model_sha256'"):
        _search(n_trials=5, storage=storage, study_name="s", pretrain_steps=5, finalize=False)


def test_masks_are_computed_without_a_forward():
    spec = Spec(
        rules=[*BASE.rules, Rule(names=["conv2"], weight=[Quantize(bits=4), Prune(sparsity=0.5, structure="filter", criterion="angle")])]
    )
    gm = fxqp.transform(make_model(), spec, example_inputs=(X[:2],))
    gm.eval()
    before = {k: v.clone() for k, v in gm.state_dict().items() if "mask" not in k and "keep" not in k and "next_refresh" not in k}
    compute_weight_masks(gm)
    assert int((~gm.fxqp_groups.conv2.keep).sum()) == 8
    assert gm.conv2.weight.flatten(1).abs().sum(1).eq(0).sum() == 8
    after = gm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # no statistic moved, no step taken
    assert not any(m.training for m in gm.modules())  # the pruners are back in evaluation mode


def test_default_alpha_follows_the_quantizer():
    def spec(op):
        return Spec(rules=[Rule(modules=["Conv2d"], weight=[op])])

    assert default_alpha(spec(Quantize(bits=2, method="dorefa"))) == 7.0
    assert default_alpha(spec(Quantize(bits=1, method="binary"))) == 5.0
    assert default_alpha(spec(Quantize(bits=1, method="binary", scaled=False))) == 2.0
    assert default_alpha(spec(Quantize(bits=4))) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "greedy"}, r"strategy: 'greedy' is not accepted; expected one of 'joint', 'layerwise'"),
        ({"strategy": "layerwise", "n_trials": 10}, r"n_trials: layerwise runs 3 probes \+ n_random \+ n_guided"),
        ({"max_ratio": 1.0}, r"max_ratio: 1.0 is not accepted; expected a number in \(0, 1\)"),
        ({"sampler": "cma"}, r"sampler: 'cma'"),
        ({"layers": ["fc"]}, r"no layer to prune"),
        ({"pretrain_steps": 0}, None),
    ],
)
def test_bad_arguments_are_search_errors(kwargs, message):
    options = {"n_trials": None if kwargs.get("strategy") == "layerwise" else 3, **kwargs}
    if message is None:  # nothing trained: fine when the base spec has no observers
        _search(finalize=False, **options)
        return
    with pytest.raises(SearchError, match=message):
        _search(**options)


def test_a_base_that_has_not_seen_data_or_started_is_refused():
    observed = Spec(rules=[*BASE.rules, Rule(functions=["relu"], activation=[Quantize(bits=8)])])
    with pytest.raises(SearchError, match=r"quantizers that have seen no data: relu.*pretrain it"):
        layer_ratios(make_model, observed, train_fn, evaluate_fn, example_inputs=X[:2], pretrain_steps=0, n_trials=3, progress=False)
    late = Spec(rules=[Rule(modules=["Conv2d"], exclude=["conv1"], weight=[Quantize(bits=4, start="50%")])])
    with pytest.raises(fxqp.SpecError, match=r"'50%' is a fraction of the run"):
        layer_ratios(make_model, late, train_fn, evaluate_fn, example_inputs=X[:2], pretrain_steps=0, n_trials=3, progress=False)
    later = Spec(rules=[Rule(modules=["Conv2d"], exclude=["conv1"], weight=[Quantize(bits=4, start=10)])])
    with pytest.raises(SearchError, match=r"ops that have not started: conv2.weight \(quantize from step 10\)"):
        layer_ratios(make_model, later, train_fn, evaluate_fn, example_inputs=X[:2], pretrain_steps=4, n_trials=3, progress=False)


def test_a_train_function_that_does_not_train_the_steps_is_refused():
    with pytest.raises(
        SearchError, match=r"pretraining: train_fn\(model, 4\) advanced the model's step counter by 0; it must train exactly 4 steps"
    ):
        layer_ratios(
            make_model, BASE, lambda model, steps: None, evaluate_fn, example_inputs=X[:2], pretrain_steps=4, n_trials=3, progress=False
        )


def test_a_train_function_that_reports_lets_the_pruner_stop_bad_trials(tmp_path):
    import optuna

    reported = []

    def reporting_train(model, steps, report=None):
        train_fn(model, steps)
        if report is not None:  # trials report; pretraining does not
            loss = 10.0 if len(reported) % 2 else 0.1  # every other trial looks hopeless
            reported.append(loss)
            report(steps, loss)

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    layer_ratios(
        make_model,
        BASE,
        reporting_train,
        evaluate_fn,
        example_inputs=X[:2],
        n_trials=4,
        trial_steps=2,
        pretrain_steps=4,
        pruner=optuna.pruners.ThresholdPruner(upper=5.0),
        storage=storage,
        study_name="p",
        finalize=False,
        progress=False,
    )
    record = read_study(storage, "p")
    assert record.counts() == {"COMPLETE": 2, "PRUNED": 2} and reported == [0.1, 10.0, 0.1, 10.0]  # pruned trials count as done
    assert [t.state for t in record.trials] == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]


def test_a_search_frees_each_trials_models():
    """fxqp.transform moves what it builds to the collector's oldest generation; the search
    collects after each trial, so a long search does not hold every trial's models."""
    import weakref

    refs = []

    def remembering(model):
        refs.append(weakref.ref(model))
        return evaluate_fn(model)

    _search(n_trials=5, evaluate=remembering, finalize=False)
    assert len(refs) == 5 and all(ref() is None for ref in refs)
