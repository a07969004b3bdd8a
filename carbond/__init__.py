"""carbond: host agent for energy and carbon accounting on CPU and GPU servers."""

__version__ = "0.1.0"
