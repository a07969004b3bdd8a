"""carbond: host agent for energy and carbon accounting on CPU and GPU servers.

For code: `carbond.track(project)` (docs/exec.md); in IPython, `%load_ext carbond`.
"""

__version__ = "0.1.0"

from carbond.tracking import TrackResult, track


def load_ipython_extension(ipython: object) -> None:
    """`%load_ext carbond`: the `%%carbond [project]` cell magic."""
    from carbond.notebook import load

    load(ipython)


__all__ = ["TrackResult", "__version__", "load_ipython_extension", "track"]
