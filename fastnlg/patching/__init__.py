"""fastnlg.patch(model) / fastnlg.unpatch(model): the generic, table-driven patcher (see patcher.py)."""
from .patcher import is_patched, patch, unpatch
from .report import Entry, PatchReport

__all__ = ["patch", "unpatch", "is_patched", "PatchReport", "Entry"]
