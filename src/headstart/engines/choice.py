"""What an engine choice is: the engine, precision and device a backbone runs with, and why (rule.py makes it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    precision: str
    device: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)
