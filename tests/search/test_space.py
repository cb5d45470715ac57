"""The schedule search's space: parsing, errors naming the field, sampling into specs."""

from __future__ import annotations

import optuna
import pytest

from fxqp import Prune, Quantize
from fxqp.search import SearchError, SearchSpace

SPACE = {
    "groups": [
        {
            "name": "weights",
            "modules": ["Conv2d"],
            "weight": {
                "order": ["prune_first", "quantize_first"],
                "quantize": {"bits": [4, 8], "start": ["20%", "90%"]},
                "prune": {
                    "sparsity": {"low": 0.3, "high": 0.7, "step": 0.1},
                    "start": ["10%", "60%"],
                    "length": ["5%", "40%"],
                    "refreshes": 4,
                },
            },
        },
        {
            "modules": ["ReLU"],
            "functions": ["relu"],
            "activation": {
                "order": "quantize_first",
                "quantize": {"bits": {"choices": [4, 8]}, "start": "50%", "method": "uniform"},
                "prune": {"sparsity": 0.5, "start": "70%", "dynamic": True},
            },
        },
    ],
    "constraints": {"bytes": 20000},
}


def test_sampling_builds_specs_in_fractions_of_the_run():
    space = SearchSpace.from_dict(SPACE)
    trial = optuna.trial.FixedTrial(
        {
            "weights.weight.quantize.bits": 6,
            "weights.weight.quantize.start": 85,
            "weights.weight.prune.sparsity": 0.5,
            "weights.weight.prune.start": 30,
            "weights.weight.prune.length": 20,
            "weights.weight.order": "prune_first",
            "g1.activation.quantize.bits": 4,
        }
    )
    spec = space.sample(trial)
    weight, activation = spec.rules[0].weight, spec.rules[1].activation
    assert weight == (Prune(sparsity=0.5, start="30%", end="50%", every="5%"), Quantize(bits=6, start="85%"))
    assert activation == (Quantize(bits=4, start="50%", method="uniform"), Prune(sparsity=0.5, start="70%", dynamic=True))
    assert spec.rules[1].modules == ("ReLU",) and spec.rules[1].functions == ("relu",)
    assert spec.resolve(200).rules[0].weight[0] == Prune(sparsity=0.5, start=60, end=100, every=10)
    # a ramp that would end after the run ends with it
    late = space.sample(
        optuna.trial.FixedTrial(
            {**trial.params, "weights.weight.prune.start": 60, "weights.weight.prune.length": 40, "weights.weight.order": "quantize_first"}
        )
    )
    assert late.rules[0].weight[1] == Prune(sparsity=0.5, start="60%", end="100%", every="10%")
    assert space.constraints == {"bytes": 20000.0}


def test_sampled_parameters_and_the_dict_form():
    space = SearchSpace.from_dict(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        spec = space.sample(trial)
        params = trial.params
        assert 4 <= params["weights.weight.quantize.bits"] <= 8 and round(params["weights.weight.prune.sparsity"], 9) in (
            0.3,
            0.4,
            0.5,
            0.6,
            0.7,
        )
        assert spec.rules[0].weight[0 if params["weights.weight.order"] == "prune_first" else 1].sparsity in (0.3, 0.4, 0.5, 0.6, 0.7)
        assert 20 <= params["weights.weight.quantize.start"] <= 90 and isinstance(params["weights.weight.quantize.start"], int)
        assert params["g1.activation.quantize.bits"] in (4, 8) and "g1.activation.order" not in params
        spec.resolve(100)  # every sampled ramp spans at least a step of a 100-step run
        study.tell(trial, 0.0)
    again = SearchSpace.from_dict(space.to_dict())
    assert again == space


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s["groups"][0]["weight"]["prune"].update(start=["10%", "60"]),
            r"groups\[0\]\.weight\.prune\.start\[1\]: '60' is not accepted; expected a whole percentage",
        ),
        (
            lambda s: s["groups"][0]["weight"]["quantize"].update(bits=[4, 17]),
            r"groups\[0\]\.weight\.quantize\.bits\[1\]: 17 is outside 1\.\.16",
        ),
        (lambda s: s["groups"][0]["weight"]["quantize"].update(bits=[8, 4]), r"groups\[0\]\.weight\.quantize\.bits: low 8 is above high 4"),
        (
            lambda s: s["groups"][0]["weight"]["prune"].update(length=["0%", "10%"]),
            r"groups\[0\]\.weight\.prune\.length: a searched ramp length must be above 0%",
        ),
        (lambda s: s["groups"][0]["weight"]["prune"].update(speed=3), r"groups\[0\]\.weight\.prune: unknown field 'speed'; accepted: "),
        (
            lambda s: s["groups"][0]["weight"].update(order=["prune_later"]),
            r"groups\[0\]\.weight\.order: \['prune_later'\] is not accepted",
        ),
        (lambda s: s["groups"][0]["weight"]["quantize"].pop("bits"), r"groups\[0\]\.weight\.quantize\.bits: missing"),
        (
            lambda s: s["groups"][0]["weight"]["quantize"].update(method="ternary"),
            r"groups\[0\]\.weight\.quantize: Quantize\.bits: method 'ternary' does not take bits=4",
        ),
        (lambda s: s["groups"][1].update(name="weights"), r"groups\[1\]\.name: 'weights' is not accepted; expected a unique identifier"),
        (lambda s: s["groups"][1].pop("activation"), r"groups\[1\]: give weight and/or activation"),
        (lambda s: s.update(constraints={"latency": 3}), r"space\.constraints: .* expected \{bytes: B\}"),
        (lambda s: s.update(group=[]), r"space: unknown key 'group'; accepted: groups, constraints"),
    ],
)
def test_errors_name_the_field(change, message):
    import copy

    data = copy.deepcopy(SPACE)
    change(data)
    with pytest.raises(SearchError, match=message):
        SearchSpace.from_dict(data)


def test_yaml_file_and_run_length(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "groups:\n  - modules: [Conv2d]\n    weight:\n      quantize: {bits: 8, start: ['10%', '50%']}\n      prune: {sparsity: 0.5, start: ['10%', '50%'], length: ['2%', '20%']}\n"
    )
    space = SearchSpace.from_yaml(path)
    assert space.groups[0].weight.order == ("prune_first", "quantize_first")
    space.check_run_length(50)
    with pytest.raises(SearchError, match=r"a ramp of 2% of a run of 49 steps is shorter than one step"):
        space.check_run_length(49)
    with pytest.raises(SearchError, match=r"space.yaml: no such file"):
        SearchSpace.from_yaml(tmp_path / "nope" / "space.yaml")
