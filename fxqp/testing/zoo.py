"""Model-zoo sweep: run fxqp's whole pipeline over torchvision's model zoo.

Every torchvision classification model is built untrained (``weights=None``, 10 classes)
at a small input size, transformed with :data:`ZOO_SPEC` (every weight and every activation
quantized and pruned), trained one SGD step, lowered, and the lowered model's eval outputs
compared with the transformed model's.

>>> from fxqp.testing.zoo import classification_models, sweep_one
>>> row = sweep_one("resnet18")                    # doctest: +SKIP
>>> row["passed"], row["nodes"], row["transform_s"]  # doctest: +SKIP

``benchmarks/zoo.py`` runs the full sweep and prints a table, each model in its own worker
process (:func:`sweep_isolated`). Nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools
import gc
import multiprocessing
import os
import time
from typing import Any, Callable

import torch
import torchvision
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.errors import FxqpError
from fxqp.ops.chain import is_tied
from fxqp.report import hidden_activations
from fxqp.sites import is_activation_module, is_activation_name
from fxqp.stages import ActivationStage
from passes import canonical_name, graph_of

__all__ = [
    "ZOO_SPEC",
    "TOLERANCE",
    "BATCH",
    "classification_models",
    "family",
    "input_size",
    "build",
    "count_sites",
    "count_nodes",
    "ROW_KEYS",
    "sweep_one",
    "sweep_model",
    "sweep_isolated",
    "TIMM_MODELS",
    "TIMM_REPRESENTATIVES",
    "build_timm",
    "sweep_timm",
    "ACTIVATION_FUNCTIONS",
    "count_activation_calls",
    "covered_activation_sites",
    "covered_activation_calls",
    "HF_MODELS",
    "HF_SPEC",
    "HF_REPRESENTATIVES",
    "build_hf",
    "sweep_hf",
    "DETECTION_MODELS",
    "DETECTION_REPRESENTATIVES",
    "build_detector",
    "detector_train_step",
    "sweep_detector",
]

#: Quantizes and prunes all weights and all activations. Activation pruning is dynamic
#: (per-sample top-k), so the models accept any input size after the transform.
ZOO_SPEC = Spec(
    rules=[
        Rule(
            names=["*"],
            weight=[Prune(sparsity=0.5), Quantize(bits=8)],
            activation=[Quantize(bits=8), Prune(sparsity=0.3, dynamic=True)],
        )
    ]
)

#: Largest allowed ``max|low(x) - gm.eval()(x)|`` for a sweep row to pass.
TOLERANCE = 1e-5

#: Batch size of every example input.
BATCH = 2

NUM_CLASSES = 10

# Smallest input side (pixels) per model-name prefix; everything else runs at 32x32.
# Checked by building and running each model once (see ``benchmarks/zoo.py``).
_SIZES: dict[str, int] = {
    "alexnet": 63,  # smallest size whose last max-pool output is non-empty
    "inception_v3": 75,  # smallest size its stride/pool stack accepts
    "maxvit_t": 224,  # relative-position grids are fixed at build time; 224 is the only size < 448 that runs
    "vit_h_14": 28,  # patch 14: image_size must be a multiple of 14
}

# Extra builder keyword arguments per model-name prefix.
_EXTRA: dict[str, dict[str, Any]] = {
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "googlenet": {"aux_logits": False, "init_weights": False},
}


def _lookup(table: dict[str, Any], name: str, default: Any) -> Any:
    for prefix, value in table.items():
        if name.startswith(prefix):
            return value
    return default


def classification_models() -> list[str]:
    """Names of all torchvision classification models (``list_models(module=torchvision.models)``)."""
    return torchvision.models.list_models(module=torchvision.models)


def family(name: str) -> str:
    """The torchvision module that defines model ``name``, e.g. ``torchvision.models.resnet``."""
    return torchvision.models.get_model_builder(name).__module__


def input_size(name: str) -> int:
    """Side length (pixels) of the square example input used for classification model ``name``."""
    return _lookup(_SIZES, name, 32)


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Build classification model ``name`` untrained with 10 classes, and an example input.

    Seeds torch with 0 first, so the model and the input (``BATCH x 3 x S x S`` with ``S``
    from :func:`input_size`) are reproducible. Never downloads weights.
    """
    torch.manual_seed(0)
    extra = dict(_lookup(_EXTRA, name, {}))
    size = input_size(name)
    if name.startswith("vit_"):
        extra["image_size"] = size  # vit builders take the image size; swin_* pad any size
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **extra)
    return model, torch.randn(BATCH, 3, size, size)


