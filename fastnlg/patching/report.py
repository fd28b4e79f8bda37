"""PatchReport: what fastnlg.patch changed and what it left alone, with the reason."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple


class Entry(NamedTuple):
    path: str  # module path in the model ("" for the model itself, "module:..." for a function)
    what: str  # attention | cross_entropy | norm | rope | mlp | lora | linear4bit
    detail: str  # what replaced it, or why it was skipped


@dataclass
class PatchReport:
    patched: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    not_applicable: list = field(default_factory=list)  # a kind the model has nothing of (GPT-2's RoPE): not a miss

    def count(self, what: str) -> int:
        return sum(e.what == what for e in self.patched)

    def __str__(self) -> str:
        lines = ["fastnlg.patch", f"  {'what':<14}{'count':>6}  detail (first path)"]
        firsts = {}
        for e in self.patched:
            firsts.setdefault((e.what, e.detail), e.path)
        for (what, detail), n in Counter((e.what, e.detail) for e in self.patched).items():
            lines.append(f"  {what:<14}{n:>6}  {detail} ({firsts[what, detail] or 'model'})")
        if self.skipped:
            lines.append("  skipped:")
            firsts = {}
            for e in self.skipped:
                firsts.setdefault((e.what, e.detail), e.path)
            for (what, detail), n in Counter((e.what, e.detail) for e in self.skipped).items():
                lines.append(f"  {what:<14}{n:>6}  {detail} ({firsts[what, detail] or 'model'})")
        lines += ["  not applicable:"] * bool(self.not_applicable) + [
            f"  {e.what:<14}{'':>6}  {e.detail}" for e in self.not_applicable]
        return "\n".join(lines)
