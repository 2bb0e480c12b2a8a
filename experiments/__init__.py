"""splitserve experiments: always-valid statistics, the decision engine and the feedback log.

A pure library like router/ (which it builds on): numpy and the stdlib, never the runtime,
torch or a web framework. The runtime feeds it observations and writes what it decides.
"""

from experiments.engine import (
    ArmObservation,
    Decision,
    ExperimentError,
    ExperimentState,
    GenerationObservation,
    Judgment,
    Observation,
    act,
    judge,
)
from experiments.stats import Moments, UnitSums

__all__ = [
    "ArmObservation",
    "Decision",
    "ExperimentError",
    "ExperimentState",
    "GenerationObservation",
    "Judgment",
    "Moments",
    "Observation",
    "UnitSums",
    "act",
    "judge",
]
