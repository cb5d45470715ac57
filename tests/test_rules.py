"""fxqp.rules: the table of validity rules is what the spec and the op builders enforce."""

import re

import pytest
import torch

import fxqp
from fxqp import Prune, Quantize, Rule, SpecError
from fxqp.ops import build_op
from fxqp.rules import (
    BITS,
    LEARNED_MIN_BITS,
    N_OF_M_MAX,
    PRUNE_CRITERIA,
    PRUNE_SITES,
    PRUNE_STRUCTURES,
    QUANTIZE_METHODS,
    QUANTIZE_SITES,
    SCORE_FROM,
    SITE_KINDS,
    prune_structure,
)
from fxqp.sites import Site

WEIGHT_SITE = Site(kind="weight", name="conv.weight", target="Conv2d", module_path="conv", shape=(8, 4, 3, 3), channel_axis=0)
ACTIVATION_SITE = Site(kind="activation", name="relu", target="relu", function="relu")
SITES = {"weight": WEIGHT_SITE, "activation": ACTIVATION_SITE}


def _build(op, kind):
    return build_op(op, SITES[kind], torch.randn(WEIGHT_SITE.shape) if kind == "weight" else None)


@pytest.mark.parametrize("method", list(QUANTIZE_METHODS))
def test_every_method_takes_exactly_its_bits(method):
    rule = QUANTIZE_METHODS[method]
    for bits in range(BITS[0], BITS[1] + 1):
        if rule.takes_bits(bits):
            assert Quantize(bits=bits, method=method).bits == bits
        else:
            message = f"Quantize.bits: method {method!r} does not take bits={bits}; expected {rule.accepted_bits}"
            with pytest.raises(SpecError, match=f"^{re.escape(message)}$"):
                Quantize(bits=bits, method=method)
    with pytest.raises(SpecError, match=rf"^Rule\.weight\[0\]\.bits: {BITS[1] + 1} is outside the accepted range {BITS[0]}\.\.{BITS[1]}"):
        Rule.from_dict({"names": ["*"], "weight": [{"op": "quantize", "bits": BITS[1] + 1, "method": method}]})


@pytest.mark.parametrize("method", list(QUANTIZE_METHODS))
def test_every_method_takes_exactly_its_options(method):
    rule = QUANTIZE_METHODS[method]
    bits = max(rule.bits[0], LEARNED_MIN_BITS) if rule.takes_bits(LEARNED_MIN_BITS) else rule.bits[0]
    if rule.learned:
        assert Quantize(bits=bits, method=method, learned=True).learned
    else:
        with pytest.raises(SpecError, match=rf"^Quantize\.learned: True is the 'lsq' method and conflicts with method='{method}'"):
            Quantize(bits=bits, method=method, learned=True)
    if rule.fixed_grid:
        with pytest.raises(SpecError, match=rf"^Quantize\.symmetric: method '{method}' has a fixed grid; expected symmetric unset"):
            Quantize(bits=bits, method=method, symmetric=False)
    else:
        assert Quantize(bits=bits, method=method, symmetric=False).symmetric is False
    if rule.scaled:
        assert Quantize(bits=bits, method=method, scaled=False).scaled is False
    else:
        with pytest.raises(SpecError, match=r"^Quantize\.scaled: only the 'binary' method has an optional scale"):
            Quantize(bits=bits, method=method, scaled=False)


@pytest.mark.parametrize("kind", SITE_KINDS)
@pytest.mark.parametrize("method", list(QUANTIZE_METHODS))
def test_builders_put_a_method_only_on_its_kinds_of_site(method, kind):
    rule, site = QUANTIZE_METHODS[method], QUANTIZE_SITES[kind]
    op = Quantize(bits=rule.bits[1], method=method)
    if kind in rule.sites:
        assert _build(op, kind).config == op
    else:
        names = ", ".join(repr(m.name) for m in sorted(site.methods(), key=lambda m: m.name == "lsq"))
        with pytest.raises(SpecError, match=f"^method: '{method}' quantizes weights only; accepted for {kind}s: {re.escape(names)}$"):
            _build(op, kind)
    if not site.per_channel and kind in rule.sites:
        with pytest.raises(SpecError, match=f"^per_channel: {kind} quantization is per tensor"):
            _build(Quantize(bits=rule.bits[1], method=method, per_channel=True), kind)


