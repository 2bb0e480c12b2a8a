"""splitserve: serve versioned PyTorch models with split tests.

`splitserve.__version__` is runtime's (one source); the command line is `splitserve` or
`python -m splitserve`; `Client` and `AsyncClient` talk to a running server.
"""

from runtime import __version__
from splitserve.client import (AsyncClient, Client, Conflict, ConnectionFailed, DeadlineExceeded,
                               InvalidArgument, NotFound, Overloaded, RequestTimeout, Result,
                               ServerError, SplitserveError, TooLarge, Unauthenticated,
                               Unavailable)

__all__ = ["__version__", "Client", "AsyncClient", "Result", "SplitserveError", "InvalidArgument",
           "Unauthenticated", "NotFound", "RequestTimeout", "Conflict", "TooLarge", "Overloaded",
           "ServerError", "Unavailable", "DeadlineExceeded", "ConnectionFailed"]
