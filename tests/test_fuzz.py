"""Hypothesis fuzzing of what fxqp reads from files (``tests/fuzz_hostile.py``), each run in a
subprocess with bounded memory and time per example.

``make test`` runs a small budget; ``pytest -m fuzz`` runs the large one. Every example must
end in an ``fxqp.FxqpError`` or a load that runs; anything else is a defect, printed with
the mutation that caused it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fuzz_hostile.py")


def fuzz(target: str, examples: int, seed: int, tmp_path: Path, timeout: int) -> dict:
    out = tmp_path / f"{target}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(WORKER), target, str(examples), str(seed), str(out)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    counts, defects = result["counts"], result["defects"]
    print(f"{target}: {counts}")
    assert not defects, json.dumps(defects[:5], indent=1)
    assert counts["other"] == 0 and counts["tried"] == counts["error"] + counts["loaded"]
    return counts


@pytest.mark.parametrize("target", ["artifact", "spec"])
def test_fuzzed_files_give_clean_errors_or_working_loads(tmp_path, target):
    counts = fuzz(target, 150, 0, tmp_path, timeout=600)
    assert counts["tried"] >= 100 and counts["error"] >= 50 and counts["loaded"] >= 1  # both outcomes are reached


@pytest.mark.fuzz
@pytest.mark.parametrize("target", ["artifact", "spec"])
def test_fuzzed_files_large_budget(tmp_path, target):
    fuzz(target, 5000, 1, tmp_path, timeout=3 * 3600)
