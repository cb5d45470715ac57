"""Automatic search on Optuna: per-layer filter-pruning ratios and quantize/prune schedules.

* :func:`layer_ratios` — one filter-pruning ratio per layer of a low-precision network by
  Bayesian optimization (the seed paper on pruning quantized networks; :mod:`fxqp.search.ratios`);
* :func:`schedules` — orders, start fractions (and bits, sparsity) of quantization and
  pruning: the Pareto front of metric against artifact bytes (:mod:`fxqp.search.schedules`);
* :func:`read_study` — a study read back from its storage, without running anything.

Studies live in any Optuna storage: memory, SQLite, a journal file or PostgreSQL; several
workers, on one machine or many, share one study (:mod:`fxqp.search.study`). Needs the
``search`` extra: ``pip install 'fxqp[search]'``.
"""

from fxqp.search.ratios import LayerGroup, Objective, RatioResult, default_alpha, layer_ratios
from fxqp.search.schedules import ScheduleFront, SchedulePoint, dominates, pareto_front, schedules
from fxqp.search.space import SearchSpace
from fxqp.search.study import Heartbeat, SearchError, StudyRecord, TrialRecord, read_study, study_names

__all__ = [
    "layer_ratios",
    "RatioResult",
    "LayerGroup",
    "Objective",
    "default_alpha",
    "schedules",
    "SearchSpace",
    "ScheduleFront",
    "SchedulePoint",
    "dominates",
    "pareto_front",
    "read_study",
    "study_names",
    "StudyRecord",
    "TrialRecord",
    "Heartbeat",
    "SearchError",
]
