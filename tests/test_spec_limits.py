"""Hostile spec input: specs are files users download and share, so reading and checking one
must end quickly in a SpecError, whatever the file holds (fxqp.limits)."""

import json
import os
import re
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec, SpecError
from fxqp.limits import MAX_PATTERN_CHARS, MAX_SPEC_BYTES, MAX_STEP, name_regex_fullmatch, read_document
from fxqp.search import SearchError, SearchSpace
from fxqp.sites import glob_match, plan_sites
from fxqp.transform import trace_model

ROOT = Path(__file__).resolve().parents[1]
LONG_NAME = "a_fairly_long_layer_name_for_matching_tests"  # long enough for backtracking to explode


def tiny_model() -> nn.Module:
    return nn.Sequential(OrderedDict([(LONG_NAME, nn.Linear(4, 4)), ("act", nn.ReLU())]))


def rule_with(**fields) -> dict:
    return {"rules": [{"names": "*", **fields}]}


def quantize_with(**fields) -> dict:
    return rule_with(weight=[{"op": "quantize", **fields}])


def short(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert len(message) < 400, message[:1000]
    return message


# ---------------------------------------------------------------------------------------
# Matches that backtrack catastrophically. Unguarded, they run for minutes to years inside
# the regular expression engine, where no signal interrupts them: they run in a child
# process with a deadline, all of them in one (importing torch takes seconds).
# ---------------------------------------------------------------------------------------

_CHILD = r"""
import json, sys, time
from collections import OrderedDict
from torch import nn
import fxqp
from fxqp.search import SearchSpace

model = nn.Sequential(OrderedDict([(sys.argv[1], nn.Linear(4, 4)), ("act", nn.ReLU())]))

def case(name, run):
    start = time.perf_counter()
    try:
        run()
        error, message = None, ""
    except Exception as e:
        error, message = type(e).__name__, str(e)
    print(json.dumps({"case": name, "error": error, "message": message, "seconds": time.perf_counter() - start}), flush=True)

case("nested_star", lambda: fxqp.transform(model, {"rules": [{"names": ["re:(.*.*.*.*.*.*)*z"], "weight": []}]}))
case("back_reference", lambda: fxqp.transform(model, {"rules": [{"names": ["re:(.*)(.*)(.*)(.*)(.*)(.*)(.*)\\7w"], "weight": []}]}))
case("search_percent_exponent", lambda: SearchSpace.from_dict(
    {"groups": [{"modules": ["Linear"], "weight": {"quantize": {"bits": 8, "start": "1e999999999%"}}}]}
))
"""


@pytest.fixture(scope="module")
def guarded_matches() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, LONG_NAME], capture_output=True, text=True, env=env, timeout=120)
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = "timed out"
    results = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            results[entry["case"]] = entry
    results["stderr"] = stderr
    return results


def finished(results: dict, case: str) -> dict:
    assert case in results, f"{case} did not finish in 120 s: {results['stderr'][-2000:]}"
    return results[case]


def test_nested_star_selector_ends_quickly_in_transform(guarded_matches):
    # re.fullmatch("(.*.*.*.*.*.*)*z", name) runs for minutes on a name of 10 characters
    result = finished(guarded_matches, "nested_star")
    assert result["seconds"] < 5
    assert result["error"] == "SpecError"  # the regex engine fails it fast: the rule selects nothing
    assert "rules[0] selects no weight site" in result["message"]


def test_backtracking_selector_is_a_spec_error_in_transform(guarded_matches):
    result = finished(guarded_matches, "back_reference")
    assert result["seconds"] < 5
    assert result["error"] == "PatternError"  # a SpecError
    message = result["message"]
    assert message.startswith("rules[0]: 're:(.*)(.*)(.*)(.*)(.*)(.*)(.*)\\\\7w' backtracks catastrophically")
    assert LONG_NAME in message and "took more than 0.05 s" in message and len(message) < 400


def test_search_space_percent_with_a_huge_exponent_is_refused_quickly(guarded_matches):
    result = finished(guarded_matches, "search_percent_exponent")
    assert result["seconds"] < 5
    assert result["error"] == "SearchError"
    assert "groups[0].weight.quantize.start: '1e999999999%' is not accepted" in result["message"]


# ---------------------------------------------------------------------------------------
# re: selectors: compiled once, bounded in length and in unrolled repeats
# ---------------------------------------------------------------------------------------


