"""Per-layer filter-pruning ratios of a low-precision network, found by Bayesian
optimization — the method of the seed paper on pruning quantized networks (Guerra et al.
2020), on Optuna.

The network is first transformed with a *base spec* (its quantizers) and, optionally,
trained (``pretrain_steps``). Each prunable layer — or coupled group of layers, which lose
the same filters (:mod:`fxqp.groups`) — is one variable: the fraction ``r`` of its filters
pruned, in ``[0, max_ratio]``. A trial prunes the trained network at its ratios (the
``round(r·C)`` filters with the largest quantization angle, scored from the next layers by
default), lowers it and minimizes

    val_loss + α · params% / 100 + (α/4) · bits% / 100

where ``params%`` and ``bits%`` are the lowered model's parameters and its size by the
paper's convention (:func:`fxqp.lower.size.seed_size_bytes`: every weight at its bit width,
scales and float tensors at 32 bits) as percentages of the unpruned quantized model's, and
``val_loss`` is the ``"loss"`` that ``evaluate_fn`` returns for the lowered model.

Strategies:

* ``"layerwise"`` — the paper's procedure: layers from the last to the first, each a study of
  its own in the same storage (``<study>.layer<k>.<group>``): 3 probes at ``0``,
  ``max_ratio/2`` and ``max_ratio``, ``n_random`` random points, then ``n_guided`` points of
  Optuna's Gaussian-process sampler; the layer keeps its best ratio, and the network is
  fine-tuned for ``finetune_steps`` when that ratio is at least ``finetune_threshold``;
* ``"joint"`` — one study over all ratios: the same three probes for every layer at once,
  then ``sampler`` (``"gp"``: Optuna's ``GPSampler``, ``"tpe"`` or ``"random"``, for
  comparison) for ``n_trials`` trials in all.

Then the best ratios are applied and the network is fine-tuned for ``final_steps``.
Trials evaluate the pruned network as it is (``trial_steps=0``, the paper's procedure) or
after ``trial_steps`` of fine-tuning.

Default ``α`` by the base spec's weight quantizer, as in the paper's code: 7 for DoReFa, 5
for XNOR-Net (binary with per-channel scales), 2 for plain binary weights, 1 otherwise.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import safetensors.torch
import torch
from torch import fx, nn
from torch.nn.utils import parametrize as torch_parametrize

import fxqp
from fxqp.atomic import atomic_path
from fxqp.lower.artifact import serialize
from fxqp.lower.size import parameter_count, seed_size_bytes, site_sizes
from fxqp.ops import ScheduledOp, WeightPruner
from fxqp.report import Report
from fxqp.search.study import Heartbeat, SearchError, SearchStudy, open_study, require_optuna
from fxqp.search.trial import call_train, evaluation_dict
from fxqp.sites import plan_sites
from fxqp.spec import Prune, Quantize, Rule, Spec
from fxqp.transform import as_spec, trace_model

__all__ = [
    "LayerGroup",
    "Objective",
    "RatioResult",
    "layer_ratios",
    "default_alpha",
    "ALPHAS",
    "STRATEGIES",
    "load_state",
    "compute_weight_masks",
]

ALPHAS = {"dorefa": 7.0, "xnor": 5.0, "binary": 2.0, "other": 1.0}
"""Default ``α`` by weight quantizer (the seed paper's code): DoReFa, XNOR-Net, plain binary, other."""

STRATEGIES = ("joint", "layerwise")
SAMPLERS = ("gp", "tpe", "random")
PROBES = 3  # 0, max/2, max


@dataclass(frozen=True)
class LayerGroup:
    """One variable of the search: layers whose filters are pruned together.

    Attributes:
        name: the group's name (its first layer's path with dots as underscores), also the
            Optuna parameter name.
        layers: module paths of the layers whose filters the group prunes.
        channels: filters in each of them.
        position: graph position of its last layer (later layers have larger positions).
    """

    name: str
    layers: tuple[str, ...]
    channels: int
    position: int


@dataclass(frozen=True)
class Objective:
    """The terms of the objective of one evaluated network."""

    loss: float
    params_pct: float
    bits_pct: float
    alpha: float

    @property
    def value(self) -> float:
        """``loss + α·params%/100 + (α/4)·bits%/100``."""
        return self.loss + self.alpha * self.params_pct / 100 + self.alpha / 4 * self.bits_pct / 100

    def to_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "params_pct": self.params_pct, "bits_pct": self.bits_pct, "alpha": self.alpha, "value": self.value}