def count_sites(gm: nn.Module) -> tuple[int, int]:
    """``(weight_sites, activation_sites)`` of a transformed model: parametrized weights (a
    tied weight once) and :class:`fxqp.stages.ActivationStage` modules."""
    weights = sum(1 for m in gm.modules() if parametrize.is_parametrized(m, "weight") and not is_tied(m))
    activations = sum(1 for m in gm.modules() if isinstance(m, ActivationStage))
    return weights, activations


def count_nodes(gm: nn.Module) -> int:
    """Graph nodes of a transformed model: its graph's, or the sum over its traced parts'."""
    if isinstance(gm, fx.GraphModule):
        return len(gm.graph.nodes)
    return sum(len(graph_of(gm.get_submodule(path)).graph.nodes) for path in gm.fxqp_schedule.parts)


def _first_tensor(out: Any) -> torch.Tensor:
    """The tensor to compare/train on: a tensor itself, ``out["out"]`` of a dict, or the
    first tensor found in a tuple/list/dict (recursively)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        if "out" in out:
            return _first_tensor(out["out"])
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            try:
                return _first_tensor(item)
            except TypeError:
                continue
    raise TypeError(f"no tensor in model output of type {type(out).__name__}")


def _call(model: nn.Module, x: Any) -> Any:
    """``model(x)``, or ``model(**x)`` for keyword inputs (their tensors: the plain values were
    traced as constants)."""
    if isinstance(x, dict):
        return model(**{k: v for k, v in x.items() if isinstance(v, torch.Tensor)})
    return model(x)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


#: Keys of a sweep row, in table order.
ROW_KEYS = (
    "model",
    "nodes",
    "weight_sites",
    "activation_sites",
    "fallback_leaves",
    "params",
    "copy_s",
    "fx_trace_s",
    "transform_s",
    "transform_s_per_1000_nodes",
    "transform_x_fx_trace",
    "step_s",
    "lower_s",
    "max_abs_diff",
    "activation_calls",
    "activation_coverage",
    "hidden_activations",
    "eval_repeatable",
    "passed",
    "error",
)


def _empty_row(name: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(model=name, passed=False)
    return row


def _time_fx_trace(model: nn.Module) -> float | None:
    """Seconds ``torch.fx.symbolic_trace(model)`` takes (the baseline of the transform
    time), or ``None`` when plain fx cannot trace ``model``."""
    t0 = time.perf_counter()
    try:
        fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any failure means there is no baseline
        return None
    return time.perf_counter() - t0


@functools.cache
def _warm_up() -> None:
    """Trace and transform a tiny network with :data:`ZOO_SPEC` once per process, untimed:
    the first call of a process also pays one-time costs (lazy imports, torch's first-use
    caches) that are not part of the per-model cost the sweep measures."""
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    tiny(torch.zeros(1, 3, 8, 8))
    fx.symbolic_trace(copy.deepcopy(tiny))
    fxqp.transform(tiny, ZOO_SPEC, inplace=True)


def time_transform(
    row: dict[str, Any], model: nn.Module, spec: Spec = ZOO_SPEC, repeats: int = 1, example_inputs: dict[str, Any] | None = None
) -> None:
    """Transform ``model`` in place (it is consumed) and record in ``row`` the seconds it
    took, ``transform_s``, with its baseline ``fx_trace_s`` and their ratio
    ``transform_x_fx_trace`` (see :func:`sweep_model`).

    With ``repeats`` > 1 both times are the best of that many runs, each on a fresh deep copy
    of ``model`` (the last one on ``model`` itself): the run least disturbed by other work
    on the machine, which a single run of a fraction of a second often is. The first call in
    a process first transforms a tiny network, untimed, so that no row pays the process's
    one-time costs.
    """
    if repeats < 1:
        raise FxqpError(f"time_transform: repeats must be a positive number of timed runs, got {repeats}")
    _warm_up()
    fx_times: list[float | None] = []
    transform_times: list[float] = []
    for run in range(repeats):
        subject = model if run == repeats - 1 else copy.deepcopy(model)
        fx_times.append(_time_fx_trace(subject))
        t0 = time.perf_counter()
        fxqp.transform(subject, spec, inplace=True, example_inputs=example_inputs)
        transform_times.append(time.perf_counter() - t0)
        if subject is not model:
            del subject
            gc.collect()  # a transformed model holds reference cycles: free it before the next copy
    row["fx_trace_s"] = None if None in fx_times else min(fx_times)
    row["transform_s"] = min(transform_times)
    if row["fx_trace_s"]:
        row["transform_x_fx_trace"] = row["transform_s"] / row["fx_trace_s"]


def sweep_model(name: str, model: nn.Module, x: Any, spec: Spec = ZOO_SPEC, train: bool = True, timing_repeats: int = 1) -> dict[str, Any]:
    """Run transform -> one SGD step -> lower -> compare on ``model`` with input ``x``.

    Returns a row with keys :data:`ROW_KEYS`. Never raises: any exception is recorded in
    ``error`` (``"Type: message"``, at most 300 characters) and the row fails; fields not
    reached stay ``None``. ``train=False`` stops after the transform (for models whose
    training forward needs targets, e.g. detection); such a row passes when the transform
    succeeds.

    Timing: ``copy_s`` is the deep copy of the model that a default (not in-place)
    transform makes, ``transform_s`` the in-place transform of that copy (tracing, site
    discovery, building the ops, inserting the stages). ``fx_trace_s`` is the baseline
    measured just before it on the same copy: plain ``torch.fx.symbolic_trace`` (the trace
    and the ``GraphModule`` it builds), ``None`` where fx alone cannot trace the model;
    ``transform_x_fx_trace`` is the ratio of the two, a figure that depends less on the
    machine than seconds do. ``timing_repeats``: both are the best of that many runs (see
    :func:`time_transform`). The model that is then trained is
    transformed again, in place (``model`` is consumed), with ``example_inputs=(x,)`` (which
    leaves out nodes whose value is not a floating-point tensor); that call is not timed.
    """
    row = _empty_row(name)
    try:
        row["params"] = sum(p.numel() for p in model.parameters())
        if isinstance(x, (torch.Tensor, dict)):
            row["activation_calls"] = count_activation_calls(model, x)
        t0 = time.perf_counter()
        copied = copy.deepcopy(model)
        row["copy_s"] = time.perf_counter() - t0
        time_transform(row, copied, spec, timing_repeats, x if isinstance(x, dict) else None)
        del copied
        gc.collect()  # the timed copy holds reference cycles: free it before the next transform
        # in place: the sweep does not use the model again, and one copy less lets the largest models fit in memory
        examples = (x,) if isinstance(x, torch.Tensor) else x if isinstance(x, dict) else None
        gm = fxqp.transform(model, spec, example_inputs=examples, inplace=True)
        row["nodes"] = count_nodes(gm)
        row["transform_s_per_1000_nodes"] = row["transform_s"] / max(row["nodes"], 1) * 1000
        row["weight_sites"], row["activation_sites"] = count_sites(gm)
        row["fallback_leaves"] = list(gm.fxqp_schedule.fallback_leaves)
        if row["activation_calls"]:
            row["activation_coverage"] = covered_activation_sites(gm) / row["activation_calls"]
        schedule = gm.fxqp_schedule
        row["hidden_activations"] = sum(len(v) for v in hidden_activations(gm, schedule.opaque_modules(), schedule.parts).values())
        if not train:
            row["passed"] = True
            return row

        gm.train()
        optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.01)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _first_tensor(_call(gm, x)).pow(2).mean().backward()
        optimizer.step()
        row["step_s"] = time.perf_counter() - t0
        optimizer.zero_grad(set_to_none=True)  # lowering needs no gradients: free them first
        del optimizer

        gm.eval()
        t0 = time.perf_counter()
        low = fxqp.lower(gm)
        row["lower_s"] = time.perf_counter() - t0
        low.eval()
        with torch.no_grad():
            expected = _first_tensor(_call(gm, x))
            row["eval_repeatable"] = bool(torch.equal(_first_tensor(_call(gm, x)), expected))
            got = _first_tensor(_call(low, x))
        row["max_abs_diff"] = float((got.float() - expected.float()).abs().max())
        row["passed"] = bool(row["max_abs_diff"] <= TOLERANCE) and row["eval_repeatable"]
        if not row["eval_repeatable"]:
            row["error"] = "two eval-mode forwards of the transformed model differ"
        elif not row["passed"]:
            row["error"] = f"max_abs_diff {row['max_abs_diff']:.3g} > {TOLERANCE:g}"
    except Exception as e:  # noqa: BLE001 - the sweep records every failure
        row["passed"] = False
        row["error"] = _error(e)
    return row


def sweep_one(name: str, timing_repeats: int = 1) -> dict[str, Any]:
    """Sweep one torchvision classification model (see :func:`sweep_model` for the row and
    ``timing_repeats``).

    A failure to build the model is recorded in ``error`` as well.
    """
    return _sweep_built(name, build, ZOO_SPEC, timing_repeats)


def _sweep_built(name: str, make: Callable[[str], tuple[nn.Module, Any]], spec: Spec, timing_repeats: int) -> dict[str, Any]:
    """:func:`sweep_model` on ``make(name)``; a failure to build the model is a failed row."""
    try:
        model, x = make(name)
    except Exception as e:  # noqa: BLE001 - the sweep records every failure
        row = _empty_row(name)
        row["error"] = _error(e)
        return row
    return sweep_model(name, model, x, spec=spec, timing_repeats=timing_repeats)


# --------------------------------------------------------------------------- activation coverage

#: Canonical names of the functional activations counted by :func:`count_activation_calls`.
ACTIVATION_FUNCTIONS = frozenset(
    {
        "relu",
        "relu6",
        "gelu",
        "silu",
        "sigmoid",
        "tanh",
        "hardswish",
        "hardsigmoid",
        "mish",
        "elu",
        "selu",
        "celu",
        "leaky_relu",
        "softplus",
        "hardtanh",
        "glu",
        "prelu",
        "quick_gelu",
    }
)


def _activation_function(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return canonical_name(name) in ACTIVATION_FUNCTIONS


class _CountFunctions(TorchFunctionMode):
    def __init__(self, inside: list[int]):
        super().__init__()
        self.inside = inside
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.inside[0] and _activation_function(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def count_activation_calls(model: nn.Module, x: Any) -> int:
    """How many activation calls one eval-mode forward of ``model`` on ``x`` makes: calls of
    activation modules (:func:`fxqp.sites.is_activation_module`: by class name, timm's ``GELU``
    and Hugging Face's ``...Activation`` too) and of functional activations (:data:`ACTIVATION_FUNCTIONS`) outside them. Each is
    a place where a transform should put an activation site."""
    inside = [0]
    modules = [m for m in model.modules() if is_activation_module(m)]
    module_calls = [0]

    def enter(module, args):
        if not inside[0]:
            module_calls[0] += 1
        inside[0] += 1

    def leave(module, args, output):
        inside[0] -= 1

    handles = [m.register_forward_pre_hook(enter) for m in modules] + [m.register_forward_hook(leave) for m in modules]
    mode = model.training
    model.eval()
    counter = _CountFunctions(inside)
    try:
        with torch.no_grad(), counter:
            model(**x) if isinstance(x, dict) else model(x)
    finally:
        model.train(mode)
        for handle in handles:
            handle.remove()
    return module_calls[0] + counter.calls


def covered_activation_calls(gm: nn.Module, x: Any) -> int:
    """How many activation stages on an activation call (as :func:`covered_activation_sites`)
    one eval-mode forward of a transformed model on ``x`` runs: a site in a module that is
    called several times (a detector's head, once per feature level) covers each call."""
    calls = [0]

    def count(module: nn.Module, args: Any) -> None:
        calls[0] += 1

    stages = [
        m for m in gm.modules() if isinstance(m, ActivationStage) and (m.target in ACTIVATION_FUNCTIONS or is_activation_name(m.target))
    ]
    handles = [m.register_forward_pre_hook(count) for m in stages]
    mode = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            gm(**x) if isinstance(x, dict) else gm(x)
    finally:
        gm.train(mode)
        for handle in handles:
            handle.remove()
    return calls[0]


def covered_activation_sites(gm: nn.Module) -> int:
    """Activation stages of a transformed model that sit on an activation call (a module that
    :func:`fxqp.sites.is_activation_name` names, or a function of :data:`ACTIVATION_FUNCTIONS`)."""
    return sum(
        1 for m in gm.modules() if isinstance(m, ActivationStage) and (m.target in ACTIVATION_FUNCTIONS or is_activation_name(m.target))
    )


# --------------------------------------------------------------------------- timm

#: timm architectures of the heavy sweep: one or two per family, small variants.
TIMM_MODELS: tuple[str, ...] = (
    "resnet18",
    "resnet50d",
    "resnext26ts",
    "seresnext26d_32x4d",
    "resnetv2_50",
    "regnetx_002",
    "regnety_002",
    "efficientnet_b0",
    "efficientnet_lite0",
    "efficientnetv2_rw_t",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "mnasnet_050",
    "fbnetc_100",
    "ghostnet_100",
    "ghostnetv2_100",
    "lcnet_050",
    "tinynet_e",
    "mixnet_s",
    "densenet121",
    "dla34",
    "dpn48b",
    "hrnet_w18_small",
    "inception_v3",
    "xception41",
    "ese_vovnet19b_dw",
    "cspresnet50",
    "cspdarknet53",
    "darknet17",
    "rexnet_100",
    "res2net50_14w_8s",
    "selecsls42b",
    "skresnet18",
    "tresnet_m",
    "repvgg_a0",
    "hardcorenas_a",
    "nfnet_f0",
    "nf_resnet26",
    "convnext_atto",
    "convnextv2_atto",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "mobilevit_xxs",
    "efficientformer_l1",
    "levit_128s",
    "poolformer_s12",
    "coat_lite_tiny",
    "pit_ti_224",
    "mixer_s16_224",
)

#: One per family for ``make test``: plain convolutions, batch norm and activation in one
#: module, a root that reads ``self.training``, layer norm and drop path, a transformer on
#: convolutions, attention.
TIMM_REPRESENTATIVES: tuple[str, ...] = (
    "resnet18",
    "efficientnet_b0",
    "ghostnet_100",
    "convnext_atto",
    "mobilevit_xxs",
    "vit_tiny_patch16_224",
)

#: Input side per timm model whose smallest accepted input is larger than 64.
_TIMM_SIZES: dict[str, int] = {"inception_v3": 75, "xception41": 75, "tresnet_m": 96, "nfnet_f0": 64}
#: Models that accept ``img_size`` but only run at the size they were designed for (their
#: attention biases are sized for it).
_TIMM_DESIGN_SIZE = ("efficientformer_",)


def build_timm(name: str) -> tuple[nn.Module, torch.Tensor]:
    """timm model ``name`` untrained with 10 classes, and a ``BATCH x 3 x S x S`` input.

    Models with a fixed input size (their positional embeddings or windows) get the size
    they were built for, with ``img_size`` lowered to 64 where the architecture accepts it.
    Never downloads weights.
    """
    import timm

    torch.manual_seed(0)
    try:
        if name.startswith(_TIMM_DESIGN_SIZE):
            raise TypeError
        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=64)
        size = 64
    except TypeError:  # the architecture takes no img_size (any input size), or needs its own
        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
        fixed = model.pretrained_cfg.get("fixed_input_size", False) or name.startswith(_TIMM_DESIGN_SIZE)
        size = model.pretrained_cfg["input_size"][-1] if fixed else _lookup(_TIMM_SIZES, name, 64)
    return model, torch.randn(BATCH, 3, size, size)


def sweep_timm(name: str, timing_repeats: int = 1) -> dict[str, Any]:
    """Sweep one timm model (see :func:`sweep_model`); a failure to build it is a failed row."""
    return _sweep_built(name, build_timm, ZOO_SPEC, timing_repeats)


# --------------------------------------------------------------------------- Hugging Face

#: The spec of the Hugging Face sweep: weights of the linear, convolution and embedding layers
#: and the outputs of the activation calls, quantized and pruned. Not every node: a
#: transformer's other nodes include attention masks (the dtype's minimum) and the
#: ``variance + eps`` of its RMS norms, which an 8-bit grid can round to 0 before ``rsqrt``.
HF_SPEC = Spec(
    rules=[
        Rule(modules=["Linear", "Conv1D", "Conv1d", "Conv2d", "Embedding"], weight=[Prune(sparsity=0.5), Quantize(bits=8)]),
        Rule(
            modules=["ReLU", "GELU", "SiLU", "Tanh", "GELUActivation", "NewGELUActivation", "SiLUActivation"],
            functions=["relu", "gelu", "silu", "tanh"],
            activation=[Quantize(bits=8), Prune(sparsity=0.3, dynamic=True)],
        ),
    ]
)

#: Hugging Face models of the sweep (``transformers`` 5.x), built from small configurations
#: (2 layers, width 32), untrained, with keyword example inputs.
HF_MODELS: tuple[str, ...] = ("bert", "distilbert", "gpt2", "llama", "t5", "vit", "whisper", "wav2vec2")

#: The Hugging Face models ``make test`` runs: an encoder, a decoder with tied embeddings, a
#: rotary decoder, an image transformer.
HF_REPRESENTATIVES: tuple[str, ...] = ("bert", "gpt2", "llama", "vit")


def build_hf(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """Hugging Face model ``name`` (one of :data:`HF_MODELS`) from a small configuration, and
    its example inputs as keywords (``use_cache=False`` where the model has a cache: training
    needs none). Never downloads anything."""
    import transformers as hf

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ids = torch.randint(0, 100, (BATCH, 8))
    mask = torch.ones(BATCH, 8, dtype=torch.long)
    builders: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
        "bert": lambda: (
            hf.BertModel(hf.BertConfig(vocab_size=100, max_position_embeddings=64, **common)),
            {"input_ids": ids, "attention_mask": mask},
        ),
        "distilbert": lambda: (
            hf.DistilBertModel(
                hf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)
            ),
            {"input_ids": ids, "attention_mask": mask},
        ),
        "gpt2": lambda: (
            hf.GPT2LMHeadModel(
                hf.GPT2Config(vocab_size=100, bos_token_id=0, eos_token_id=0, n_embd=32, n_layer=2, n_head=2, n_positions=64)
            ),
            {"input_ids": ids, "use_cache": False},
        ),
        "llama": lambda: (
            hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=1, **common)),
            {"input_ids": ids, "use_cache": False},
        ),
        "t5": lambda: (
            hf.T5Model(hf.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)),
            {"input_ids": ids, "decoder_input_ids": ids[:, :5], "use_cache": False},
        ),
        "vit": lambda: (hf.ViTModel(hf.ViTConfig(image_size=32, patch_size=8, **common)), {"pixel_values": torch.randn(BATCH, 3, 32, 32)}),
        "whisper": lambda: (
            hf.WhisperModel(
                hf.WhisperConfig(
                    vocab_size=100,
                    pad_token_id=0,
                    bos_token_id=1,
                    eos_token_id=2,
                    decoder_start_token_id=1,
                    d_model=32,
                    encoder_layers=1,
                    decoder_layers=1,
                    encoder_attention_heads=2,
                    decoder_attention_heads=2,
                    encoder_ffn_dim=64,
                    decoder_ffn_dim=64,
                    num_mel_bins=16,
                    max_source_positions=16,
                    max_target_positions=16,
                )
            ),
            {"input_features": torch.randn(BATCH, 16, 32), "decoder_input_ids": ids[:, :4], "use_cache": False},
        ),
        "wav2vec2": lambda: (
            hf.Wav2Vec2Model(
                hf.Wav2Vec2Config(
                    conv_dim=(16, 16),
                    conv_stride=(5, 2),
                    conv_kernel=(10, 3),
                    num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=2,
                    **common,
                )
            ),
            {"input_values": torch.randn(BATCH, 400)},
        ),
    }
    if name not in builders:
        raise FxqpError(f"build_hf: unknown model {name!r}; expected one of {', '.join(HF_MODELS)}")
    return builders[name]()


