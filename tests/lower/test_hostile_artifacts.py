"""Crafted artifacts: headers re-signed (their digests recomputed) with fields of the wrong
type, range or consistency, oversized declarations, and framing that lies about the file.
Each must be an ArtifactError naming the field, raised before anything of the declared size
is allocated or decoded."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import safetensors.torch
import torch
from fxqp_test_nets import ConvBnConv, ReusedReluNet
from lowering_helpers import EVERY_FORM_SPEC as SPEC
from lowering_helpers import images, rewrite_artifact, train_steps

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.lower.artifact import HEADER_KEY, file_sha256, read_artifact, read_header

X = torch.randn(2, 3, 8, 8)


def _lowered(model, spec, inputs, **kwargs):
    gm = fxqp.transform(model, spec, **kwargs)
    return fxqp.lower(train_steps(gm, inputs))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A lowered ReusedReluNet (every weight scheme, observer, LSQ, static and dynamic
    activation pruning), transformed with example inputs so that shapes are recorded."""
    torch.manual_seed(0)
    low = _lowered(ReusedReluNet(), SPEC, images(3), example_inputs=(X,))
    path = tmp_path_factory.mktemp("small") / "m.fxqp"
    fxqp.save(low, path)
    return low, path


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A model whose lowering removed filters (the header's ``removed`` field)."""
    torch.manual_seed(0)
    spec = Spec(rules=[Rule(names=["conv1"], weight=[Prune(sparsity=0.5, structure="filter"), Quantize(bits=4)])])
    low = _lowered(ConvBnConv(), spec, images(2), example_inputs=(X,))
    assert low.meta["fxqp"]["removed"]
    path = tmp_path_factory.mktemp("pruned") / "m.fxqp"
    fxqp.save(low, path)
    return low, path


def load_error(path, model):
    with pytest.raises(fxqp.ArtifactError) as info:
        fxqp.load(path, model)
    return str(info.value)


def crafted(tmp_path, source, edit):
    out = tmp_path / "crafted.fxqp"
    rewrite_artifact(source, edit, to=out)
    return out


def setter(*keys, value):
    """An edit setting ``header[k0][k1]...`` to ``value``."""

    def edit(header, blobs):
        target = header
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


_OTHER = "made for another model"
W = ("weights", "conv1.weight", "layout")
W2 = ("weights", "conv2.weight", "layout")
RELU = ("stages", "fxqp_stages.relu", "ops", 0)
ACT = ("stages", "fxqp_stages.act", "ops", 0)


# Each: an edit of the header (re-signed) and fragments the error names.
FIELD_EDITS = {
    "channel_axis as a string": (setter(*W, "channel_axis", value="0"), ["channel_axis", "'0' is not an integer"]),
    "channel_axis out of range": (setter(*W, "channel_axis", value=7), ["channel_axis", "outside 0..3"]),
    "bits as a string": (setter(*W, "bits", value="4"), ["layout.bits", "not an integer"]),
    "qmin as a list": (setter(*W, "qmin", value=[1]), ["layout.qmin", "not an integer"]),
    "qmin a fraction": (setter(*W, "qmin", value=1.5), ["layout.qmin", "not an integer"]),
    "qmin 2^40": (setter(*W, "qmin", value=2**40), ["layout.qmin", "outside -8..0"]),
    "dtype a list": (setter(*W, "dtype", value=["float32"]), ["layout.dtype", "is not one of float32"]),
    "True in a shape": (setter(*W, "shape", value=[4, True, 3, 3]), ["layout.shape[1]", "True is not an integer"]),
    "sign with 4 bits": (setter(*W, "scheme", value="sign"), ["layout.bits", "outside 1..1"]),
    "mask n of 3e9": (
        setter(*W, "mask", value={"kind": "full", "n": 3_000_000_000, "nnz": 3_000_000_000, "nbytes": 0}),
        ["mask.n", "3000000000 is not the 108 elements"],
    ),
    "scale as float16": (
        setter("weights", "conv1.weight", "tensors", "scale", value=[41, "float16", [4]]),
        ["tensors.scale", "the layout implies float32 [4]"],
    ),
    "scale as int64": (
        setter("weights", "conv1.weight", "tensors", "scale", value=[41, "int64", [4]]),
        ["tensors.scale", "the layout implies float32 [4]"],
    ),
    "zero point as bool": (
        setter("weights", "conv2.weight", "tensors", "zero_point", value=[0, "bool", [4]]),
        ["tensors.zero_point", "the layout implies float32 [4]"],
    ),
    "activation bits -1": (setter(*ACT, "record", "bits", value=-1), ["record.bits", "outside 1..16"]),
    "True as an offset": (setter(*ACT, "tensors", "scale", value=[True, "float32", []]), ["tensors.scale", "not a tensor descriptor"]),
    "False as an offset": (setter(*ACT, "tensors", "scale", value=[False, "float32", []]), ["tensors.scale", "not a tensor descriptor"]),
    "mask code n off its shape": (setter(*RELU, "record", "shape", value=[8, 64]), ["record.code.n", "is not the 512 elements"]),
    "example dtype a list (found by fuzzing)": (setter("example_inputs", "x", "dtype", value=[]), ["input 'x': dtype [] is not one of"]),
    "unknown header field": (setter("extra", value=1), ["'fxqp.extra'", "unknown field"]),
    "step 2^63": (setter("step", value=2**63), ["'step'", "outside 0..4611686018427387904"]),
    "removed size 3e9": (
        setter("removed", value=[{"size": 3_000_000_000, "kept": [0], "producers": ["conv1"], "followers": [], "consumers": []}]),
        ["removed[0].size", "outside 2..2147483647"],
    ),
}


@pytest.mark.parametrize("case", FIELD_EDITS, ids=list(FIELD_EDITS))
def test_a_crafted_field_is_an_artifact_error_naming_it(small, tmp_path, case):
    edit, fragments = FIELD_EDITS[case]
    message = load_error(crafted(tmp_path, small[1], edit), ReusedReluNet())
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert len(message) < 600


def test_a_weight_of_another_dtype_than_the_model_is_refused(small, tmp_path):
    message = load_error(crafted(tmp_path, small[1], setter(*W, "dtype", value="float16")), ReusedReluNet())
    assert "field 'dtype' is float16 but the weight of Conv2d 'conv1' is float32" in message and "model.to(torch.float16)" in message


def test_an_activation_mask_of_another_shape_than_the_activation_is_refused(small, tmp_path):
    # [4, 64] holds the 256 elements of the mask, but the activation's samples are [4, 8, 8]
    message = load_error(crafted(tmp_path, small[1], setter(*RELU, "record", "shape", value=[4, 64])), ReusedReluNet())
    assert "stage 'fxqp_stages.relu': op 0: field 'shape' [4, 64] does not fit the activation, whose samples are [4, 8, 8]" in message


@pytest.mark.parametrize(
    "pattern, fragment",
    [("re:(.?){12}(.?){12}(.?){12}\\1\\2\\3w", "backtracks catastrophically"), ("re:" + "(" * 2000 + ")" * 2000, "re:((((")],
    ids=["backtracking", "deep-groups"],
)
def test_a_spec_pattern_in_the_header_is_guarded(small, tmp_path, pattern, fragment):
    def edit(header, blobs):
        header["spec"]["rules"].insert(0, {"names": [pattern], "weight": [{"op": "quantize", "bits": 4}]})

    path = crafted(tmp_path, small[1], edit)
    start = time.perf_counter()
    message = load_error(path, ReusedReluNet())
    assert time.perf_counter() - start < 30
    assert "field 'spec'" in message and fragment in message and _OTHER not in message, message
    assert len(message) < 800


def _replace_blob(name, make):
    def edit(header, blobs):
        blobs[name] = make(blobs[name])

    return edit


def test_random_bytes_in_the_weights_blob_are_an_artifact_error(small, tmp_path):
    # the first 60 bytes hold conv1's codes and mask and conv2's codes and golomb mask
    g = torch.Generator().manual_seed(1)
    failures = 0
    for seed in range(8):
        g.manual_seed(seed)
        edit = _replace_blob("weights", lambda b: torch.cat([torch.randint(0, 256, (112,), dtype=torch.uint8, generator=g), b[112:]]))
        path = crafted(tmp_path, small[1], edit)
        try:
            fxqp.load(path, ReusedReluNet())
        except fxqp.ArtifactError as err:
            assert "does not decode to the" in str(err) or "tensor 'scale': holds values that are not finite" in str(err), str(err)
            failures += 1
    assert failures == 8


def test_bytes_no_field_describes_are_refused_before_they_are_read(small, tmp_path):
    path = crafted(tmp_path, small[1], _replace_blob("weights", lambda b: torch.cat([b, torch.zeros(1 << 20, dtype=torch.uint8)])))
    message = load_error(path, ReusedReluNet())
    assert "tensor 'weights' holds" in message and "the header describes" in message


@pytest.mark.parametrize("what", ["scale", "target"])
def test_non_finite_or_out_of_range_stage_values_are_refused(small, tmp_path, what):
    if what == "scale":
        stage, index, value = "fxqp_stages.act", 0, float("nan")
    else:
        stage, index, value = "fxqp_stages.flatten", 0, 2.0
    header, _ = read_artifact(small[1])
    offset, dtype, _ = header["stages"][stage]["ops"][index]["tensors"][what]

    def edit(header, blobs):
        t = blobs["stages"].clone()
        t[offset : offset + 8 if dtype == "float64" else offset + 4] = torch.tensor([value], dtype=getattr(torch, dtype)).view(torch.uint8)
        blobs["stages"] = t

    message = load_error(crafted(tmp_path, small[1], edit), ReusedReluNet())
    assert f"tensor {what!r}" in message and ("not finite" in message or "sparsity in [0, 1]" in message), message


@pytest.mark.parametrize(
    "removal, fragment",
    [
        ({"size": 2**31 - 1, "kept": [0], "producers": ["conv1"], "followers": [], "consumers": []}, "does not fit the 8 output channels"),
        ({"size": 8, "kept": [0, 1], "producers": ["conv1"], "followers": [], "consumers": [["conv2", 0, 300_000_000]]}, "input channels"),
        ({"size": 8, "kept": [3, 1], "producers": ["conv1"], "followers": [], "consumers": []}, "ascending"),
    ],
    ids=["size", "repeat", "order"],
)
def test_a_removal_that_does_not_fit_the_model_is_refused_before_allocating(pruned, tmp_path, removal, fragment):
    message = load_error(crafted(tmp_path, pruned[1], setter("removed", value=[removal])), ConvBnConv())
    assert "removed" in message and fragment in message, message


def _raw_artifact(outer: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(outer)) + outer + data


def _signed_metadata(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() + "\n" + text


def _with_header_text(text: str) -> bytes:
    blobs = {n: torch.zeros(0, dtype=torch.uint8) for n in ("weights", "stages", "state")}
    return safetensors.torch.save(blobs, metadata={HEADER_KEY: _signed_metadata(text)})


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (_with_header_text("not json"), "is not readable JSON"),
        (_with_header_text("[" * 1100 + "]" * 1100), "nests too deep"),
        (_with_header_text('{"a":' * 100 + "1" + "}" * 100), "nested deeper than 40 levels"),
        (_with_header_text("1" * 5000), "is not readable JSON"),
        (_raw_artifact(b'{"__metadata__":' + b"[" * 1100 + b"]" * 1100 + b"}"), "nests too deep"),
        (
            _raw_artifact(
                b'{"__metadata__":{"fxqp":"' + b"0" * 64 + b'\\n\\ud800"},"weights":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
                b'"stages":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"state":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
            ),
            "not valid Unicode",
        ),
        (
            _raw_artifact(b'{"__metadata__":{"fxqp":"x"},"weights":{"dtype":"U8","shape":[5],"data_offsets":[0,5]}}'),
            "an fxqp artifact holds",
        ),
    ],
    ids=["not-json", "deep-inner", "deep-but-parseable", "huge-integer", "deep-outer", "lone-surrogate", "foreign-tensors"],
)
def test_unparseable_headers_are_artifact_errors(tmp_path, raw, fragment):
    path = tmp_path / "bad.fxqp"
    path.write_bytes(raw)
    message = load_error(path, ReusedReluNet())
    assert fragment in message, message
    with pytest.raises(fxqp.ArtifactError):
        read_header(path)


