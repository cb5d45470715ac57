"""Private torch names in fxqp and passes are the ones docs/developers.md lists, with a reason."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parent.parent


class _Net(nn.Module):
    def forward(self, x):
        return x


def _torch_objects() -> list[object]:
    """Objects whose private attributes count as torch's: what fxqp's code reaches into."""
    gm = fx.symbolic_trace(_Net())
    return [
        _Net(),
        torch.zeros(1),
        gm,
        gm.graph,
        next(iter(gm.graph.nodes)),
        fx.Tracer(),
        torch.zeros(1).untyped_storage(),
        parametrize.ParametrizationList,
        parametrize,  # module-level private functions and globals of torch's modules too
        nn.modules.module,
        fx.graph_module,
    ]


def private_torch_names() -> dict[str, set[str]]:
    """name -> files, for the private torch names used in fxqp/ and passes/: dotted
    ``torch._...`` paths, and private attributes of torch objects that the code reads, sets
    or overrides (names the code itself assigns as ``self._name`` are its own)."""
    sources = {str(p.relative_to(ROOT)): p.read_text() for d in ("fxqp", "passes") for p in (ROOT / d).rglob("*.py")}
    own = set()
    for text in sources.values():
        own |= set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", text))
    objects = _torch_objects()
    found: dict[str, set[str]] = {}
    for path, text in sources.items():
        for name in re.findall(r"\btorch\._\w+(?:\.\w+)*", text):
            found.setdefault(name, set()).add(path)
        names = set(re.findall(r"(?<=[\w)\]])\.(_[a-z]\w*)\b", text))
        names |= set(re.findall(r"(?:getattr|hasattr|setattr|delattr)\([^,]+,\s*\"(_[a-z]\w*)\"", text))
        names |= set(re.findall(r"^\s+def (_[a-z]\w*)\(", text, re.M))
        for name in names - own:
            if name == "_orig_mod" or any(hasattr(o, name) for o in objects):  # _orig_mod: torch.compile's wrapper
                found.setdefault(name, set()).add(path)
    return found


def _section(heading: str) -> str:
    """The text of docs/developers.md's section ``## heading``, up to the next section."""
    text = (ROOT / "docs" / "developers.md").read_text()
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def listed_names() -> set[str]:
    section = _section("Private torch names still used")
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def test_every_private_torch_name_is_listed_with_a_reason():
    found, listed = private_torch_names(), listed_names()
    unlisted = {name: sorted(files) for name, files in found.items() if name not in listed}
    assert not unlisted, f"private torch names used but not listed in docs/developers.md: {unlisted}"
    stale = listed - set(found)
    assert not stale, f"listed in docs/developers.md but no longer used: {sorted(stale)}"


def test_the_scan_finds_private_names():
    """The scan is not blind: it sees names of each kind in this project's code."""
    found = private_torch_names()
    assert {"torch._assert", "_buffers", "_apply", "_version"} <= set(found)
    assert "_values" not in found  # passes.examples assigns self._values: its own name
    assert "_global_forward_hooks" in found  # a global of torch.nn.modules.module


CHANGES = re.compile(r"\.(__class__|recompile|__reduce_ex__|__reduce__|__deepcopy__)\s*=(?!=)")
"""An assignment that changes a torch object's class, or a method of a class torch made."""


def class_changes() -> dict[str, set[str]]:
    """file -> the attributes assigned there (see :data:`CHANGES`), in fxqp/ and passes/."""
    found: dict[str, set[str]] = {}
    for d in ("fxqp", "passes"):
        for path in (ROOT / d).rglob("*.py"):
            for name in CHANGES.findall(path.read_text()):
                found.setdefault(str(path.relative_to(ROOT)), set()).add(name)
    return found


def test_every_class_change_of_a_torch_object_is_listed_with_a_reason():
    """Class swaps and class patches are listed in docs/developers.md, each with its reason,
    by the attribute assigned and the file that assigns it."""
    listed: dict[str, set[str]] = {}
    for line in _section("Torch objects changed in place").splitlines():
        if line.startswith("| `"):
            cells = line.split("|")
            for path in re.findall(r"`([^`]+)`", cells[2]):
                listed.setdefault(path, set()).update(re.findall(r"`([^`]+)`", cells[1]))
    assert class_changes() == listed
