"""What a selection kept and dropped, per source and reason."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any


@dataclasses.dataclass
class SourceReport:
    """One source: records read, drops by reason, resolved thresholds and records written."""

    path: str
    weight: float
    records: int
    dropped: Counter[str] = dataclasses.field(default_factory=Counter)
    thresholds: dict[str, float | None] = dataclasses.field(default_factory=dict)
    kept: int = 0
    repeated: int = 0  # records written more than once to reach the source's mixture share


@dataclasses.dataclass
class SelectionReport:
    """The whole selection; :meth:`to_json` is written as ``report.json``."""

    output: str
    settings: dict[str, Any]
    sources: list[SourceReport]

    @property
    def kept(self) -> int:
        return sum(s.kept for s in self.sources)

    def to_json(self) -> dict[str, Any]:
        sources = [{**dataclasses.asdict(s), "dropped": dict(sorted(s.dropped.items()))}
                   for s in self.sources]
        return {"output": self.output, "kept": self.kept, "settings": self.settings,
                "sources": sources}

    def summary(self) -> str:
        """A human-readable table of the report."""
        lines = [f"selected {self.kept} records into {self.output}"]
        for s in self.sources:
            extra = f", {s.repeated} repeated" if s.repeated else ""
            lines.append(f"  {s.path} (weight {s.weight:g}): {s.records} read, "
                         f"{s.kept} kept{extra}")
            for field, value in s.thresholds.items():
                lines.append(f"    threshold {field} = {value}")
            for reason, count in sorted(s.dropped.items()):
                lines.append(f"    dropped {count:>8}  {reason}")
        return "\n".join(lines)
