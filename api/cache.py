"""A small in-process cache of what every request reads and rarely changes (keys, models)."""

import time
from typing import Any


class TtlCache:
    """Values kept for `seconds` after they are put; 0 keeps nothing."""

    def __init__(self, seconds: float, size: int = 10_000) -> None:
        self.seconds = seconds
        self.size = size
        self._values: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> Any | None:
        found = self._values.get(key)
        if found is None:
            return None
        if found[0] < time.monotonic():
            del self._values[key]
            return None
        return found[1]

    def put(self, key: Any, value: Any) -> None:
        if self.seconds <= 0:
            return
        self._values.pop(key, None)
        if len(self._values) >= self.size:
            # Entries are kept in the order they were put, which is the order they expire in:
            # the first is the one nearest its end (and a flood of new keys evicts only old ones).
            del self._values[next(iter(self._values))]
        self._values[key] = (time.monotonic() + self.seconds, value)

    def clear(self) -> None:
        self._values.clear()
