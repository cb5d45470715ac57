"""Fuzzing fxqp's readers with hostile files, in a process with bounded memory and time.

Run by ``tests/test_fuzz.py`` as ``python tests/fuzz_hostile.py TARGET EXAMPLES SEED OUT``:
``TARGET`` is ``artifact`` or ``spec``. The process limits its own data segment
(``RLIMIT_DATA``: the heap and anonymous mappings) to what it uses after start-up plus
:data:`MEMORY_HEADROOM`, and every example to :data:`SECONDS_PER_EXAMPLE` of wall time (a
``SIGALRM``). Hypothesis draws the mutations; every example is classified:

* ``error``: an :class:`fxqp.FxqpError` (a clean refusal);
* ``loaded``: loaded (or parsed and applied), and the result runs on the example input;
* ``other``: any other exception, a ``MemoryError``, or the time limit: a defect, written
  out with the exception and the mutation that caused it.

The counts and the defects go to ``OUT`` as JSON; the test asserts there are no defects.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == HERE:
    sys.path.pop(0)  # tests/passes would shadow the passes package: appended after fxqp's imports

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as fixed_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fxqp  # noqa: E402
from fxqp import Spec  # noqa: E402
from fxqp.lower.artifact import DATA_PLACEHOLDER, encode_header_text, read_artifact  # noqa: E402

sys.path.append(HERE)
sys.path.append(os.path.join(HERE, "lower"))
from fxqp_test_nets import ReusedReluNet  # noqa: E402
from lowering_helpers import EVERY_FORM_SPEC as SPEC  # noqa: E402

MEMORY_HEADROOM = 2 << 30
SECONDS_PER_EXAMPLE = 20
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Timeout(BaseException):
    """Raised by the alarm: an example ran past its time (not an Exception, so no handler
    in the code under test swallows it)."""


def _alarm(signum: int, frame: Any) -> None:
    raise Timeout(f"more than {SECONDS_PER_EXAMPLE} s")


def _limit_memory() -> None:
    with open("/proc/self/status", encoding="ascii") as status:
        data = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
    limit = data + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _classify(counts: dict[str, int], defects: list[dict[str, Any]], description: list[str], attempt: Any) -> None:
    """Run one example's ``attempt`` under the time limit and count its outcome: ``loaded``,
    ``error`` (an FxqpError) or ``other`` (anything else, recorded as a defect)."""
    counts["tried"] += 1
    signal.alarm(SECONDS_PER_EXAMPLE)
    try:
        attempt()
        counts["loaded"] += 1
    except fxqp.FxqpError:
        counts["error"] += 1
    except BaseException as err:  # noqa: BLE001 (every other outcome is the defect being looked for)
        counts["other"] += 1
        defects.append(
            {"mutation": description, "error": f"{type(err).__name__}: {str(err)[:500]}", "trace": traceback.format_exc()[-3000:]}
        )
    finally:
        signal.alarm(0)


# --------------------------------------------------------------------------- values

#: JSON values a hostile header or spec may hold in place of any field.
hostile_scalars = st.one_of(
    st.sampled_from([0, 1, -1, 2, 7, 16, 17, 2**31, 2**31 - 1, 2**40, 2**62, 2**63, -(2**63), 3_000_000_000, 10**30]),
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "",
            "0",
            "4",
            "float32",
            "float16",
            "int64",
            "bool",
            "uint8",
            "sign",
            "affine",
            "lsq",
            "symmetric",
            "float",
            "full",
            "empty",
            "bitmask",
            "golomb_keep",
            "golomb_zero",
            "mask",
            "quantize",
            "topk",
            "\ud800",
            "x" * 5000,
            "re:(.*.*.*.*.*.*)*z",
            "re:" + "(" * 300 + ")" * 300,
            "re:[",
            "*",
            "conv1",
            "conv2.weight",
            "40%",
            "101%",
        ]
    ),
    st.text(max_size=20),
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def _deep(depth: int) -> str:
    """A marker :func:`_header_text` replaces by lists nested ``depth`` deep (which ``json``
    cannot write)."""
    return f"\x00deep{depth}\x00"


def _header_text(header: dict[str, Any]) -> str:
    text = json.dumps(dict(header, data_sha256=DATA_PLACEHOLDER), separators=(",", ":"), sort_keys=True)
    for depth in (200, 1100, 5000):
        text = text.replace(json.dumps(_deep(depth)), "[" * depth + "1" + "]" * depth)
    return text


special_values = st.one_of(hostile_values, st.sampled_from([200, 1100, 5000]).map(_deep))


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document."""
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _paths(child, prefix + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw: Any, document: Any, protect: tuple = ()) -> tuple[Any, list[str]]:
    """``document`` with 1 to 3 mutations: a value replaced, a key dropped or added, an entry
    duplicated under another key, a list entry appended; with a description of each."""
    doc = copy.deepcopy(document)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p and (not protect or p[: len(protect)] != protect)]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _get(doc, path[:-1])
        key = path[-1]
        how = draw(st.sampled_from(["replace", "replace", "nudge", "nudge", "drop", "add", "copy", "append"]))
        if how == "nudge" and type(parent[key]) is int:  # stays an integer: reaches the checks of ranges and consistency
            parent[key] = draw(st.sampled_from([parent[key] + 1, parent[key] - 1, parent[key] * 2, parent[key] // 2, 0, -parent[key]]))
            done.append(f"{list(path)} = {parent[key]}")
        elif how in ("replace", "nudge"):
            value = draw(special_values)
            parent[key] = value
            done.append(f"{list(path)} = {json.dumps(value)[:200]}")
        elif how == "drop":
            del parent[key]
            done.append(f"del {list(path)}")
        elif how == "add" and isinstance(parent, dict):
            new = draw(st.text(max_size=12))
            parent[new] = draw(special_values)
            done.append(f"add {list(path[:-1]) + [new]}")
        elif how == "copy" and isinstance(parent, dict):
            new = draw(st.text(max_size=12))
            parent[new] = copy.deepcopy(parent[key])
            done.append(f"copy {list(path)} to {new!r}")
        elif how == "append" and isinstance(parent[key], list):
            parent[key].append(draw(special_values))
            done.append(f"append to {list(path)}")
    return doc, done


# --------------------------------------------------------------------------- artifacts


def _source_artifact(folder: Path) -> Path:
    torch.manual_seed(0)
    gm = fxqp.transform(ReusedReluNet(), SPEC, example_inputs=(X,))
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    gm.train()
    for i in range(3):
        opt.zero_grad()
        gm(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
        opt.step()
    path = folder / "source.fxqp"
    fxqp.save(fxqp.lower(gm.eval()), path)
    return path


@st.composite
def blob_edits(draw: Any, sizes: dict[str, int]) -> list[tuple[str, str, int, int]]:
    """Up to two byte-level edits of the blobs: (blob, what, position, value)."""
    edits = []
    for _ in range(draw(st.integers(0, 2))):
        blob = draw(st.sampled_from(sorted(sizes)))
        what = draw(st.sampled_from(["set", "cut", "grow"]))
        position = draw(st.integers(0, max(sizes[blob] - 1, 0)))
        edits.append((blob, what, position, draw(st.integers(0, 255))))
    return edits


def _apply_blob_edits(blobs: dict[str, torch.Tensor], edits: list[tuple[str, str, int, int]]) -> None:
    for blob, what, position, value in edits:
        t = blobs[blob].clone()
        if what == "set" and t.numel():
            t[position % t.numel()] = value
        elif what == "cut":
            t = t[:position]
        elif what == "grow":
            t = torch.cat([t, torch.full((position % 4096 + 1,), value, dtype=torch.uint8)])
        blobs[blob] = t


def fuzz_artifacts(examples: int, seed: int, folder: Path) -> dict[str, Any]:
    source = _source_artifact(folder)
    raw = source.read_bytes()
    header, blobs = read_artifact(source)
    del header["data_sha256"]
    sizes = {name: t.numel() for name, t in blobs.items()}
    counts = {"tried": 0, "error": 0, "loaded": 0, "other": 0, "resigned": 0, "raw": 0}
    defects: list[dict[str, Any]] = []
    target = folder / "fuzzed.fxqp"

    @fixed_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(
        resign=st.booleans() | st.just(True),
        header_edit=mutated(header),
        edits=blob_edits(sizes),
        flips=st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=3),
        cut=st.none() | st.integers(0, len(raw)),
    )
    def run(resign: bool, header_edit: tuple[Any, list[str]], edits: list, flips: list, cut: int | None) -> None:
        if resign:
            doc, description = header_edit
            new_blobs = dict(blobs)
            _apply_blob_edits(new_blobs, edits)
            description = description + [f"blob {e}" for e in edits]
            try:
                data = encode_header_text(_header_text(doc), new_blobs) if isinstance(doc, dict) else None
            except (TypeError, ValueError, OverflowError) as err:  # the mutation is not JSON (e.g. a key that is not a string)
                data = None
                description.append(f"not encodable: {err}")
            if data is None:
                return
            counts["resigned"] += 1
        else:
            data = bytearray(raw)
            for position, value in flips:
                data[position] = value
            data = bytes(data[:cut] if cut is not None else data)
            description = [f"flip {flips}", f"cut {cut}"]
            counts["raw"] += 1
        target.write_bytes(data)

        def attempt() -> None:
            out = fxqp.load(target, ReusedReluNet())(X)
            assert out.shape == (2, 5), out.shape

        _classify(counts, defects, description, attempt)

    run()
    return {"counts": counts, "defects": defects}


# --------------------------------------------------------------------------- specs

#: Text spliced into spec files: YAML anchors and aliases, deep brackets, duplicate keys,
#: huge numbers, tags, tabs, catastrophic patterns.
SNIPPETS = [
    "&a [1, 2, 3]",
    "*a",
    "[" * 3000,
    "{" * 200,
    "]" * 10,
    "\nrules: []\n",
    "\nbits: 4\nbits: 8\n",
    "9" * 5000,
    "1e400",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGVsbG8=",
    "\t",
    "'re:(.*.*.*.*.*.*)*z'",
    "'re:" + "(" * 2000 + ")" * 2000 + "'",
    "? complex key",
    "%YAML 1.1\n---\n",
    "\ud800",
    "2" * 19,
    "-",
    ": ",
]


def _bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"rules: [{{names: ['fc'], weight: [{{op: quantize, bits: *a{levels - 1}}}]}}]")
    return "\n".join(lines) + "\n"


@st.composite
def spec_texts(draw: Any, text: str) -> tuple[str, list[str]]:
    """A spec's text with 1 to 4 edits: a snippet inserted, a span deleted or duplicated,
    a character replaced; or an alias bomb."""
    if draw(st.integers(0, 30)) == 0:
        levels = draw(st.integers(2, 10))
        return _bomb(levels), [f"alias bomb of {levels} levels"]
    done = []
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        how = draw(st.sampled_from(["insert", "delete", "duplicate", "replace"]))
        if how == "insert":
            snippet = draw(st.sampled_from(SNIPPETS) | st.text(max_size=6))
            text = text[:at] + snippet + text[at:]
            done.append(f"insert {snippet[:40]!r} at {at}")
        elif how == "delete":
            end = draw(st.integers(at, min(len(text), at + 20)))
            text = text[:at] + text[end:]
            done.append(f"delete {at}..{end}")
        elif how == "duplicate":
            end = draw(st.integers(at, min(len(text), at + 200)))
            text = text[:end] + text[at:end] + text[end:]
            done.append(f"duplicate {at}..{end}")
        else:
            char = draw(st.characters())
            text = text[:at] + char + text[at + 1 :]
            done.append(f"replace {at} by {char!r}")
    return text, done


def fuzz_specs(examples: int, seed: int, folder: Path) -> dict[str, Any]:
    counts = {"tried": 0, "error": 0, "loaded": 0, "other": 0, "documents": 0, "yaml": 0, "json": 0}
    defects: list[dict[str, Any]] = []
    document = SPEC.to_dict()
    document["rules"].append({"names": ["re:conv.*"], "weight": [{"op": "prune", "sparsity": 0.5, "start": 0, "end": 10, "every": 2}]})
    yaml_text, json_text = Spec.from_dict(document).to_yaml(), Spec.from_dict(document).to_json()
    target = folder / "fuzzed"

    @fixed_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(
        form=st.sampled_from(["document", "yaml", "json"]),
        doc_edit=mutated(document),
        yaml_edit=spec_texts(yaml_text),
        json_edit=spec_texts(json_text),
    )
    def run(form: str, doc_edit: tuple[Any, list[str]], yaml_edit: tuple[str, list[str]], json_edit: tuple[str, list[str]]) -> None:
        counts[form + "s" if form == "document" else form] += 1
        text, description = {"document": (None, doc_edit[1]), "yaml": yaml_edit, "json": json_edit}[form]

        def attempt() -> None:
            if form == "document":
                spec = Spec.from_dict(doc_edit[0])
            else:
                path = target.with_suffix("." + form)
                path.write_text(text, encoding="utf-8", errors="surrogatepass")
                spec = Spec.from_yaml(path) if form == "yaml" else Spec.from_json(path)
            gm = fxqp.transform(ReusedReluNet(), spec, example_inputs=(X,), total_steps=100)
            gm.train()
            for _ in range(2):
                gm(X).sum().backward()
            gm.eval()
            assert gm(X).shape == (2, 5)

        _classify(counts, defects, description, attempt)

    run()
    return {"counts": counts, "defects": defects}


# --------------------------------------------------------------------------- main


def main() -> None:
    target, examples, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    _limit_memory()
    with tempfile.TemporaryDirectory() as folder:
        if target == "artifact":
            result = fuzz_artifacts(examples, seed, Path(folder))
        elif target == "spec":
            result = fuzz_specs(examples, seed, Path(folder))
        else:
            raise SystemExit(f"unknown target {target!r}; expected artifact or spec")
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
