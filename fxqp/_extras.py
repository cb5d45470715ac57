"""Optional dependencies, imported where they are used, with a one-line message when missing.

The core install (``pip install fxqp``) has what :func:`fxqp.transform`, :func:`fxqp.lower`,
:func:`fxqp.save` and :func:`fxqp.load` need. The demo, the bundled data sets, the plots and
the training loop of ``fxqp train`` need the ``cli`` extra; :mod:`fxqp.search` the ``search``
extra. :func:`require` imports one of their modules or raises :class:`MissingExtraError`
naming the ``pip install`` that brings it, which the command line prints as one line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fxqp.errors import FxqpError

__all__ = ["MissingExtraError", "require", "EXTRAS"]

EXTRAS: dict[str, str] = {
    "matplotlib": "cli",
    "sklearn": "cli",
    "skimage": "cli",
    "tqdm": "cli",
    "optuna": "search",
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnxruntime": "onnx",
}
"""The extra that brings each optional top-level module."""

_DISTRIBUTIONS = {"sklearn": "scikit-learn", "skimage": "scikit-image"}


class MissingExtraError(FxqpError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` to run.

    Attributes:
        module: the module that could not be imported (``"matplotlib"``).
        extra: the fxqp extra that installs it (``"cli"``).
    """

    def __init__(self, message: str, module: str = "", extra: str = ""):
        super().__init__(message)
        self.name = module.partition(".")[0] or None  # ImportError.name: the missing top-level module
        self.module = module
        self.extra = extra


def require(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` (``"sklearn.model_selection"``), or raise :class:`MissingExtraError`.

    Args:
        module: the module to import.
        feature: what needs it, for the message (``"fxqp demo"``, ``"fxqp.data.digits"``).
        extra: the extra that installs it; by default the one :data:`EXTRAS` lists for the
            module's top-level package.

    Raises:
        MissingExtraError: ``"fxqp demo needs matplotlib: pip install 'fxqp[cli]'"``.
    """
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = (err.name or "").partition(".")[0]
        if missing != top:  # the module is there but something it imports failed: not ours to reword
            raise
        extra = extra or EXTRAS.get(top, "cli")
        dist = _DISTRIBUTIONS.get(top, top)
        raise MissingExtraError(f"{feature} needs {dist}: pip install 'fxqp[{extra}]'", module, extra) from None
