"""A small, generic toolkit for rewriting ``torch.fx`` graphs.

Each pass is a plain function over a ``GraphModule`` (or an ``nn.Module``) in its
own file; a pass that changes the graph leaves ``graph.lint()`` clean (the tests
check it; the passes do not lint themselves, since linting reads every ``get_attr``
target and so runs the parametrizations of parametrized weights) and recompiles
the module.  Nothing here knows about quantization or pruning.

* :mod:`passes.trace` -- symbolic tracing with leaf modules and an automatic
  fallback for untraceable submodules;
* :mod:`passes.descend` -- tracing the largest traceable submodules of a model whose root
  cannot be traced, and running each in place of the module it was traced from;
* :mod:`passes.examples` -- tracing with example values: Python decisions on shapes and
  dtypes settled and guarded;
* :mod:`passes.modes` -- what differs between a trace in training mode and one in
  evaluation mode, switched at run time;
* :mod:`passes.nodes` -- selecting and describing nodes;
* :mod:`passes.insert` -- inserting a module after a node;
* :mod:`passes.parametrize` -- parametrizing a parameter;
* :mod:`passes.layers` -- what a layer type does with channels (one rule per module class);
* :mod:`passes.channels` -- channel coupling groups (what must be pruned together);
* :mod:`passes.errors` -- the errors raised.
"""

from passes.channels import ChannelGroup, Member, channel_groups
from passes.descend import GraphForward, Parts, graph_of, install_part, qualify, trace_parts
from passes.errors import GuardError, PassError, UntraceableError
from passes.insert import insert_after, insert_after_many
from passes.layers import ChannelRule, ChannelRuleError, register_channel_rule, rule_for, ruled_classes
from passes.modes import ModeSwitch
from passes.nodes import (
    called_module,
    canonical_name,
    canonical_target_name,
    node_module_path,
    non_tensor_nodes,
    produces_tensor,
    propagate_shapes,
)
from passes.parametrize import original_of, parametrizations_of, parametrize
from passes.trace import SOURCE_CLASSES_KEY, TraceResult, trace

__all__ = [
    "SOURCE_CLASSES_KEY",
    "ChannelGroup",
    "ChannelRule",
    "ChannelRuleError",
    "register_channel_rule",
    "rule_for",
    "ruled_classes",
    "ModeSwitch",
    "Member",
    "channel_groups",
    "GraphForward",
    "GuardError",
    "Parts",
    "graph_of",
    "install_part",
    "qualify",
    "trace_parts",
    "PassError",
    "TraceResult",
    "UntraceableError",
    "called_module",
    "canonical_name",
    "canonical_target_name",
    "insert_after",
    "insert_after_many",
    "node_module_path",
    "non_tensor_nodes",
    "propagate_shapes",
    "original_of",
    "parametrizations_of",
    "parametrize",
    "produces_tensor",
    "trace",
]
