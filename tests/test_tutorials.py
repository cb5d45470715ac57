"""The tutorials in ``tutorials/`` run end to end with ``--tiny`` and say what they should.

Each script runs in its own process, as a user would run it, from the repository root.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"

# script -> (does it take --out, texts its output must contain, files it must write to --out)
EXPECTED = {
    "01_quick_start.py": (
        True,
        [
            "fxqp summary: step",
            "prune(0.5) → quantize(4b sym/ch)",
            "fxqp summary (lowered at step",
            "x smaller, header and scales included",
        ],
        ["digits.fxqp"],
    ),
    "02_writing_a_spec.py": (
        True,
        [
            "Spec.from_yaml(path) == Spec in Python: True",
            "Spec.from_dict(yaml.safe_load(text)) == Spec in Python: True",
            "fxqp explain: DigitsNet",
            "SpecError: rules[0].modules: 'Conv2D'",
            "did you mean 'sparsity'?",
            "every mistake above was reported as fxqp.SpecError",
        ],
        ["spec.yaml", "typo.yaml"],
    ),
    "03_ordering_and_schedules.py": (
        True,
        [
            "composition order: [Prune, Quantize] vs [Quantize, Prune]",
            "2-bit per-tensor grid: 0 weights differ",
            "3 optimizer steps -> schedule step 3",
            "P(w)->Q: test accuracy",
            "Q->P(w): test accuracy",
        ],
        ["schedule_Pw-then-Q.png", "schedule_Q-then-Pw.png"],
    ),
    "04_lowering_saving_exporting.py": (
        True,
        [
            "decode=cache       max |lowered - transformed eval| = 0 ",
            "decode=on_the_fly  max |lowered - transformed eval| = 0 ",
            "fxqp artifact v",
            "prints the same table: True",
            "loaded: max |loaded - lowered| = 0",
            "ArtifactError",
            "exported program on 450 test images",
        ],
        ["digits.fxqp", "digits.pt2"],
    ),
    "06_searching.py": (
        True,
        [
            "per-layer filter-pruning ratios",
            "test accuracy of the pruned, fine-tuned, lowered network",
            "Pareto front of study 'schedules'",
            "read back: study 'ratios', 6 complete trials",
            "read back: study 'schedules', 6 complete trials",
        ],
        ["studies.db", "ratios.yaml"],
    ),
    "05_testing_your_model.py": (
        False,
        [
            "ok  resume_is_bit_exact",
            "passed for 5 drawn specs",
            "passed for 3 drawn networks",
            "raised InvariantError",
            "FixedNet passes",
            "all checks done",
        ],
        [],
    ),
}


def test_every_tutorial_is_tested():
    assert sorted(p.name for p in TUTORIALS.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_tutorial_runs_with_tiny_settings(script, tmp_path):
    takes_out, texts, files = EXPECTED[script]
    argv = [sys.executable, str(TUTORIALS / script), "--tiny"]
    if takes_out:
        argv += ["--out", str(tmp_path)]
    # One thread per process: the tiny models gain nothing from more, and the runs stay
    # quick when other work shares the machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    for text in texts:
        assert text in done.stdout, f"{script}: {text!r} not in its output:\n{done.stdout[-5000:]}"
    for name in files:
        assert (tmp_path / name).is_file(), f"{script} did not write {name}; wrote {sorted(os.listdir(tmp_path))}"
