"""splitserve runtime: versioned model repository, lifecycle, inference core and servers."""

__version__ = "0.1.0"
