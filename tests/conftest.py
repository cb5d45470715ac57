"""Shared test configuration: hypothesis profiles and small helpers.

`make test` runs with ``--hypothesis-profile=ci`` (deterministic, bounded examples);
``--hypothesis-profile=dev`` draws many more examples.
"""

from datetime import timedelta

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=300, deadline=timedelta(seconds=5), print_blob=True)
settings.load_profile("ci")