def test_a_file_longer_than_its_data_is_refused_without_reading_it(small, tmp_path):
    path = tmp_path / "holey.fxqp"
    path.write_bytes(small[1].read_bytes())
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) + (20 << 30))  # a 20 GiB hole: no disk, no memory
    message = load_error(path, ReusedReluNet())
    assert f"has {20 << 30} bytes after its data" in message, message


def test_a_header_larger_than_the_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.fxqp"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", (64 << 20) + 1) + b"{")
        f.truncate(8 + (64 << 20) + 2)
    assert "fxqp reads headers of at most 67108864" in load_error(path, ReusedReluNet())


def test_sha256_pins_the_file(small, tmp_path):
    low, path = small
    digest = file_sha256(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = fxqp.load(path, ReusedReluNet(), sha256=digest.upper())
    assert torch.equal(loaded(X), low(X))
    # another model's tensors under this header, re-signed: whatever the checks inside make of
    # it (same sizes: it may load; other mask counts: an error), the pin refuses it
    torch.manual_seed(5)
    other = _lowered(ReusedReluNet(), SPEC, images(3, seed=3), example_inputs=(X,))
    fxqp.save(other, tmp_path / "other.fxqp")
    _, other_blobs = read_artifact(tmp_path / "other.fxqp")
    swapped = crafted(tmp_path, path, lambda header, blobs: blobs.update(other_blobs))
    try:
        fxqp.load(swapped, ReusedReluNet())
    except fxqp.ArtifactError:
        pass
    with pytest.raises(fxqp.ArtifactError, match="the file's SHA-256 is .*, not the expected"):
        fxqp.load(swapped, ReusedReluNet(), sha256=digest)
    with pytest.raises(fxqp.ArtifactError, match="is not a SHA-256"):
        fxqp.load(path, ReusedReluNet(), sha256="abc")


def test_crafted_files_are_refused_within_a_memory_limit(small, pruned, tmp_path):
    """Declared sizes of gigabytes, loaded in one process whose data segment is limited to
    3 GiB: a mask of 3e9 elements without payload ('empty' needs none) in a file that records
    no example inputs, a removal of 2^31 - 1 channels and one repeated 3e8 times, and a
    file followed by a 20 GiB hole. Each is refused before anything of its size is allocated."""

    def empty_mask(header, blobs):
        mask = {"kind": "mask", "shape": [50_000, 60_000], "code": {"kind": "empty", "n": 3_000_000_000, "nnz": 0, "nbytes": 0}}
        header["stages"]["fxqp_stages.relu"]["ops"][0] = {"record": mask, "tensors": {"payload": [0, "uint8", [0]]}}
        header["example_inputs"] = None

    size = {"size": 2**31 - 1, "kept": [0], "producers": ["conv1"], "followers": [], "consumers": []}
    repeat = {"size": 8, "kept": [0, 1], "producers": ["conv1"], "followers": [], "consumers": [["conv2", 0, 300_000_000]]}
    cases = {
        "mask": (crafted(tmp_path, small[1], empty_mask), "ReusedReluNet", "larger than the"),
        "size": (rewrite_to(tmp_path / "size.fxqp", pruned[1], setter("removed", value=[size])), "ConvBnConv", "does not fit"),
        "repeat": (rewrite_to(tmp_path / "repeat.fxqp", pruned[1], setter("removed", value=[repeat])), "ConvBnConv", "does not fit"),
        "hole": (tmp_path / "hole.fxqp", "ReusedReluNet", "bytes after its data"),
    }
    cases["hole"][0].write_bytes(small[1].read_bytes())
    with open(cases["hole"][0], "r+b") as f:
        f.truncate(os.path.getsize(cases["hole"][0]) + (20 << 30))
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        sys.path.append({os.path.join(os.path.dirname(__file__), "..")!r})
        import fxqp, fxqp_test_nets
        resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))
        messages = {{}}
        for name, (path, model, _) in json.loads({json.dumps({k: (str(p), m, f) for k, (p, m, f) in cases.items()})!r}).items():
            try:
                fxqp.load(path, getattr(fxqp_test_nets, model)())
                messages[name] = "loaded"
            except fxqp.ArtifactError as err:
                messages[name] = "ArtifactError: " + str(err)
        print(json.dumps(messages))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    messages = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (_, _, fragment) in cases.items():
        assert messages[name].startswith("ArtifactError:") and fragment in messages[name], (name, messages[name])


def rewrite_to(out, source, edit):
    rewrite_artifact(source, edit, to=out)
    return out
