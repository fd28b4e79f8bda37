"""`fresh_rope`: for tests that check the module-level rope functions. Patched models earlier tests left
behind (unreferenced, in reference cycles) are collected first, so they release the functions they held and
the test starts from the Transformers functions as shipped."""
import gc

import pytest


@pytest.fixture
def fresh_rope():
    from fastnlg.patching import swaps

    def rope_holds():
        return sorted(name for name, attr in swaps._HELD if attr == "apply_rotary_pos_emb")

    if rope_holds():
        gc.collect()
    assert not rope_holds(), f"still held by live patched models: {rope_holds()}"
