"""What every task returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One prompt of a task.

    Attributes:
        prompt: the full text fed to the model (chat template already applied where the task uses one).
        answer: the expected answer text.
        meta: task details (requested and actual token length, needle depth and position, seed).
    """

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
