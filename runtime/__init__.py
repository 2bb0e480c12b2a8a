"""splitserve runtime: versioned model repository, lifecycle, inference core and servers."""

# The one version string: pyproject reads it (setuptools attr, statically), splitserve
# re-exports it and `splitserve --version` prints it.
__version__ = "0.1.0"
