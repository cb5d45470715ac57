"""fxqp.testing: fxqp's invariants as a property-based harness for your own models.

>>> import fxqp.testing as ft
>>> ft.check(model, spec, example_inputs)          # doctest: +SKIP

>>> from hypothesis import given
>>> @given(ft.models(), ft.specs())                # doctest: +SKIP
... def test_my_pipeline(model_and_inputs, spec): ...

Needs ``hypothesis`` (``pip install fxqp[testing]``) for the strategies; :func:`check` and
the invariants need only torch.
"""

from fxqp.testing.invariants import INVARIANTS, Case, Failure, InvariantError, check, horizon, train_steps

__all__ = ["check", "INVARIANTS", "Case", "Failure", "InvariantError", "horizon", "train_steps"]

try:
    from fxqp.testing.strategies import models, ops, schedules, specs  # noqa: F401

    __all__ += ["models", "specs", "ops", "schedules"]
except ImportError as err:  # hypothesis is an optional dependency
    if err.name != "hypothesis":
        raise