def test_regex_nested_too_deep_is_a_spec_error():
    pattern = "re:" + "(" * 2000 + ")" * 2000  # RecursionError when compiled by re
    with pytest.raises(SpecError, match=rf"^rules\[0\]\.names\[0\]: .* has 4000 characters; expected at most {MAX_PATTERN_CHARS}") as e:
        Spec.from_dict({"rules": [{"names": [pattern], "weight": []}]})
    short(e)
    with pytest.raises(SpecError, match=r"^Rule\.exclude\[0\]: "):
        Rule(names=["*"], exclude=[pattern], weight=[])


def test_regex_length_limit():
    Rule(names=["re:" + "a" * MAX_PATTERN_CHARS], weight=[])
    with pytest.raises(SpecError, match=rf"has {MAX_PATTERN_CHARS + 1} characters; expected at most {MAX_PATTERN_CHARS}"):
        Rule(names=["re:" + "a" * (MAX_PATTERN_CHARS + 1)], weight=[])
    with pytest.raises(SpecError, match=rf"^Rule\.names\[0\]: the glob .* has {MAX_PATTERN_CHARS + 1} characters"):
        Rule(names=["*" + "a" * MAX_PATTERN_CHARS], weight=[])


def test_regex_whose_repeats_unroll_too_far_is_refused():
    # the regex engine unrolls counted repeats: this one would take gigabytes to compile
    with pytest.raises(SpecError, match=r"^Rule\.names\[0\]: 're:\(\(a\{1000\}\)\{1000\}\)\{1000\}' is refused: its counted repeats"):
        Rule(names=["re:((a{1000}){1000}){1000}"], weight=[])
    Rule(names=["re:(?:[a-z]{1,100}\\.){1,100}weight"], weight=[])


def test_invalid_regex_is_still_a_spec_error():
    with pytest.raises(SpecError, match=r"^Rule\.names\[0\]: 're:\(unclosed' is not a valid regular expression: "):
        Rule(names=["re:(unclosed"], weight=[])


def test_ordinary_regex_selectors_still_match():
    assert glob_match("re:layer[12]\\..*", "layer1.0.conv1")
    assert not glob_match("re:layer[12]\\..*", "layer3.0.conv1")
    assert glob_match("re:conv\\d", "conv1") and not glob_match("re:conv\\d", "xconv1")  # a full match
    assert glob_match("layer1.*", "layer1.0") and not glob_match("layer1.*", "layer2.0")
    assert name_regex_fullmatch("(?i)FC", "fc")
    spec = Spec(rules=[Rule(names=[f"re:{LONG_NAME[:7]}.*"], weight=[Quantize(4)])])
    plan = plan_sites(trace_model(tiny_model(), generate_code=False).graph_module, spec)
    assert [a.site.name for a in plan.weights] == [f"{LONG_NAME}.weight"]
    fxqp.transform(tiny_model(), spec)


# ---------------------------------------------------------------------------------------
# Nesting, value counts and quoted values
# ---------------------------------------------------------------------------------------


def test_deep_json_is_a_spec_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: lists or objects nested too deeply to read; a spec nests at most 32"):
        Spec.from_json(path)
    bits: list = [8]
    for _ in range(31):
        bits = [bits]
    path.write_text(json.dumps(quantize_with(bits=bits)))
    with pytest.raises(SpecError, match=r"lists or mappings nested deeper than 32 levels"):
        Spec.from_json(path)


def test_deep_yaml_is_a_spec_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 3000 + "]" * 3000)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: lists or mappings nested deeper than 32 levels at line 1, column 33"):
        Spec.from_yaml(path)
    path.write_text("rules:\n" + "".join("  " * depth + "-\n" for depth in range(1, 100)))
    with pytest.raises(SpecError, match=r"nested deeper than 32 levels at line 33, "):
        Spec.from_yaml(path)


def test_deep_dict_is_a_spec_error():
    value: list = []
    for _ in range(5000):
        value = [value]
    with pytest.raises(SpecError, match=r"^spec: lists or mappings nested deeper than 32 levels") as e:
        Spec.from_dict(quantize_with(bits=value))
    short(e)
    with pytest.raises(SpecError, match=r"^Rule: lists or mappings nested deeper"):
        Rule.from_dict({"names": "*", "weight": [{"op": "quantize", "bits": value}]})
    with pytest.raises(SpecError, match=r"^Quantize: lists or mappings nested deeper"):
        Quantize.from_dict({"bits": value})


def alias_bomb(levels: int) -> tuple[str, str]:
    """YAML anchors, the last of which (named in the answer) expands to 9**levels values in
    a few hundred bytes."""
    lines = ["  a: &a [x, x, x, x, x, x, x, x, x]"]
    names = "abcdefghi"
    for previous, name in zip(names, names[1:levels]):
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines), names[levels - 1]


