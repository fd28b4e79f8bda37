"""Module-level functions swapped while patched models use them (a family's apply_rotary_pos_emb, TRL's chunked
log-prob function): the swap is made by the first patched model that needs it and undone when no live patched
model holds it any more (unpatched, or garbage-collected). A replacement carries `__fastnlg_original__`; one that
someone else set since is left alone."""
from __future__ import annotations

import importlib
import sys
import weakref

_HELD: dict = {}  # (module name, attribute) -> [the original, WeakSet of the patch states holding the swap]


def hold(module_name: str, attr: str, make, state) -> None:
    """`state`'s model uses make(original) in place of module_name.attr until it is unpatched or collected."""
    key = (module_name, attr)
    entry = _HELD.get(key)
    if entry is None:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
        replacement = make(original)
        replacement.__fastnlg_original__ = original
        entry = _HELD[key] = [original, weakref.WeakSet()]
        setattr(module, attr, replacement)
    if state not in entry[1]:
        entry[1].add(state)
        weakref.finalize(state, release, module_name, attr, None)


def release(module_name: str, attr: str, state) -> None:
    """Drops `state`'s hold (None: one that was garbage-collected); the original comes back when no live
    patched model holds the swap."""
    entry = _HELD.get((module_name, attr))
    if entry is None:
        return
    if state is not None:
        entry[1].discard(state)
    if not list(entry[1]):  # (iterating a WeakSet yields the live holders only)
        module = sys.modules[module_name]
        if getattr(getattr(module, attr), "__fastnlg_original__", None) is entry[0]:
            setattr(module, attr, entry[0])
        del _HELD[(module_name, attr)]