@pytest.mark.parametrize("kind", SITE_KINDS)
def test_symmetric_grids_need_the_site_kinds_bits(kind):
    low = QUANTIZE_SITES[kind].symmetric_min_bits
    assert _build(Quantize(bits=low, symmetric=True), kind).config.bits == low
    if low > 1:
        with pytest.raises(SpecError, match=f"^bits: symmetric {low - 1}-bit {kind}s are not supported; accepted: bits {low}..16"):
            _build(Quantize(bits=low - 1, symmetric=True), kind)


def test_learned_step_needs_its_bits():
    assert Quantize(bits=LEARNED_MIN_BITS, learned=True).learned
    with pytest.raises(SpecError, match=rf"^Quantize\.learned: True needs bits >= {LEARNED_MIN_BITS}"):
        Quantize(bits=LEARNED_MIN_BITS - 1, learned=True)


STRUCTURE_EXAMPLES = ["element", "filter", "channel", "2:4", "1:8", f"{N_OF_M_MAX - 1}:{N_OF_M_MAX}"]


def _prune(structure, **kwargs):
    rule = prune_structure(structure)
    sparsity = rule.pattern.sparsity if rule.pattern else 0.5
    return Prune(sparsity=sparsity, structure=structure, **kwargs)


def test_structures_are_the_table_and_its_patterns():
    assert [prune_structure(s).name for s in STRUCTURE_EXAMPLES] == STRUCTURE_EXAMPLES
    assert set(PRUNE_STRUCTURES) == {"element", "filter", "channel", "N:M"}
    for bad in ("N:M", "4:2", "0:4", f"1:{N_OF_M_MAX + 1}", "2:2", "block"):
        assert prune_structure(bad) is None
        with pytest.raises(
            SpecError, match=rf"^Prune\.structure: '{bad}' is not accepted; expected 'element', 'filter', 'channel' or 'N:M'"
        ):
            Prune(sparsity=0.5, structure=bad)


@pytest.mark.parametrize("structure", STRUCTURE_EXAMPLES)
def test_every_structure_takes_exactly_its_criteria_and_score_from(structure):
    rule = prune_structure(structure)
    for criterion in PRUNE_CRITERIA:
        if criterion in rule.criteria:
            assert _prune(structure, criterion=criterion).criterion == criterion
        else:
            with pytest.raises(
                SpecError, match=rf"^Prune\.criterion: '{criterion}' scores filters or channels; expected structure 'filter' or 'channel'"
            ):
                _prune(structure, criterion=criterion)
    for score_from in SCORE_FROM:
        if score_from in rule.score_from:
            assert _prune(structure, score_from=score_from).score_from == score_from
        else:
            with pytest.raises(
                SpecError,
                match=rf"^Prune\.score_from: '{score_from}' scores filters by the layers that read them; expected structure 'filter'",
            ):
                _prune(structure, score_from=score_from)
    if rule.ramp:
        assert _prune(structure, end=5).end == 5
    else:
        with pytest.raises(SpecError, match=rf"^Prune\.end: structure '{structure}' has a fixed ratio and no ramp"):
            _prune(structure, end=5)
    if rule.pattern is not None:
        with pytest.raises(SpecError, match=rf"^Prune\.sparsity: structure '{structure}' keeps {rule.pattern.n} of every {rule.pattern.m}"):
            Prune(sparsity=0.9 if rule.pattern.sparsity != 0.9 else 0.8, structure=structure)