def test_yaml_alias_bomb_is_a_spec_error_with_a_short_message(tmp_path):
    bomb, top = alias_bomb(6)  # 531441 values; formatting them took minutes (9 levels: MemoryError)
    path = tmp_path / "bomb.yaml"
    path.write_text(f"rules:\n- names: '*'\n  anchors:\n{bomb}\n  weight: [{{op: quantize, bits: *{top}}}]\n")
    start = time.perf_counter()
    with pytest.raises(SpecError, match=r"more than 100000 values \(YAML aliases counted as expanded\)") as e:
        Spec.from_yaml(path)
    assert time.perf_counter() - start < 5
    short(e)


def test_yaml_merge_bomb_is_read_quickly(tmp_path):
    # each level merges the previous mapping nine times: PyYAML's safe loader builds 9**levels
    # entries before the mapping keeps one per key (12 levels: hours)
    lines = ["anchors:", "  a: &a {k0: 1, k1: 2}"]
    names = "abcdefghijklm"
    for previous, name in zip(names, names[1:]):
        lines.append(f"  {name}: &{name} {{<<: [" + ", ".join([f"*{previous}"] * 9) + "]}")
    path = tmp_path / "merge.yaml"
    path.write_text("\n".join(lines) + "\nrules: []\n")
    start = time.perf_counter()
    with pytest.raises(SpecError, match=r"unknown key 'anchors'"):
        Spec.from_yaml(path)
    assert time.perf_counter() - start < 5


