"""Rules of the code's layout that a review would otherwise have to remember."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.ops.prune import ActivationPruner, WeightPruner
from fxqp.ops.quantize import WeightQuantizer

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {str(p.relative_to(ROOT)): p.read_text() for d in ("fxqp", "passes") for p in (ROOT / d).rglob("*.py")}
OP_CLASSES = r"(WeightPruner|ActivationPruner|WeightQuantizer|ActivationQuantizer|LsqQuantizer)"


def test_no_private_names_are_imported_across_modules():
    found = [
        (path, name)
        for path, text in SOURCES.items()
        for names in re.findall(r"^\s*from [\w.]+ import \(?([^)\n]+)", text, re.M)
        for name in re.split(r"[,\s]+", names)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not found, found


def test_chains_are_wired_by_the_ops_not_by_type_checks():
    """The transform, lowering, stages and weight chains ask an op what it does (``link``,
    ``quantizes``, ``prunes``) or the accelerator registry (:mod:`fxqp.ops.accelerate`)
    instead of checking its class: a new op kind touches fxqp/ops/ only."""
    for path in ("fxqp/transform.py", "fxqp/lower/lower.py", "fxqp/stages.py", "fxqp/ops/chain.py"):
        assert not re.search(rf"isinstance\([^)]*{OP_CLASSES}", SOURCES[path]), path


def test_link_wires_each_op_of_a_chain():
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5, structure="filter", criterion="angle"), Quantize(bits=4)]),
            Rule(modules=["Linear"], weight=[Quantize(bits=4), Prune(sparsity=0.5)]),
            Rule(functions=["relu"], activation=[Quantize(bits=8), Prune(sparsity=0.5)]),
        ]
    )
    from fxqp.models import DigitsNet

    gm = fxqp.transform(DigitsNet(), spec, example_inputs=(torch.randn(2, 1, 8, 8),))
    first, second = gm.get_submodule("conv2").parametrizations["weight"]
    assert isinstance(first, WeightPruner) and first.__dict__["_quantizer"] is second and not first.__dict__["_tiebreak"]
    assert isinstance(second, WeightQuantizer)
    quantizer, pruner = gm.get_submodule("fc").parametrizations["weight"]
    assert pruner.__dict__["_tiebreak"] and pruner.__dict__["_owner"][0] is gm.get_submodule("fc")
    stage_pruners = [
        op for m in gm.modules() if isinstance(m, fxqp.stages.ActivationStage) for op in m.ops if isinstance(op, ActivationPruner)
    ]
    assert stage_pruners and all(op.wants_latent for op in stage_pruners)