@dataclass
class RatioResult:
    """What :func:`layer_ratios` found.

    Attributes:
        best_spec: the base spec plus, per pruned layer, a rule with its base ops followed by
            ``Prune(sparsity=r, structure="filter", ...)`` (start 0: the search pruned the
            trained network at once; set ``start``/``end`` to prune during a training run).
        ratios: the ratio of each layer (every layer of a group has the group's).
        groups: the variables searched.
        objective: the terms of the best trial, as it was evaluated.
        final: the terms after the final fine-tuning (``None`` without ``finalize``).
        evaluation: what ``evaluate_fn`` returned for the final lowered model.
        model: the final transformed model; ``lowered``: its lowered form.
        studies: the names of the studies (one, or one per layer).
        evaluations: trials evaluated in all.
    """

    best_spec: Spec
    ratios: dict[str, float]
    groups: list[LayerGroup]
    objective: Objective
    final: Objective | None = None
    evaluation: dict[str, float] = field(default_factory=dict)
    model: Any = None
    lowered: Any = None
    studies: list[str] = field(default_factory=list)
    evaluations: int = 0

    def table(self) -> Report:
        """Per layer: ratio, filters kept, packed bytes and bytes by the paper's convention
        in the final lowered model; the objective's terms as notes."""
        sizes = {s.site: s for s in site_sizes(self.lowered)} if self.lowered is not None else {}
        rows = []
        for group in sorted(self.groups, key=lambda g: g.position):
            ratio = self.ratios.get(group.layers[0], 0.0)
            for layer in group.layers:
                size = sizes.get(f"{layer}.weight")
                kept = None
                if self.lowered is not None:
                    kept = _out_channels(self.lowered.get_submodule(layer))
                seed = None if size is None else size.n * size.bits / 8
                rows.append(
                    [
                        layer,
                        group.name,
                        f"{ratio:.3f}",
                        "—" if kept is None else f"{kept}/{group.channels}",
                        "—" if size is None else f"{size.packed_bytes:,}",
                        "—" if seed is None else f"{seed:,.0f}",
                    ]
                )
        notes = [f"best trial: {_terms_text(self.objective)}"]
        if self.final is not None:
            notes.append(f"after the final fine-tuning: {_terms_text(self.final)}")
        return Report(
            f"per-layer filter-pruning ratios ({self.evaluations} evaluations)",
            ["layer", "group", "ratio", "filters kept", "packed bytes", "weight bytes (seed convention)"],
            rows,
            notes,
        )


def _terms_text(o: Objective) -> str:
    return f"objective {o.value:.4f} = loss {o.loss:.4f} + {o.alpha:g}·{o.params_pct:.1f}%/100 (params) + {o.alpha / 4:g}·{o.bits_pct:.1f}%/100 (bits)"


def _out_channels(module: nn.Module) -> int:
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    return int(module.weight.shape[1 if transposed else 0])


def default_alpha(spec: Spec) -> float:
    """``α`` for the weight quantizers of ``spec`` (:data:`ALPHAS`; the first kind found in
    the order DoReFa, XNOR-Net, binary)."""
    methods = set()
    for rule in spec.rules:
        for op in rule.weight or ():
            if isinstance(op, Quantize):
                methods.add("xnor" if op.method == "binary" and op.scaled is not False else op.method)
    for kind in ("dorefa", "xnor", "binary"):
        if kind in methods:
            return ALPHAS[kind]
    return ALPHAS["other"]


# --------------------------------------------------------------------------- trained state


_ORIGINAL = re.compile(r"\.parametrizations\.([^.]+)\.original$")


