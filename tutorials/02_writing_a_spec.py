"""Tutorial 2 — writing a spec: selectors, rule precedence, YAML files, explain, errors.

A :class:`fxqp.Spec` is plain data: an ordered list of :class:`fxqp.Rule`. Each rule

* **selects** sites with ``modules`` (class names or classes, subclasses included),
  ``functions`` (canonical names: ``relu`` covers ``F.relu``, ``torch.relu``, ``x.relu()``;
  ``add`` covers ``x + y``), ``names`` (fnmatch globs over module paths and graph node
  names, or ``re:<regex>``) and ``exclude`` (globs that remove sites), and
* gives the ordered ops of the selected **weights** and/or **activations** (call outputs).

A site matches a rule when it matches ``modules`` OR ``functions`` (whichever are given),
AND ``names`` (when given), AND no ``exclude`` pattern. When several rules match a site,
**the last matching rule wins**, separately for its weight and its activation; an empty
list (``weight=[]``) carves out an exception, ``None`` (the default) says nothing.

This script shows the same spec in Python and as a YAML file, uses ``fxqp.explain`` to see
which rule each site of a model gets before transforming anything, and shows the
``SpecError`` messages of a few deliberate mistakes.

Run::

    python tutorials/02_writing_a_spec.py [--tiny] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import yaml

import fxqp
from fxqp import Prune, Quantize, Rule, Spec, SpecError
from fxqp.models import DigitsNet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="accepted for symmetry with the other tutorials (this one is fast anyway)")
    parser.add_argument("--out", default=None, help="folder for the YAML file (default: a new temporary folder)")
    return parser.parse_args()


def banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


YAML_TEXT = """\
# Rules apply in order; for each site the last matching rule wins.
rules:
  # 0. every Conv2d and Linear weight but conv1's: prune to 50% on a ramp, then 8 bits
  - modules: [Conv2d, Linear]
    exclude: [conv1]
    weight:
      - {op: prune, sparsity: 0.5, start: 10, end: 50, every: 10}
      - {op: quantize, bits: 8, start: 60}
  # 1. the classifier only: 4 bits instead (replaces rule 0's ops for 'fc')
  - names: [fc]
    weight:
      - {op: quantize, bits: 4, start: 60}
  # 2. outputs of all ReLUs: the module calls and the functional torch.relu
  - modules: [ReLU]
    functions: [relu]
    activation:
      - {op: quantize, bits: 8, start: 20}
  # 3. ...except the last one (node relu_2): an empty list clears rule 2's ops there
  - names: [relu_2]
    activation: []
