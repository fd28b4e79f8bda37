"""The slow tier's run of the property and fuzz tests: the "thorough" profile (random, ten times the examples;
tests/property/conftest.py), in a subprocess so that the profile is loaded before Hypothesis reads it."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow  # (about ten times the default tier's minute; `make test-all` runs it)
def test_property_tests_under_the_thorough_profile():
    env = dict(os.environ, HYPOTHESIS_PROFILE="thorough")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", HERE, "-k", "not thorough"],
                       capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(HERE)),
                       timeout=3600)
    assert r.returncode == 0, r.stdout[-6000:]
