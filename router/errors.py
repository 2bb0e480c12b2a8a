"""RoutingError: the one exception the router raises.

`kind` is one of "invalid" (a config or argument is wrong), "missing" (a config file is
absent), "not_found" (an unknown label) or "unavailable" (nothing AVAILABLE to route to).
The runtime maps each kind onto its protocol-neutral code; the router knows no codes.
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["invalid", "missing", "not_found", "unavailable"]
KINDS: frozenset[str] = frozenset({"invalid", "missing", "not_found", "unavailable"})


class RoutingError(Exception):
    """A routing fault with a kind and a message that says what was wrong and where."""

    def __init__(self, kind: Kind, message: str, problems: tuple[str, ...] = ()) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown RoutingError kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        # Each fault found by a whole-object validation, in order (message joins them).
        self.problems = problems or (message,)

    def __repr__(self) -> str:
        return f"RoutingError({self.kind!r}, {self.message!r})"