def test_yaml_merge_keys_keep_their_meaning(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("rules:\n- names: '*'\n  weight: [&q {op: quantize, bits: 8, start: 5}, {<<: *q, bits: 4}]\n")
    assert Spec.from_yaml(path) == Spec(rules=[Rule(names=["*"], weight=[Quantize(8, start=5), Quantize(4, start=5)])])


def test_recursive_yaml_alias_is_a_spec_error(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("rules: &r [*r]\n")
    with pytest.raises(SpecError, match=r"nested deeper than 32 levels"):
        Spec.from_yaml(path)


def test_error_messages_quote_at_most_100_characters_of_a_value():
    giants = ["9" * 1_000_000, list(range(50_000)), 10**5000, {"x" * 10_000: 1}]
    for giant in giants:
        with pytest.raises(SpecError, match=r"^rules\[0\]\.weight\[0\]\.bits: ") as e:
            Spec.from_dict(quantize_with(bits=giant))
        short(e)
    with pytest.raises(SpecError, match=r"unknown key 'xxxx") as e:
        Spec.from_dict({"x" * 1_000_000: 1})
    short(e)
    with pytest.raises(SpecError, match=r"^rules\[0\]\.modules\[0\]: ") as e:
        Spec.from_dict({"rules": [{"modules": ["a b" * 500_000], "weight": []}]})
    short(e)


# ---------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_integer_longer_than_python_converts_is_a_spec_error(tmp_path, suffix):
    path = tmp_path / f"spec.{suffix}"
    path.write_text(json.dumps(quantize_with(bits=0)).replace(": 0", ": " + "9" * 4301))
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: the integer .* has 4301 characters, more than Python converts") as e:
        (Spec.from_json if suffix == "json" else Spec.from_yaml)(path)
    short(e)


@pytest.mark.parametrize("field", ["start", "end", "every"])
def test_step_counts_are_below_2_to_the_62(field):
    Spec.from_dict(rule_with(weight=[{"op": "prune", "sparsity": 0.5, field: MAX_STEP}]))
    for value in (MAX_STEP + 1, 2**63, 10**30):
        with pytest.raises(
            SpecError, match=rf"^rules\[0\]\.weight\[0\]\.{field}: {value} is too large; expected an integer >= \d and < 2\*\*62"
        ):
            Spec.from_dict(rule_with(weight=[{"op": "prune", "sparsity": 0.5, field: value}]))
    with pytest.raises(SpecError, match=r"^Quantize\.start: 9223372036854775808 is too large"):
        Quantize(8, start=2**63)


def test_a_step_beyond_int64_fails_in_the_spec_not_in_transform():
    spec = {"rules": [{"names": "*", "weight": [{"op": "prune", "sparsity": 0.5, "start": 2**63}]}]}
    with pytest.raises(SpecError, match=r"^rules\[0\]\.weight\[0\]\.start: 9223372036854775808 is too large"):
        fxqp.transform(tiny_model(), spec)


def test_total_steps_is_bounded():
    spec = Spec(rules=[Rule(names=["*"], weight=[Prune(0.5, start="10%", end="50%")])])
    assert spec.resolve(MAX_STEP).rules[0].weight[0].end == MAX_STEP // 2 + 1
    with pytest.raises(SpecError, match=r"^total_steps: 4611686018427387904 is too large; expected an integer >= 1 and < 2\*\*62"):
        spec.resolve(MAX_STEP + 1)


def test_other_numbers_beyond_range():
    with pytest.raises(
        SpecError, match=r"^rules\[0\]\.weight\[0\]\.sparsity: <an integer of \d+ bits> is outside the accepted range \[0, 1\)"
    ):
        Spec.from_dict(rule_with(weight=[{"op": "prune", "sparsity": 10**400}]))  # OverflowError in float()
    with pytest.raises(SpecError, match=r"^Prune\.structure: '1:9999.*' is not accepted; expected 'element'") as e:
        Prune(0.5, structure="1:" + "9" * 5000)  # ValueError in int()
    short(e)
    with pytest.raises(SpecError, match=r"^Quantize\.bits: 17 is outside the accepted range 1\.\.16"):
        Quantize(17)


# ---------------------------------------------------------------------------------------
# Files: size, encoding, duplicate keys
# ---------------------------------------------------------------------------------------


def test_spec_file_over_the_size_limit_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("rules: []\n" + "#" * MAX_SPEC_BYTES)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: larger than {MAX_SPEC_BYTES} bytes, the most a spec file may hold"):
        Spec.from_yaml(path)
    path = tmp_path / "big.json"
    path.write_text('{"rules": []}' + " " * MAX_SPEC_BYTES)
    with pytest.raises(SpecError, match=r"larger than 1048576 bytes"):
        Spec.from_json(path)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_endless_file_is_refused_after_the_limit():
    start = time.perf_counter()
    with pytest.raises(SpecError, match=rf"^/dev/zero: larger than {MAX_SPEC_BYTES} bytes"):
        Spec.from_yaml("/dev/zero")
    with pytest.raises(SpecError, match=rf"^/dev/zero: larger than {MAX_SPEC_BYTES} bytes"):
        Spec.from_json("/dev/zero")
    assert time.perf_counter() - start < 5


def test_read_document_limits_and_encoding(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"12345")
    assert read_document(path, "spec", max_bytes=5) == "12345"
    with pytest.raises(SpecError, match=r"larger than 4 bytes, the most a spec file may hold"):
        read_document(path, "spec", max_bytes=4)
    path.write_bytes(b"rules: [\xff]\n")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 8: invalid start byte\)"):
        Spec.from_yaml(path)


def test_duplicate_yaml_key_is_a_spec_error_naming_key_and_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("rules:\n  - names: '*'\n    weight:\n      - op: quantize\n        bits: 8\n        bits: 4\n")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: duplicate key 'bits' at line 6, column 9 \(first at line 5\)"):
        Spec.from_yaml(path)
    path.write_text("rules: []\nrules: [{names: '*', weight: []}]\n")
    with pytest.raises(SpecError, match=r"duplicate key 'rules' at line 2"):
        Spec.from_yaml(path)


def test_duplicate_json_key_is_a_spec_error(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{"rules": [{"names": "*", "weight": [{"op": "quantize", "bits": 8, "bits": 4}]}]}')
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: duplicate key 'bits' in an object"):
        Spec.from_json(path)


def test_search_space_file_is_read_within_the_same_limits(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("groups:\n  - modules: [Conv2d]\n    weight: {quantize: {bits: 8}}\ngroups: []\n")
    with pytest.raises(SearchError, match=rf"^{re.escape(str(path))}: duplicate key 'groups' at line 4"):
        SearchSpace.from_yaml(path)
    path.write_text("groups: []\n" + "#" * MAX_SPEC_BYTES)
    with pytest.raises(SearchError, match=r"larger than 1048576 bytes, the most a search space file may hold"):
        SearchSpace.from_yaml(path)
    path.write_text("[" * 3000 + "]" * 3000)
    with pytest.raises(SearchError, match=r"nested deeper than 32 levels"):
        SearchSpace.from_yaml(path)
    with pytest.raises(SearchError, match=r"^groups\[0\]: Rule\.names\[0\]: 're:\(\(a\{1000\}\)\{1000\}\)\{1000\}' is refused"):
        SearchSpace.from_dict({"groups": [{"names": ["re:((a{1000}){1000}){1000}"], "weight": {"quantize": {"bits": 8}}}]})
