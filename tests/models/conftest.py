"""`fresh_rope`: for tests that check the module-level rope functions. Patched models earlier tests left
behind (unreferenced, in reference cycles) are collected first, so they release the functions they held and
the test starts from the Transformers functions as shipped."""
import gc

import pytest


@pytest.fixture
def fresh_rope():
    from fastnlg.patching import rope as patcher

    if patcher._ROPE:
        gc.collect()
    assert not patcher._ROPE, f"still held by live patched models: {sorted(patcher._ROPE)}"
