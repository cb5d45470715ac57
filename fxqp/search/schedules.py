"""Quantize/prune schedules — the seed paper on non-commutativity says a best one exists for
each network and task; this search looks for it, on Optuna.

Each trial samples a spec from a :class:`~fxqp.search.space.SearchSpace` (per rule group:
the order of quantization and pruning for weights and activations, their start fractions,
ramp lengths, optionally bits and sparsity), trains the network from the same initial
weights for ``total_steps`` steps, lowers it, and records two objectives: the ``"metric"``
that ``evaluate_fn`` returns for the lowered model (higher is better) and the bytes of the
saved artifact (fewer is better). The result is the Pareto front of the trials that meet
the constraints (``{"bytes": B}``, through Optuna's ``trial.set_constraint``).

Reference specs (the six hand-written orders of ``fxqp demo``, say) can be trained the
same way in a study of their own, ``<study>.references``, so that the front is compared
with them on the same axes (:meth:`ScheduleFront.dominated`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

import fxqp
from fxqp.lower.artifact import serialize
from fxqp.report import Report
from fxqp.search.space import SearchSpace
from fxqp.search.study import Heartbeat, SearchError, StudyRecord, TrialRecord, open_study, read_study, require_optuna
from fxqp.search.trial import call_train, evaluation_dict
from fxqp.spec import Spec

__all__ = ["SchedulePoint", "ScheduleFront", "schedules", "dominates", "pareto_front", "front_of_study", "SAMPLERS"]

SAMPLERS = ("tpe", "gp", "random", "nsga2")
REFERENCES_SUFFIX = ".references"


@dataclass(frozen=True)
class SchedulePoint:
    """One trained schedule: its spec (fractions of the run), metric and artifact bytes."""

    number: int
    spec: Spec
    metric: float
    artifact_bytes: int
    evaluation: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    feasible: bool = True

    @classmethod
    def from_record(cls, trial: TrialRecord) -> "SchedulePoint":
        metric, size = trial.values
        return cls(
            trial.number,
            Spec.from_dict(trial.spec),
            float(metric),
            int(size),
            dict(trial.attrs.get("evaluation", {})),
            dict(trial.params),
            trial.feasible,
        )


def dominates(a: SchedulePoint, b: SchedulePoint) -> bool:
    """``a`` is at least as good as ``b`` on both axes (metric up, bytes down) and better on one."""
    return a.metric >= b.metric and a.artifact_bytes <= b.artifact_bytes and (a.metric > b.metric or a.artifact_bytes < b.artifact_bytes)


def pareto_front(points: Sequence[SchedulePoint]) -> list[SchedulePoint]:
    """The feasible points no other feasible point dominates, by increasing bytes (one of
    several equal points: the first trial)."""
    feasible = [p for p in points if p.feasible]
    front = []
    for p in feasible:
        if any(dominates(q, p) for q in feasible):
            continue
        if any(q.metric == p.metric and q.artifact_bytes == p.artifact_bytes for q in front):
            continue
        front.append(p)
    return sorted(front, key=lambda p: (p.artifact_bytes, -p.metric))


@dataclass
class ScheduleFront:
    """What :func:`schedules` found.

    Attributes:
        pareto: the non-dominated feasible trials, by increasing artifact bytes.
        trials: every complete trial.
        references: the reference specs' results by name.
        study: the study's name.
    """

    pareto: list[SchedulePoint]
    trials: list[SchedulePoint]
    references: dict[str, SchedulePoint]
    study: str

    def dominated(self) -> list[str]:
        """The references some point of the front dominates."""
        return [name for name, ref in self.references.items() if any(dominates(p, ref) for p in self.pareto)]

    def table(self) -> Report:
        """The front and the references, with which reference each front point dominates."""
        rows = []
        for p in self.pareto:
            beaten = [name for name, ref in self.references.items() if dominates(p, ref)]
            rows.append([f"trial {p.number}", f"{p.metric:.4g}", f"{p.artifact_bytes:,}", ", ".join(beaten) or "—", _describe(p.spec)])
        for name, ref in self.references.items():
            rows.append([name, f"{ref.metric:.4g}", f"{ref.artifact_bytes:,}", "", "reference"])
        notes = (
            [f"{len(self.trials)} complete trials; the front dominates {len(self.dominated())} of {len(self.references)} references"]
            if self.references
            else [f"{len(self.trials)} complete trials"]
        )
        return Report(
            f"Pareto front of study {self.study!r}: metric (higher is better) against artifact bytes",
            ["point", "metric", "artifact bytes", "dominates", "schedule"],
            rows,
            notes,
        )


def _describe(spec: Spec) -> str:
    """``weight: P40→64% Q8@92%; activation: Q8@94%`` — each rule's ops in order."""
    parts = []
    for rule in spec.rules:
        for kind in ("weight", "activation"):
            ops = getattr(rule, kind)
            if not ops:
                continue
            text = " ".join(
                f"Q{op.bits}@{op.start}"
                if op.kind == "quantize"
                else f"P{op.sparsity:g}@{op.start}" + (f"→{op.end}" if op.end is not None else "")
                for op in ops
            )
            parts.append(f"{kind[0]}: {text}")
    return "; ".join(parts)


