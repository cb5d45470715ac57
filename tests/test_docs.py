"""The README is a front door that works: short, its example runs, its spec in YAML is the
spec in Python, its links resolve; the API reference covers the public API; the code's
docstrings and comments carry no measurements that go stale (those live in docs/).

The documentation site itself is built by ``make docs`` (``mkdocs build --strict``).
"""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
import yaml

import fxqp
from fxqp import Spec

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250


def section(text: str, name: str) -> str:
    """The README text between ``--8<-- [start:name]`` and ``--8<-- [end:name]`` (the markers
    docs/index.md includes)."""
    match = re.search(rf"--8<-- \[start:{name}\][^\n]*\n(.*?)\n[^\n]*--8<-- \[end:{name}\]", text, re.S)
    assert match, f"README.md has no {name!r} section"
    return match.group(1)


def code_block(text: str, language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", text, re.S)
    assert len(blocks) == 1, f"expected one {language} block, found {len(blocks)}"
    return blocks[0]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the rest belongs in docs/"


@pytest.fixture(scope="module")
def readme_example(tmp_path_factory):
    """Run the README's example as a user would (in an empty folder); its namespace."""
    code = code_block(section(README.read_text(encoding="utf-8"), "example"), "python")
    folder = tmp_path_factory.mktemp("readme")
    namespace: dict = {"__name__": "__readme__"}
    cwd = Path.cwd()
    torch.manual_seed(0)
    try:
        import os

        os.chdir(folder)
        exec(compile(code, "README.md example", "exec"), namespace)
    finally:
        os.chdir(cwd)
    namespace["folder"] = folder
    return namespace


def test_readme_example_trains_on_its_schedule_lowers_saves_and_loads(readme_example):
    ns = readme_example
    gm, low, restored, steps, x = ns["gm"], ns["low"], ns["restored"], ns["steps"], ns["x"]
    # the plain loop advanced the schedule once per training forward, and every op started
    assert int(gm.fxqp_schedule.step) == steps
    state = fxqp.metrics(gm)
    assert state["fxqp/ops_active"] == state["fxqp/ops"] > 0
    assert state["fxqp/weight_sparsity"] >= 0.5
    # what was saved is what was lowered, and the lowered model is the trained one in eval mode
    assert (ns["folder"] / "model.fxqp").stat().st_size > 0
    with torch.no_grad():
        assert torch.equal(restored(x[:64]), low(x[:64]))
        assert torch.equal(low(x[:64]), gm.eval()(x[:64]))


def test_readme_yaml_spec_is_the_python_spec(readme_example):
    text = code_block(section(README.read_text(encoding="utf-8"), "yaml"), "yaml")
    assert Spec.from_dict(yaml.safe_load(text)) == readme_example["spec"]


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub and MkDocs' toc extension make it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return re.sub(r"[ ]", "-", text)


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = ROOT / target
        assert path.exists(), f"README.md links to {link}: no such file"
        if anchor:
            assert anchor in _anchors(path), f"README.md links to {link}: no such heading in {target}"


def test_api_reference_documents_every_public_name():
    page = (ROOT / "docs" / "api" / "fxqp.md").read_text(encoding="utf-8")
    documented = {}
    for target in re.findall(r"^::: ([\w.]+)$", page, re.M):
        module_name, _, attr = target.rpartition(".")
        module = __import__(module_name, fromlist=[attr])
        documented[target] = getattr(module, attr)
    objects = list(documented.values())
    missing = [name for name in fxqp.__all__ if not any(getattr(fxqp, name) is obj for obj in objects)]
    assert not missing, f"docs/api/fxqp.md lacks ::: entries for {missing}"


# A measurement in prose: a duration with its unit, a speed ratio against something, or a
# share of a run's time — the figures that go stale as the code and the machines change.
MEASUREMENT = re.compile(
    r"\b\d+(\.\d+)?\s?(ms|µs|us|ns)\b"
    r"|\b\d+(\.\d+)?\s?[×x]\s+(float|faster|slower|the time|as fast)"
    r"|\b\d+(\.\d+)?(–\d+(\.\d+)?)?%\s+of\s+(its|the|a)\s+(time|transform|step time|run time)\b"
    r"|\b(a|one)\s+(fifth|tenth|third|quarter)\s+of\s+the\s+(transform|step time)\b"
)


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a Python file."""
    source = path.read_text(encoding="utf-8")
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            out.append((token.start[0], token.string))
    return out


def test_measurement_pattern_catches_benchmark_figures():
    assert MEASUREMENT.search("about 5 µs per module")
    assert MEASUREMENT.search("took 1.21× float eager")
    assert MEASUREMENT.search("that is 4–8% of its time")
    assert MEASUREMENT.search("about a fifth of the transform time")
    assert MEASUREMENT.search("is a tenth of the transform")
    assert not MEASUREMENT.search("default: a third of the run")
    assert not MEASUREMENT.search("one order beats the other a quarter of the time")
    assert not MEASUREMENT.search("weights pruned from 40% of the run, quantized at 92%")
    assert not MEASUREMENT.search("quantize weights at 40% of the steps")
    assert not MEASUREMENT.search("a 3×3 convolution on 8×8 digits")


def test_code_prose_carries_no_benchmark_figures():
    found = []
    for package in ("fxqp", "passes"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, text in _prose(path):
                for match in MEASUREMENT.finditer(text):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0)!r}")
    assert not found, "measurements belong in docs/performance.md, not in docstrings or comments:\n" + "\n".join(found)
