"""How numbers are written in reports, model cards, run summaries and logs: one rule everywhere."""

from __future__ import annotations

import math
from typing import Any


def num(value: Any) -> str:
    """A metric as text: floats with 4 decimals, None or a non-finite float as "n/a", anything else as str."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "n/a"
    return str(value)


def signed(value: Any) -> str:
    """A difference as text: "+0.0123" / "-0.0123"; "n/a" for anything but a finite float."""
    return f"{value:+.4f}" if isinstance(value, float) and math.isfinite(value) else "n/a"
