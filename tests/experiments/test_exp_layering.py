"""experiments/ is a pure library: importing it loads no runtime, torch or server framework."""

from conftest import loaded_packages

FORBIDDEN = {"runtime", "torch", "fastapi", "grpc", "starlette", "uvicorn"}


def test_importing_experiments_loads_nothing_forbidden():
    assert not FORBIDDEN & loaded_packages("experiments, experiments.feedback, experiments.report")