def front_of_study(record: StudyRecord, references: StudyRecord | None = None) -> ScheduleFront:
    """The :class:`ScheduleFront` of a schedule study read back (:func:`fxqp.search.read_study`)."""
    points = [SchedulePoint.from_record(t) for t in record.complete() if t.spec is not None]
    refs = {}
    if references is not None:
        for t in references.complete():
            refs[t.params.get("reference", f"trial {t.number}")] = SchedulePoint.from_record(t)
    return ScheduleFront(pareto_front(points), points, refs, record.name)


def _sampler(kind: str, seed: int) -> Any:
    optuna = require_optuna()
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def schedules(
    make_model: Callable[[], nn.Module],
    train_fn: Callable[..., Any],
    evaluate_fn: Callable[[nn.Module], Any],
    *,
    space: SearchSpace | Mapping[str, Any] | str | os.PathLike,
    total_steps: int,
    example_inputs: tuple[Any, ...] | torch.Tensor | None = None,
    n_trials: int = 80,
    sampler: str = "tpe",
    constraints: Mapping[str, float] | None = None,
    references: Mapping[str, Spec] | None = None,
    storage: Any = None,
    study_name: str | None = None,
    seed: int = 0,
    heartbeat: Heartbeat = Heartbeat(),
    on_ready: Callable[[], None] | None = None,
    progress: bool = True,
) -> ScheduleFront:
    """Search quantize/prune schedules: the Pareto front of metric against artifact bytes
    (see the module doc).

    Args:
        make_model: builds the float network; called with the same seed for every trial, so
            every schedule starts from the same weights.
        train_fn: ``train_fn(model, total_steps)`` trains a transformed model in place for
            exactly that many steps (training-mode forwards), seeded the same for every trial.
        evaluate_fn: ``evaluate_fn(lowered_model)`` returns the metric (higher is better),
            or a mapping with ``"metric"`` and any other numbers to record.
        space: a :class:`~fxqp.search.space.SearchSpace`, its dict form, or a YAML file.
        total_steps: the run's length, against which the sampled fractions resolve.
        example_inputs: passed to :func:`fxqp.transform` (static activation masks get their
            shape; filter pruning its channel groups).
        n_trials: trials in all, every worker's counted.
        sampler: ``"tpe"`` (Optuna's multi-objective default), ``"gp"``, ``"nsga2"`` or
            ``"random"``.
        constraints: ``{"bytes": B}``; overrides the space's.
        references: specs trained once each in the study ``<study>.references``.
        storage: where the study lives; workers with the same storage and study name share it.
        study_name: the study's name in ``storage``.
        seed: seeds the initial weights, the training and the sampler.
        heartbeat: how dead workers are detected.
        on_ready: called once the studies are open, before the first trial (``fxqp
            search`` starts its other workers there).
        progress: tqdm progress bars.
    """
    if sampler not in SAMPLERS:
        raise SearchError(f"sampler: {sampler!r} is not accepted; expected one of {', '.join(map(repr, SAMPLERS))}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise SearchError(f"total_steps: {total_steps!r} is not accepted; expected an integer >= 1")
    if isinstance(space, (str, os.PathLike)):
        space = SearchSpace.from_yaml(space)
    elif not isinstance(space, SearchSpace):
        space = SearchSpace.from_dict(space)
    space.check_run_length(total_steps)
    limits = dict(space.constraints if constraints is None else constraints)
    if set(limits) - {"bytes"}:
        raise SearchError(f"constraints: {sorted(limits)} is not accepted; expected {{'bytes': B}}")
    inputs = None if example_inputs is None else (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
    meta = {"search": "schedules", "space": space.to_dict(), "total_steps": total_steps, "constraints": limits, "seed": seed}

    def train_and_measure(trial: Any, spec: Spec) -> tuple[float, float]:
        trial.set_user_attr("spec", spec.to_dict())
        torch.manual_seed(seed)
        model = make_model()
        gm = fxqp.transform(model, spec, example_inputs=inputs, total_steps=total_steps)
        torch.manual_seed(seed)
        call_train(train_fn, gm, total_steps, f"trial {trial.number}")
        gm.eval()
        lowered = fxqp.lower(gm)
        evaluation = evaluation_dict(evaluate_fn(lowered))
        if "metric" in evaluation:
            metric = evaluation["metric"]
        elif set(evaluation) == {"value"}:
            metric = evaluation["value"]
        else:
            raise SearchError(
                f"evaluate_fn returned {sorted(evaluation)}; the schedule search maximizes a metric: return a number or a mapping with 'metric'"
            )
        size = len(serialize(lowered))
        trial.set_user_attr("evaluation", evaluation)
        trial.set_user_attr("artifact_bytes", size)
        if limits:
            trial.set_user_attr("constraints", {"bytes": size - limits["bytes"]})
            trial.set_constraint("bytes", size - limits["bytes"])
        if not math.isfinite(metric):
            raise SearchError(f"trial {trial.number}: evaluate_fn returned a metric of {metric}")
        return metric, float(size)

    directions = ["maximize", "minimize"]
    reference_record = None
    if references:
        optuna = require_optuna()
        names = list(references)
        reference_study = open_study(
            storage,
            _references_name(study_name),
            directions=directions,
            sampler=optuna.samplers.RandomSampler(seed=seed),
            meta={**meta, "references": {n: references[n].to_dict() for n in names}},
            heartbeat=heartbeat,
        )
        for name in names:
            reference_study.study.enqueue_trial({"reference": name}, skip_if_exists=True)
        if on_ready is not None:
            on_ready()

        def reference_objective(trial: Any) -> tuple[float, float]:
            return train_and_measure(trial, references[trial.suggest_categorical("reference", names)])

        reference_study.run(reference_objective, len(names), progress=progress, desc="references")
        reference_record = read_study(reference_study.storage, reference_study.study.study_name)

    study = open_study(storage, study_name, directions=directions, sampler=_sampler(sampler, seed), meta=meta, heartbeat=heartbeat)
    if on_ready is not None and not references:
        on_ready()

    def objective(trial: Any) -> tuple[float, float]:
        return train_and_measure(trial, space.sample(trial))

    study.run(objective, n_trials, progress=progress, desc=f"schedules ({sampler})", best=_front_text)
    return front_of_study(read_study(study.storage, study.study.study_name), reference_record)


def _references_name(study_name: str | None) -> str:
    return (study_name or "fxqp-search") + REFERENCES_SUFFIX


def _front_text(study: Any) -> str:
    return f"front {len(study.best_trials)}"
