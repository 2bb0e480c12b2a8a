"""`python -m splitserve`: the same command line as the `splitserve` script."""

import sys

from runtime.cli.main import main

sys.exit(main())
