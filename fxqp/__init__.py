"""fxqp: torch.fx passes for training networks with joint quantization and pruning of
weights and activations, in the order and on the schedule a declarative spec gives.

>>> import fxqp, torchvision
>>> from fxqp import Spec, Rule, Quantize, Prune
>>> spec = Spec(rules=[
...     Rule(modules=["Conv2d", "Linear"],
...          weight=[Prune(sparsity=0.5, start=100, end=400), Quantize(bits=4, start=500)]),
...     Rule(modules=["ReLU"], functions=["relu", "add"],
...          activation=[Quantize(bits=8, start=200), Prune(sparsity=0.3, start=600)]),
... ])
>>> gm = fxqp.transform(torchvision.models.resnet18(num_classes=10), spec)
>>> print(fxqp.summary(gm))  # doctest: +SKIP
"""

from fxqp.errors import (
    ArtifactError,
    ChannelRuleError,
    FxqpError,
    InputError,
    LoweringError,
    NonFiniteWarning,
    PatternError,
    ScheduleWarning,
    SiteError,
    SpecError,
    TraceError,
)
from fxqp.layouts import ChannelRule, register_channel_rule, register_weight_layout
from fxqp.lower import export, export_onnx, load, lower, save
from fxqp.report import Report, explain, metrics, summary
from fxqp.schedule import set_process_group, step
from fxqp.spec import Prune, Quantize, Rule, Spec
from fxqp.transform import transform

__version__ = "0.1.0"

__all__ = [
    "transform",
    "summary",
    "explain",
    "metrics",
    "step",
    "set_process_group",
    "lower",
    "save",
    "load",
    "export",
    "export_onnx",
    "Spec",
    "Rule",
    "Quantize",
    "Prune",
    "register_weight_layout",
    "register_channel_rule",
    "ChannelRule",
    "Report",
    "FxqpError",
    "SpecError",
    "PatternError",
    "TraceError",
    "SiteError",
    "LoweringError",
    "ArtifactError",
    "InputError",
    "ChannelRuleError",
    "ScheduleWarning",
    "NonFiniteWarning",
]