def sweep_hf(name: str, timing_repeats: int = 1) -> dict[str, Any]:
    """Sweep one Hugging Face model of :data:`HF_MODELS` (see :func:`sweep_model`); a failure
    to build it is a failed row."""
    return _sweep_built(name, build_hf, HF_SPEC, timing_repeats)


# --------------------------------------------------------------------------- whole detectors

#: torchvision's whole detectors: their root iterates the list of images, so they are traced
#: in parts (:mod:`passes.descend`).
DETECTION_MODELS: tuple[str, ...] = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "ssdlite320_mobilenet_v3_large",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "keypointrcnn_resnet50_fpn",
)
DETECTION_REPRESENTATIVES: tuple[str, ...] = ("fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large")


def build_detector(name: str) -> tuple[nn.Module, list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """torchvision detector ``name`` (of :data:`DETECTION_MODELS`) untrained, small images
    (resized to 160–240 pixels inside the model where it lets that be set), two images of
    different sizes, and a training target for each (a box, a label; a mask or keypoints
    where the model predicts them). Never downloads anything."""
    import torchvision.models.detection as detection

    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": 3}
    if "ssd" not in name:
        kwargs.update(min_size=160, max_size=240)
    if name.startswith("keypointrcnn"):
        kwargs.update(num_classes=2, num_keypoints=5)
    model = getattr(detection, name)(**kwargs)
    images = [torch.rand(3, 200, 240), torch.rand(3, 220, 200)]
    targets = []
    for image in images:
        target = {"boxes": torch.tensor([[10.0, 20.0, 100.0, 120.0]]), "labels": torch.tensor([1])}
        if name.startswith("maskrcnn"):
            mask = torch.zeros(1, *image.shape[1:], dtype=torch.uint8)
            mask[0, 20:120, 10:100] = 1
            target["masks"] = mask
        if name.startswith("keypointrcnn"):
            target["keypoints"] = torch.tensor([[[20.0 + 10 * k, 30.0 + 5 * k, 1.0] for k in range(5)]])
        targets.append(target)
    return model, images, targets


def detector_train_step(model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> float:
    """One SGD step of a detector in training mode on the sum of its losses; its seconds."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    t0 = time.perf_counter()
    losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    return time.perf_counter() - t0


def _detections_equal(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> tuple[bool, float]:
    """Whether two detectors' outputs are equal (same keys, shapes, values), and the largest
    difference where the shapes agree."""
    worst, equal = 0.0, len(a) == len(b)
    for x, y in zip(a, b):
        equal = equal and x.keys() == y.keys()
        for key in x.keys() & y.keys():
            if x[key].shape != y[key].shape:
                equal = False
                continue
            if x[key].numel():
                worst = max(worst, (x[key].float() - y[key].float()).abs().max().item())
            equal = equal and torch.equal(x[key], y[key])
    return equal, worst


def sweep_detector(name: str, spec: Spec = ZOO_SPEC, directory: str | None = None) -> dict[str, Any]:
    """Transform whole detector ``name`` (with the images as example inputs), train one step
    with targets, evaluate twice, lower, save, load into a fresh instance: a row with the parts
    traced and left untraced, the sites, activation coverage, ``eval_repeatable``,
    ``max_abs_diff`` (lowered against the transformed model in eval), ``round_trip`` (loaded
    output equals lowered) and ``passed`` (all exact). Failures are recorded in ``error``."""
    import tempfile

    row = _empty_row(name)
    try:
        model, images, targets = build_detector(name)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["activation_calls"] = count_activation_calls(model, images)
        t0 = time.perf_counter()
        gm = fxqp.transform(model, spec, example_inputs=(images,))
        row["transform_s"] = time.perf_counter() - t0
        schedule = gm.fxqp_schedule
        row["parts"] = list(schedule.parts)
        row["untraced"] = list(schedule.untraced)
        row["fallback_leaves"] = list(schedule.fallback_leaves)
        row["weight_sites"], row["activation_sites"] = count_sites(gm)
        row["activation_coverage"] = covered_activation_calls(gm, images) / row["activation_calls"] if row["activation_calls"] else None
        row["hidden_activations"] = sum(len(v) for v in hidden_activations(gm, schedule.opaque_modules(), schedule.parts).values())
        row["step_s"] = detector_train_step(gm, images, targets)
        gm.eval()
        with torch.no_grad():
            first, second = gm(images), gm(images)
        row["eval_repeatable"] = _detections_equal(first, second)[0]
        low = fxqp.lower(gm)
        with torch.no_grad():
            lowered = low(images)
        equal, row["max_abs_diff"] = _detections_equal(first, lowered)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            path = os.path.join(tmp, f"{name}.fxqp")
            fxqp.save(low, path)
            row["file_bytes"] = os.path.getsize(path)
            fresh, _, _ = build_detector(name)
            loaded = fxqp.load(path, fresh)
        with torch.no_grad():
            row["round_trip"] = _detections_equal(lowered, loaded(images))[0]
        row["passed"] = bool(equal and row["eval_repeatable"] and row["round_trip"])
        if not row["passed"]:
            row["error"] = "outputs differ: " + ", ".join(
                k
                for k, ok in (("lowered vs eval", equal), ("eval twice", row["eval_repeatable"]), ("loaded vs lowered", row["round_trip"]))
                if not ok
            )
    except Exception as e:  # noqa: BLE001 - the sweep records every failure
        row["error"] = _error(e)
    return row


@functools.cache
def _worker_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where the platform has it (a server that imported torch once forks each
    worker: no import per model, no state shared with the parent), else ``spawn``."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "torchvision", "fxqp", "fxqp.testing.zoo"])
        return context
    return multiprocessing.get_context("spawn")


def _run_and_send(connection: Any, fn: Callable[..., dict[str, Any]], name: str, args: tuple[Any, ...]) -> None:
    """Worker side of :func:`sweep_isolated`: send back ``fn(name, *args)`` or its error."""
    try:
        connection.send(("row", fn(name, *args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent as a failed row
        connection.send(("error", _error(e)))
    finally:
        connection.close()


def sweep_isolated(name: str, fn: Callable[..., dict[str, Any]] = sweep_one, *args: Any) -> dict[str, Any]:
    """``fn(name, *args)`` (a sweep row) computed in a fresh worker process.

    A sweep over the whole zoo builds and trains models of up to 630M parameters one after
    the other; in one process the allocator keeps much of the memory it was given, and one
    model that runs out of memory ends the sweep. In its own process each model starts from
    a clean heap, gives all its memory back when it ends, and a worker that dies (killed for
    memory, a crash in native code) becomes a failed row whose ``error`` says how it ended,
    while the sweep goes on. An exception ``fn`` raises becomes a failed row as well.

    ``fn`` and ``args`` must be picklable: module-level functions (``functools.partial`` of
    them is fine).
    """
    context = _worker_context()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_run_and_send, args=(send, fn, name, args), name=f"sweep {name}")
    process.start()
    send.close()  # the worker holds the only sending end: its exit ends the pipe
    try:
        kind, payload = receive.recv()
    except EOFError:
        kind, payload = "died", None
    finally:
        receive.close()
        process.join()
    if kind == "row":
        return payload
    row = _empty_row(name)
    if kind == "error":
        row["error"] = payload
        return row
    code = process.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
    hint = " (signal 9: most often the out-of-memory killer)" if code == -9 else ""
    row["error"] = f"WorkerDied: the worker process {how} before sending its row{hint}"
    return row
