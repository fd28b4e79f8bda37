"""tests/host_syncs.py names a synchronising call by its innermost fastnlg function, and flags any call not
in ALLOWED (the GPU tier's patched-step test and the smoke run rely on both)."""
import os
import traceback
from collections import Counter

from tests import host_syncs


def _frame(path, name):
    return traceback.FrameSummary(path, 1, name)


def test_the_innermost_fastnlg_frame_names_the_site():
    pkg = host_syncs.PACKAGE
    stack = [_frame("/x/train.py", "main"), _frame(os.path.join(pkg, "ops", "token_loss.py"), "valid_rows"),
             _frame("/usr/lib/torch/_tensor.py", "tolist")]
    assert host_syncs.site(stack) == "fastnlg/ops/token_loss.py:valid_rows"
    assert host_syncs.site([_frame("/x/user.py", "step")]) == "/x/user.py:step"


def test_unexpected_reads_are_flagged():
    seen = Counter({"fastnlg/ops/token_loss.py:valid_rows": 3, "fastnlg/nn/lm_head.py:forward": 1})
    assert host_syncs.unexpected(seen) == {"fastnlg/nn/lm_head.py:forward": 1}
    for where in host_syncs.ALLOWED:  # every allowed site names a function that exists there
        path, name = where.split(":")
        with open(os.path.join(os.path.dirname(host_syncs.PACKAGE), path)) as f:
            assert f"def {name}(" in f.read(), where
