"""The core install: fxqp transforms, trains, lowers, saves and loads without the extras, and
what needs an extra says which ``pip install`` brings it, in one line.

Each check runs in a fresh interpreter in which the cli extra's modules (matplotlib,
scikit-learn, scikit-image, tqdm) cannot be imported, as on a machine where only
``pip install fxqp`` ran.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fxqp._extras import MissingExtraError, require
from fxqp.errors import FxqpError

ROOT = Path(__file__).resolve().parents[1]

CLI_EXTRA = ("matplotlib", "sklearn", "skimage", "tqdm")

BLOCK = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, sys

    BLOCKED = {blocked!r}

    class _NotInstalled(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # Answers for the blocked packages: importing one raises ModuleNotFoundError, as for an
        # absent package (a bare find_spec, which torch makes for optional packages without
        # importing them, sees a spec and moves on).
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {{spec.name!r}}", name=spec.name)

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _NotInstalled())
    """
)


def run_without(blocked, code, *args, tmp_path):
    """Run ``code`` (or ``-m fxqp`` with ``args``) in a fresh interpreter without ``blocked``."""
    script = tmp_path / "run.py"
    if code is None:  # the command line
        code = "import runpy, sys\nsys.argv = ['fxqp', *sys.argv[1:]]\nrunpy.run_module('fxqp', run_name='__main__')\n"
    script.write_text(BLOCK.format(blocked=tuple(blocked)) + textwrap.dedent(code))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


CORE_PIPELINE = """
import torch
from torch import nn
import fxqp
from fxqp import Prune, Quantize, Rule, Spec

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
spec = Spec(rules=[
    Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5, start=1), Quantize(bits=4, start=2)]),
    Rule(modules=["ReLU"], activation=[Quantize(bits=8, start=2)]),
])
print(fxqp.explain(model, spec))
gm = fxqp.transform(model, spec)
opt = torch.optim.SGD(gm.parameters(), lr=0.1)
x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
for _ in range(4):
    loss = nn.functional.cross_entropy(gm(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
print(fxqp.summary(gm))
low = fxqp.lower(gm)
fxqp.save(low, "model.fxqp")
loaded = fxqp.load("model.fxqp", model)
assert torch.equal(loaded(x), low(x)), "loaded model differs from the lowered one"
assert torch.equal(low(x), gm.eval()(x)), "lowered model differs from the transformed one"
absent = [m for m in {blocked!r} if m in sys.modules]
assert not absent, absent
print("CORE OK")
"""


def test_transform_train_lower_save_load_need_no_extra(tmp_path):
    done = run_without(CLI_EXTRA, CORE_PIPELINE.format(blocked=CLI_EXTRA), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "CORE OK" in done.stdout
    assert (tmp_path / "model.fxqp").stat().st_size > 0


MISSING = """
import fxqp.data, fxqp.plots
from fxqp._extras import MissingExtraError
from fxqp.errors import FxqpError

for call in (fxqp.data.digits, lambda: fxqp.plots.plot_history([1.0, 0.5], "history.png")):
    try:
        call()
    except MissingExtraError as err:
        assert isinstance(err, FxqpError) and isinstance(err, ImportError)
        print(err)
    else:
        raise AssertionError("no MissingExtraError")
"""


def test_what_needs_the_cli_extra_names_the_install(tmp_path):
    done = run_without(CLI_EXTRA, MISSING, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "the digits data set needs scikit-learn: pip install 'fxqp[cli]'",
        "fxqp's plots needs matplotlib: pip install 'fxqp[cli]'",
    ]


def test_the_command_line_prints_the_install_in_one_line(tmp_path):
    done = run_without(
        ("sklearn",), None, "demo", "--tasks", "digits", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "out"), tmp_path=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["fxqp demo: error: the digits data set needs scikit-learn: pip install 'fxqp[cli]'"]


def test_require_names_the_distribution_and_the_extra():
    with pytest.raises(MissingExtraError) as err:
        require("fxqp_no_such_module.sub", "this feature", "search")
    assert str(err.value) == "this feature needs fxqp_no_such_module: pip install 'fxqp[search]'"
    assert err.value.extra == "search" and err.value.name == "fxqp_no_such_module"
    assert isinstance(err.value, FxqpError)
    assert require("json", "this feature").dumps([1]) == "[1]"


def test_require_does_not_hide_a_broken_installed_module(tmp_path, monkeypatch):
    # an installed module whose own import fails is the user's problem to see, not a missing extra
    (tmp_path / "fxqp_broken_pkg.py").write_text("import fxqp_missing_dependency_of_it\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as err:
        require("fxqp_broken_pkg", "this feature")
    assert not isinstance(err.value, MissingExtraError)
    assert err.value.name == "fxqp_missing_dependency_of_it"