"""


def python_spec() -> Spec:
    """The spec of YAML_TEXT, written in Python."""
    return Spec(
        rules=[
            # Classes work as well as names: Rule(modules=[torch.nn.Conv2d, ...]) stores the
            # qualified name 'torch.nn.modules.conv.Conv2d' (a different but equivalent spec).
            Rule(
                modules=["Conv2d", "Linear"],
                exclude=["conv1"],
                weight=[Prune(sparsity=0.5, start=10, end=50, every=10), Quantize(bits=8, start=60)],
            ),
            Rule(names=["fc"], weight=[Quantize(bits=4, start=60)]),
            # Callables work too: functions=[torch.relu] is stored as its canonical name 'relu'.
            Rule(modules=["ReLU"], functions=[torch.relu], activation=[Quantize(bits=8, start=20)]),
            Rule(names=["relu_2"], activation=[]),
        ]
    )


def show_error(what: str, make) -> None:
    """Call ``make()`` and print the SpecError it raises."""
    try:
        make()
    except SpecError as err:
        print(f"\n{what}\n  -> SpecError: {err}")
    else:
        raise SystemExit(f"expected a SpecError for: {what}")


def main() -> None:
    args = parse_args()
    out = args.out or tempfile.mkdtemp(prefix="fxqp_tutorial02_")
    os.makedirs(out, exist_ok=True)
    model = DigitsNet(width=8)
    x = torch.rand(2, 1, 8, 8)

    # --- The model's sites --------------------------------------------------------------
    # DigitsNet calls its ReLU *module* twice (graph nodes 'relu' and 'relu_1': every
    # call is its own site) and torch.relu once ('relu_2'). An empty spec selects
    # nothing, so explain just lists every site.
    banner("the sites of DigitsNet (explain with an empty spec)")
    print(fxqp.explain(model, Spec()))

    # --- One spec, two forms ------------------------------------------------------------
    banner("the same spec in Python and in YAML")
    path = os.path.join(out, "spec.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(YAML_TEXT)
    from_file = Spec.from_yaml(path)
    from_dict = Spec.from_dict(yaml.safe_load(YAML_TEXT))
    in_python = python_spec()
    print(f"wrote {path}")
    print(f"Spec.from_yaml(path) == Spec in Python: {from_file == in_python}")
    print(f"Spec.from_dict(yaml.safe_load(text)) == Spec in Python: {from_dict == in_python}")
    print("spec.to_yaml() writes it back (fields at their default are left out):")
    print(in_python.to_yaml())
    assert from_file == in_python == from_dict

    # --- explain: which rule each site gets ---------------------------------------------
    # Before transforming, explain traces the model and tells, per site, the rule that
    # won and its ops. Read it against the YAML above:
    #   conv1.weight     excluded from rule 0, and no other rule selects it -> no ops
    #   conv2/3.weight   rules[0]: prune -> quantize
    #   fc.weight        rules[1]: its [quantize(4b)] replaces rule 0's list (the last
    #                    match wins; lists are not merged, so fc is not pruned)
    #   relu, relu_1     rules[2] (two calls of the same ReLU module: two sites)
    #   relu_2           rules[3]: '(none)', the empty list carved it out
    banner("fxqp.explain(model, spec)")
    report = fxqp.explain(model, in_python)
    print(report)
    winners = {row["site"]: row["rule"] for row in report.to_dicts()}  # the table as dicts
    assert winners["fc.weight"] == "rules[1]" and winners["relu_2"] == "rules[3]", winners

    gm = fxqp.transform(model, in_python, example_inputs=(x,))
    print()
    print(fxqp.summary(gm))

    # --- Globs and regular expressions --------------------------------------------------
    # 'names' alone selects. Globs and 're:' regular expressions (full match) are tried
    # against the node name AND the module path of each site. Mind shared modules:
    # DigitsNet's ReLU module 'relu' is called at nodes 'relu' and 'relu_1', so the glob
    # 'relu' selects both calls (the module path of 'relu_1' is 'relu'), whereas the
    # regular expression 're:relu_[0-9]' selects the nodes 'relu_1' and 'relu_2'.
    banner("names globs, re: patterns and exclude")
    globs = Spec(
        rules=[
            Rule(names=["conv*"], exclude=["conv1"], weight=[Quantize(bits=6)]),
            Rule(names=["relu"], activation=[Quantize(bits=8)]),
            Rule(names=["re:relu_[0-9]"], activation=[Quantize(bits=4)]),
        ]
    )
    print(globs.to_yaml())
    report = fxqp.explain(model, globs)
    print(report)
    ops = {row["site"]: row["rule"] for row in report.to_dicts()}
    print(f"\nrelu -> {ops['relu']}, relu_1 -> {ops['relu_1']} (last match), relu_2 -> {ops['relu_2']}")

    # --- Mistakes, and what fxqp says about them ----------------------------------------
    banner("deliberate mistakes")
    # A selector field none of whose entries matches a site is an error at transform
    # time, with the closest names as a hint ('Conv2D' is not a class name; 'Conv2d' is).
    wrong = Spec(rules=[Rule(modules=["Conv2D"], weight=[Quantize(bits=4)])])
    show_error("modules=['Conv2D'] (wrong capitalisation) at fxqp.transform:", lambda: fxqp.transform(model, wrong))
    # explain does not raise: it reports the same problem as a note under its table.
    print("\nexplain reports it without raising; its notes:")
    for note in fxqp.explain(model, wrong).notes:
        print(f"  {note}")
    # A field that only *partly* matches is fine: 'add' matches no site of DigitsNet but
    # 'relu' does, so explain shows a note and transform goes ahead.
    partial = Spec(rules=[Rule(functions=["relu", "add"], activation=[Quantize(bits=8)])])
    print("\nfunctions=['relu', 'add'] on a model without additions, explain's notes:")
    for note in fxqp.explain(model, partial).notes:
        print(f"  {note}")
    # Values are checked when the spec is built, with the location of the problem.
    show_error("Quantize(bits=0):", lambda: Quantize(bits=0))
    show_error("Prune(sparsity=0.5, start=100, end=50):", lambda: Prune(sparsity=0.5, start=100, end=50))
    # Typos in a file are located as rules[i].field, with 'did you mean' hints.
    typo = os.path.join(out, "typo.yaml")
    with open(typo, "w", encoding="utf-8") as f:
        f.write("rules:\n  - modules: [Linear]\n    weight:\n      - {op: prune, sparsty: 0.5}\n")
    show_error(f"a YAML file with 'sparsty' ({typo}):", lambda: Spec.from_yaml(typo))
    print("\ndone: every mistake above was reported as fxqp.SpecError")


if __name__ == "__main__":
    main()
