"""splitserve: serve versioned PyTorch models with split tests.

`splitserve.__version__` is runtime's (one source); the command line is `splitserve` or
`python -m splitserve`.
"""

from runtime import __version__

__all__ = ["__version__"]
