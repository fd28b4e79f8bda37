"""Hypothesis profiles for the property and fuzz tests.

- "ci" (the default): derandomised, a fixed number of examples, no example database and no deadline, so the
  verdict is the same on every machine and every run (the examples are a function of the test's code alone).
- "thorough": random examples, ten times as many, for a local hunt: HYPOTHESIS_PROFILE=thorough make test.
An example found failing is kept in the test as an explicit @example (a regression case), not in a database.
"""
import os

from hypothesis import HealthCheck, settings

COMMON = dict(deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=25, **COMMON)
settings.register_profile("thorough", derandomize=False, max_examples=250, **COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """n examples under the ci profile, scaled with the loaded profile's max_examples (25 in ci)."""
    return max(1, n * settings().max_examples // 25)