def _plain_key(key: str) -> str:
    return _ORIGINAL.sub(r".\1", key)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load ``state`` — the state dict of the same network transformed with another spec
    whose sites carry the same ops first — into ``model``: each tensor goes to the key of the
    same name, ``X.parametrizations.w.original`` and ``X.w`` counting as one (a tensor that
    one spec parametrizes and the other does not). Returns the keys of ``model`` that
    ``state`` did not fill (the state of ops only ``model`` has).

    Raises:
        SearchError: a tensor of ``state`` has no place in ``model``.
    """
    target = {_plain_key(key): key for key in model.state_dict(keep_vars=True)}
    mapped = {}
    for key, value in state.items():
        destination = target.get(_plain_key(key))
        if destination is None:
            raise SearchError(f"trained state: {key!r} has no place in the model transformed with the trial's spec")
        mapped[destination] = value
    result = model.load_state_dict(mapped, strict=False)
    return list(result.missing_keys)


@torch.no_grad()
def compute_weight_masks(model: nn.Module) -> None:
    """Compute, now, the masks of the weight pruners that are due at the model's step, as
    the next training forward would (coupled groups included): the weights are read once
    with the pruners in training mode. Nothing else changes: no batch is seen, no
    statistic moves, the step does not advance."""
    owners = [
        m
        for m in model.modules()
        if torch_parametrize.is_parametrized(m, "weight") and any(isinstance(op, WeightPruner) for op in m.parametrizations["weight"])
    ]
    pruners = [op for m in owners for op in m.parametrizations["weight"] if isinstance(op, WeightPruner)]
    modes = [p.training for p in pruners]
    try:
        for pruner in pruners:
            pruner.train(True)
        for owner in owners:
            _ = owner.weight  # computing the weight runs the pruners
    finally:
        for pruner, mode in zip(pruners, modes):
            pruner.train(mode)


def _fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{tensor.dtype}:{tuple(state[key].shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _loss_of(evaluation: dict[str, float]) -> float:
    if "loss" in evaluation:
        return evaluation["loss"]
    if set(evaluation) == {"value"}:
        return evaluation["value"]
    raise SearchError(
        f"evaluate_fn returned {sorted(evaluation)}; the ratio search minimizes the validation loss: return a number or a mapping with 'loss'"
    )


# --------------------------------------------------------------------------- the search


class _Network:
    """The trained base network and what every trial is built from."""

    def __init__(
        self,
        make_model: Callable[[], nn.Module],
        base_spec: Spec,
        example_inputs: tuple[Any, ...],
        template: Prune,
        layers: Sequence[str] | None,
        max_ratio: float,
    ):
        self.model = make_model()
        if not isinstance(self.model, nn.Module):
            raise SearchError(f"make_model returned {type(self.model).__name__}; expected a torch.nn.Module")
        self.base_spec, self.example_inputs, self.template, self.max_ratio = base_spec, example_inputs, template, max_ratio
        plan = plan_sites(trace_model(self.model, generate_code=False).graph_module, base_spec)
        self.base_ops = {a.site.module_path: a.ops for a in plan.weights if a.ops}
        candidates = [path for path, ops in self.base_ops.items() if self._prunable(path, ops, layers)]
        if not candidates:
            raise SearchError(
                f"no layer to prune: the base spec gives {'quantized ' if template.criterion == 'angle' else ''}weight ops to none of the layers {list(layers) if layers else ''}"
            )
        # every candidate pruned by one and the same op: the coupled groups are the variables
        probe = fxqp.transform(self.model, self.spec({path: 0.5 for path in candidates}), example_inputs=example_inputs)
        order = {node.target: i for i, node in enumerate(probe.graph.nodes) if node.op == "call_module"}
        groups = []
        for name, group in probe.get_submodule("fxqp_groups").named_children() if hasattr(probe, "fxqp_groups") else ():
            if group.config.structure != "filter":
                continue
            paths = tuple(m.module for m in group.producers)
            groups.append(LayerGroup(name, paths, int(group.keep.numel()), max(order.get(p, -1) for p in paths)))
        self.groups = sorted(groups, key=lambda g: g.position)
        self.notes = list(probe.fxqp_schedule.group_notes)
        if not self.groups:
            raise SearchError(
                f"no layer to prune: none of {candidates} is in a channel group whose filters can be removed ({'; '.join(self.notes) or 'no coupled group'})"
            )

    def _prunable(self, path: str, ops: tuple, layers: Sequence[str] | None) -> bool:
        if layers is not None and not any(fnmatch.fnmatchcase(path, pattern) for pattern in layers):
            return False
        weight = self.model.get_submodule(path).weight
        if weight.dim() < 2:
            return False
        return self.template.criterion != "angle" or any(isinstance(op, Quantize) for op in ops)

    def by_layer(self, ratios: Mapping[str, float]) -> dict[str, float]:
        """Group ratios (by group name) as layer ratios (by layer path)."""
        return {path: ratios.get(group.name, 0.0) for group in self.groups for path in group.layers}

    def spec(self, by_layer: Mapping[str, float]) -> Spec:
        """The base spec plus, per pruned layer (ratio > 0), a rule with its base ops followed
        by the filter-pruning op at its ratio."""
        rules = list(self.base_spec.rules)
        for path, ratio in by_layer.items():
            if ratio > 0:
                rules.append(Rule(names=[path], weight=[*self.base_ops[path], replace(self.template, sparsity=float(ratio))]))
        return Spec(rules=rules)

    def build(self, ratios: Mapping[str, float], state: Mapping[str, torch.Tensor]) -> fx.GraphModule:
        """The network pruned at ``ratios`` (by group name) from ``state``: masks computed."""
        gm = fxqp.transform(self.model, self.spec(self.by_layer(ratios)), example_inputs=self.example_inputs)
        load_state(gm, state)
        compute_weight_masks(gm)
        return gm

    @staticmethod
    def sizes(lowered: nn.Module) -> tuple[int, float]:
        """(parameters, size by the paper's convention in bytes) of a lowered network."""
        return parameter_count(lowered), seed_size_bytes(lowered)


@dataclass
class _Measured:
    objective: Objective
    evaluation: dict[str, float]
    artifact_bytes: int
    lowered: Any


def layer_ratios(
    make_model: Callable[[], nn.Module],
    base_spec: Spec | Mapping[str, Any],
    train_fn: Callable[..., Any],
    evaluate_fn: Callable[[nn.Module], Any],
    *,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    alpha: float | None = None,
    max_ratio: float = 0.4,
    strategy: str = "joint",
    n_trials: int | None = None,
    sampler: str = "gp",
    n_startup_trials: int = 10,
    n_random: int = 5,
    n_guided: int = 5,
    pretrain_steps: int = 0,
    finetune_steps: int = 0,
    finetune_threshold: float = 0.05,
    final_steps: int = 0,
    trial_steps: int = 0,
    layers: Sequence[str] | None = None,
    prune: Prune | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    storage: Any = None,
    study_name: str | None = None,
    seed: int = 0,
    heartbeat: Heartbeat = Heartbeat(),
    pruner: Any = None,
    finalize: bool = True,
    on_ready: Callable[[], None] | None = None,
    progress: bool = True,
) -> RatioResult:
    """Search one filter-pruning ratio per prunable layer of a quantized network (see the
    module doc for the objective and the strategies).

    Args:
        make_model: builds the float network (called once; pretrained weights welcome).
        base_spec: its quantization (a :class:`fxqp.Spec` or dict). A ``Prune`` op with
            ``structure="filter"`` in it gives the criterion (default: ``angle``, scored from
            the next layers, as the paper's code); fractions of the run resolve against
            ``pretrain_steps``.
        train_fn: ``train_fn(model, steps)`` trains a transformed model in place for exactly
            ``steps`` optimizer steps (training-mode forwards); when it takes a ``report``
            keyword, it may call ``report(step, val_loss)`` so that Optuna's pruner can stop a
            bad trial early (``trial_steps > 0``).
        evaluate_fn: ``evaluate_fn(lowered_model)`` returns the validation loss, or a mapping
            with ``"loss"`` (and any other numbers to record, e.g. ``"metric"``).
        example_inputs: inputs of one forward (the channel groups are found with them).
        alpha: the size weight ``α`` (default: :func:`default_alpha` of the base spec).
        max_ratio: the largest ratio searched, in (0, 1).
        strategy: ``"joint"`` or ``"layerwise"``.
        n_trials: trials of the joint study (default 60); layerwise runs ``3 + n_random +
            n_guided`` per layer instead.
        sampler: joint: ``"gp"``, ``"tpe"`` or ``"random"``.
        n_startup_trials: joint: trials (the three probes included) before the GP or TPE
            sampler guides.
        pretrain_steps: train the base (quantized, unpruned) network this long first.
        finetune_steps: layerwise: fine-tune after a layer pruned by at least
            ``finetune_threshold``.
        final_steps: fine-tune the network pruned at the best ratios.
        trial_steps: fine-tune each trial before evaluating it (0: evaluate it as pruned).
        layers: globs of the layer paths to consider (default: every layer the base spec
            quantizes; with another criterion than ``angle``, every layer with weight ops).
        prune: the filter-pruning op to apply (its sparsity is replaced by each ratio).
        base_checkpoint: a safetensors file of the trained base network: loaded when it
            exists, written after pretraining otherwise, so that workers share one base.
        storage: where the study lives (:mod:`fxqp.search.study`); workers with the same
            storage and study name share it, and a rerun resumes it.
        study_name: the study's name in ``storage``.
        seed: seeds the samplers, the pretraining and the fine-tuning.
        heartbeat: how dead workers are detected.
        pruner: an Optuna pruner for trials whose ``train_fn`` reports (``trial_steps > 0``;
            default: Optuna's ``MedianPruner``).
        finalize: apply the best ratios and fine-tune; ``False`` for a worker that only
            runs trials of a shared study.
        on_ready: called once the base is trained and the study open, before the first
            trial (``fxqp search`` starts its other workers there).
        progress: tqdm progress bars.

    Raises:
        SearchError: bad arguments, no prunable layer, a study made by another search, or a
            worker whose trained base network differs from the study's.
        SpecError: an invalid base spec.
    """
    optuna = require_optuna()
    if strategy not in STRATEGIES:
        raise SearchError(f"strategy: {strategy!r} is not accepted; expected one of {', '.join(map(repr, STRATEGIES))}")
    if sampler not in SAMPLERS:
        raise SearchError(f"sampler: {sampler!r} is not accepted; expected one of {', '.join(map(repr, SAMPLERS))}")
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not 0.0 < max_ratio < 1.0:
        raise SearchError(f"max_ratio: {max_ratio!r} is not accepted; expected a number in (0, 1)")
    if strategy == "layerwise" and n_trials is not None:
        raise SearchError(
            f"n_trials: layerwise runs 3 probes + n_random + n_guided trials per layer; set those instead of n_trials={n_trials!r}"
        )
    for name, value in (
        ("pretrain_steps", pretrain_steps),
        ("finetune_steps", finetune_steps),
        ("final_steps", final_steps),
        ("trial_steps", trial_steps),
        ("n_random", n_random),
        ("n_guided", n_guided),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SearchError(f"{name}: {value!r} is not accepted; expected an integer >= 0")
    base = as_spec(base_spec).resolve(pretrain_steps or None)
    template = prune or _template(base)
    if template.structure != "filter":
        raise SearchError(f"prune: structure {template.structure!r}; the ratio search prunes filters (structure='filter')")
    base = Spec(rules=[_without_filter_pruning(rule) for rule in base.rules if _without_filter_pruning(rule) is not None])
    template = replace(template, start=0, end=None)
    alpha = default_alpha(base) if alpha is None else float(alpha)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    network = _Network(make_model, base, inputs, template, layers, max_ratio)

    base_gm, base_state = _trained_base(network, train_fn, pretrain_steps, base_checkpoint, seed)
    _check_base(base_gm)
    reference = _reference_sizes(network, base_gm)
    meta = {
        "search": "layer_ratios",
        "strategy": strategy,
        "alpha": alpha,
        "max_ratio": max_ratio,
        "groups": [g.name for g in network.groups],
        "base_spec": base.to_dict(),
        "prune": template.to_dict(),
        "trial_steps": trial_steps,
        "base_model_sha256": _fingerprint(base_state),
    }

    def measure(gm: fx.GraphModule) -> _Measured:
        gm.eval()
        lowered = fxqp.lower(gm)
        evaluation = evaluation_dict(evaluate_fn(lowered))
        params, seed_bytes = network.sizes(lowered)
        objective = Objective(_loss_of(evaluation), 100.0 * params / reference[0], 100.0 * seed_bytes / reference[1], alpha)
        return _Measured(objective, evaluation, len(serialize(lowered)), lowered)

    def evaluate(trial: Any, ratios: Mapping[str, float], state: Mapping[str, torch.Tensor]) -> float:
        gm = network.build(ratios, state)
        trial.set_user_attr("spec", network.spec(network.by_layer(ratios)).to_dict())
        trial.set_user_attr("ratios", network.by_layer(ratios))
        if trial_steps:
            torch.manual_seed(seed + trial.number)
            terms_of_size = _size_terms(network, gm, reference, alpha)

            def report(step: int, loss: float) -> None:
                trial.report(float(loss) + terms_of_size, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            call_train(train_fn, gm, trial_steps, f"trial {trial.number}", report)
        measured = measure(gm)
        trial.set_user_attr("evaluation", measured.evaluation)
        trial.set_user_attr("artifact_bytes", measured.artifact_bytes)
        trial.set_user_attr("terms", measured.objective.to_dict())
        return measured.objective.value

    studies = _Studies(storage, study_name or "fxqp-search", seed, heartbeat, pruner, on_ready, progress)
    if strategy == "joint":
        outcome = _joint(network, evaluate, base_state, meta, studies, n_trials or 60, sampler, n_startup_trials)
    else:
        outcome = _layerwise(network, evaluate, base_state, meta, studies, n_random, n_guided, train_fn, finetune_steps, finetune_threshold)

    ratios = network.by_layer(outcome.ratios)
    best_objective = Objective(**{k: v for k, v in outcome.terms.items() if k != "value"})
    result = RatioResult(
        network.spec(ratios), ratios, list(network.groups), best_objective, studies=outcome.studies, evaluations=outcome.evaluations
    )
    if not finalize:
        return result
    gm = network.build(outcome.ratios, outcome.state)
    torch.manual_seed(seed + 2)
    call_train(train_fn, gm, final_steps, "final fine-tuning")
    measured = measure(gm)
    result.final, result.evaluation, result.model, result.lowered = measured.objective, measured.evaluation, gm, measured.lowered
    return result


def _size_terms(network: _Network, gm: fx.GraphModule, reference: tuple[int, float], alpha: float) -> float:
    params, seed_bytes = network.sizes(fxqp.lower(gm))
    return alpha * params / reference[0] + alpha / 4 * seed_bytes / reference[1]


def _template(spec: Spec) -> Prune:
    """The first filter-pruning op of ``spec``, or angle scored from the next layers."""
    for rule in spec.rules:
        for op in rule.weight or ():
            if isinstance(op, Prune) and op.structure == "filter":
                return op
    return Prune(sparsity=0.0, structure="filter", criterion="angle", score_from="next")


def _without_filter_pruning(rule: Rule) -> Rule | None:
    """``rule`` without its filter-pruning ops (the search places its own), or ``None`` when
    nothing is left of it."""
    if not any(isinstance(op, Prune) and op.structure == "filter" for op in rule.weight or ()):
        return rule
    weight = tuple(op for op in rule.weight if not (isinstance(op, Prune) and op.structure == "filter"))
    if not weight and rule.activation is None:
        return None
    return replace(rule, weight=weight)


def _trained_base(
    network: _Network, train_fn: Callable[..., Any], steps: int, checkpoint: Any, seed: int
) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    gm = fxqp.transform(network.model, network.base_spec, example_inputs=network.example_inputs, total_steps=steps or None)
    if checkpoint is not None and os.path.isfile(checkpoint):
        try:
            state = safetensors.torch.load_file(os.fspath(checkpoint))
            gm.load_state_dict(state)
        except Exception as err:  # noqa: BLE001 - a file of another network, or not safetensors
            raise SearchError(
                f"base_checkpoint {os.fspath(checkpoint)}: cannot be loaded into the base network ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from None
        return gm, _clone_state(gm)
    torch.manual_seed(seed)
    call_train(train_fn, gm, steps, "pretraining")
    state = _clone_state(gm)
    if checkpoint is not None:
        with atomic_path(checkpoint) as tmp:
            safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    return gm, state


def _check_base(gm: fx.GraphModule) -> None:
    """The search prunes the *quantized* network: every op of the base spec must be active
    and have seen data (activation ranges observed, learned steps initialized)."""
    step = int(gm.fxqp_schedule.step)
    late, unseen = [], []
    for module in gm.modules():
        if not isinstance(module, ScheduledOp):
            continue
        if not bool(module.active()):
            late.append(f"{module.site} ({module.config.kind} from step {int(module.start)})")
        elif any(
            isinstance(getattr(module, name, None), torch.Tensor) and not bool(getattr(module, name))
            for name in ("observed", "initialized")
        ):
            unseen.append(module.site)
    if late:
        raise SearchError(
            f"the base network at step {step} has ops that have not started: {', '.join(late[:5])}{' ...' if len(late) > 5 else ''}; pretrain longer (pretrain_steps) or start them earlier"
        )
    if unseen:
        raise SearchError(
            f"the base network has quantizers that have seen no data: {', '.join(unseen[:5])}{' ...' if len(unseen) > 5 else ''}; pretrain it (pretrain_steps > 0) so that their ranges are observed"
        )


def _reference_sizes(network: _Network, base_gm: fx.GraphModule) -> tuple[int, float]:
    base_gm.eval()
    return network.sizes(fxqp.lower(base_gm))


def _make_sampler(kind: str, seed: int, n_startup_trials: int) -> Any:
    optuna = require_optuna()
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    return optuna.samplers.RandomSampler(seed=seed)


def _enqueue_probes(study: SearchStudy, names: Sequence[str], max_ratio: float) -> None:
    """The paper's three probes (0, max/2, max), once per study."""
    if study.study.get_trials(deepcopy=False):
        return
    for value in (0.0, max_ratio / 2, max_ratio):
        study.study.enqueue_trial({name: value for name in names}, skip_if_exists=True)


@dataclass
class _Outcome:
    """What a strategy found: the ratios by group name, the best trial's terms, the state to
    fine-tune from, the studies and the trials evaluated."""

    ratios: dict[str, float]
    terms: dict[str, float]
    state: dict[str, torch.Tensor]
    studies: list[str]
    evaluations: int


def _best_text(study: Any) -> str:
    try:
        return f"best {study.best_value:.4f}"
    except ValueError:
        return ""


@dataclass(frozen=True)
class _Studies:
    """Where the studies of one search live, and how they run."""

    storage: Any
    name: str
    seed: int
    heartbeat: Heartbeat
    pruner: Any
    on_ready: Callable[[], None] | None
    progress: bool

    def open(self, name: str, sampler: Any, meta: Mapping[str, Any]) -> SearchStudy:
        return open_study(
            self.storage, name, directions=["minimize"], sampler=sampler, pruner=self.pruner, meta=meta, heartbeat=self.heartbeat
        )


def _joint(
    network: _Network,
    evaluate: Callable[..., float],
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    studies: _Studies,
    n_trials: int,
    sampler: str,
    n_startup: int,
) -> _Outcome:
    names = [g.name for g in network.groups]
    study = studies.open(studies.name, _make_sampler(sampler, studies.seed, n_startup), {**meta, "sampler": sampler})
    _enqueue_probes(study, names, network.max_ratio)
    if studies.on_ready is not None:
        studies.on_ready()

    def objective(trial: Any) -> float:
        ratios = {name: trial.suggest_float(name, 0.0, network.max_ratio) for name in names}
        return evaluate(trial, ratios, state)

    study.run(objective, n_trials, progress=studies.progress, desc=f"ratios ({sampler})", best=_best_text)
    best = study.study.best_trial
    ratios = {name: best.params.get(name, 0.0) for name in names}
    return _Outcome(ratios, best.user_attrs["terms"], state, [study.study.study_name], len(study.study.get_trials(deepcopy=False)))


def _layerwise(
    network: _Network,
    evaluate: Callable[..., float],
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    studies: _Studies,
    n_random: int,
    n_guided: int,
    train_fn: Callable[..., Any],
    finetune_steps: int,
    threshold: float,
) -> _Outcome:
    optuna = require_optuna()
    chosen: dict[str, float] = {}
    names, evaluations, terms = [], 0, {}
    layers = list(reversed(network.groups))  # the last layer first
    for k, group in enumerate(layers):
        name = f"{studies.name}.layer{k:02d}.{group.name}"
        sampler = optuna.samplers.GPSampler(seed=studies.seed + k, n_startup_trials=PROBES + n_random)
        study = studies.open(name, sampler, {**meta, "layer": group.name, "fixed": dict(chosen), "state_sha256": _fingerprint(state)})
        _enqueue_probes(study, [group.name], network.max_ratio)
        if studies.on_ready is not None and k == 0:
            studies.on_ready()

        def objective(trial: Any, group: LayerGroup = group) -> float:
            ratio = trial.suggest_float(group.name, 0.0, network.max_ratio)
            return evaluate(trial, {**chosen, group.name: ratio}, state)

        study.run(
            objective,
            PROBES + n_random + n_guided,
            progress=studies.progress,
            desc=f"layer {k + 1}/{len(layers)} {group.name}",
            best=_best_text,
        )
        best = study.study.best_trial
        chosen[group.name], terms = best.params[group.name], best.user_attrs["terms"]
        names.append(name)
        evaluations += len(study.study.get_trials(deepcopy=False))
        if finetune_steps and chosen[group.name] >= threshold:
            gm = network.build(chosen, state)
            torch.manual_seed(studies.seed + 1000 + k)
            call_train(train_fn, gm, finetune_steps, f"fine-tuning after {group.name}")
            state = _clone_state(gm)
    return _Outcome(dict(chosen), terms, state, names, evaluations)
