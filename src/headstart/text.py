"""Counts in words for logs and messages: "1 image", "2 images", "1 class"."""

from __future__ import annotations

IRREGULAR = {"class": "classes", "batch": "batches"}


def count(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else IRREGULAR.get(noun, noun + 's')}"
