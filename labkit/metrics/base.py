"""The one rule for a metric's name."""

from __future__ import annotations

import re
from typing import Any


def name(*parts: Any) -> str:
    """A metric name from words and values: lower case, every run of other characters becomes one _."""
    return re.sub(r"[^a-z0-9]+", "_", "_".join(map(str, parts)).lower()).strip("_")