@pytest.mark.parametrize("kind", SITE_KINDS)
@pytest.mark.parametrize("structure", ["element", "filter", "channel", "2:4"])
def test_builders_put_a_structure_only_on_its_kinds_of_site(structure, kind):
    rule, site = prune_structure(structure), PRUNE_SITES[kind]
    op = _prune(structure)
    if kind in rule.sites:
        assert _build(op, kind).config == op
    else:
        with pytest.raises(SpecError, match=f"^structure: '{structure}' prunes weights; {kind}s accept 'element'"):
            _build(op, kind)
    for granularity in ("element", "channel"):
        for dynamic in (False, True):
            if granularity == "channel" and dynamic:
                continue
            element = Prune(sparsity=0.5, granularity=granularity, dynamic=dynamic)
            accepted = granularity in site.granularities and (site.dynamic or not dynamic)
            if kind == "weight" and not accepted:
                field = "granularity" if granularity not in site.granularities else "dynamic"
                with pytest.raises(SpecError, match=rf"^Rule\.weight\[0\]\.{field}: .* is an activation-only option; weights accept"):
                    Rule(names=["*"], weight=[element])
            elif accepted:
                assert _build(element, kind).config == element


SHAPES = [((8, 4, 3, 3), 0), ((6, 8), 0), ((4, 6, 3), 1), ((8,), None), ((3, 12, 1, 1), 0)]


@pytest.mark.parametrize("structure", ["element", "filter", "channel", "2:4", "1:3", "3:8"])
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_structure_fits_what_the_pruner_takes(structure, shape, axis):
    """The table's weight-shape rule agrees with the pruner's own site checks."""
    site = Site(kind="weight", name="m.weight", target="Conv2d", module_path="m", shape=shape, channel_axis=axis)
    op = _prune(structure)
    if prune_structure(structure).fits(shape, axis):
        assert build_op(op, site, torch.randn(shape)).config == op
    else:
        with pytest.raises(fxqp.SiteError, match=f"structure '{structure}' needs"):
            build_op(op, site, torch.randn(shape))


def _doc_rows(header: str) -> dict[str, list[str]]:
    """The rows of the table under the line starting with ``header`` in the spec reference page."""
    from pathlib import Path

    lines = (Path(__file__).parents[1] / "docs" / "api" / "fxqp.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_the_spec_reference_states_the_tables():
    methods = _doc_rows("| method |")
    assert list(methods) == list(QUANTIZE_METHODS)
    yes = {True: "yes", False: "no"}
    for name, (bits, sites, learned, fixed, scaled) in methods.items():
        rule = QUANTIZE_METHODS[name]
        assert bits == (str(rule.bits[0]) if rule.bits[0] == rule.bits[1] else f"{rule.bits[0]}..{rule.bits[1]}"), name
        assert sites == ", ".join(rule.sites), name
        assert (learned, fixed, scaled) == (yes[rule.learned], yes[rule.fixed_grid], yes[rule.scaled]), name
    structures = _doc_rows("| structure |")
    assert list(structures) == list(PRUNE_STRUCTURES)
    for name, (sites, criteria, score_from, ramp, _) in structures.items():
        rule = PRUNE_STRUCTURES[name]
        assert sites == ", ".join(rule.sites), name
        assert criteria == ", ".join(f"`{c}`" for c in rule.criteria), name
        assert score_from == ", ".join(f"`{s}`" for s in rule.score_from), name
        assert ramp.startswith(yes[rule.ramp]), name
    kinds = _doc_rows("| site |")
    for kind, (per_channel, symmetric, granularity, dynamic) in kinds.items():
        assert per_channel == yes[QUANTIZE_SITES[kind].per_channel]
        assert symmetric == f"bits >= {QUANTIZE_SITES[kind].symmetric_min_bits}"
        assert granularity == ", ".join(f"`{g}`" for g in PRUNE_SITES[kind].granularities)
        assert dynamic.startswith(yes[PRUNE_SITES[kind].dynamic])
