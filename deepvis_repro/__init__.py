"""deepvis-repro: Yosinski et al.'s Deep Visualization Toolbox for PyTorch.

    >>> import deepvis_repro as dv
    >>> backend = dv.load_backend()                 # the embedded EfficientNet-Lite0
    >>> result = dv.optimize(backend, ["fc:130"])   # an image that maximizes 'flamingo'
"""
from .errors import DeepvisError
from .registry import list_backends, load_backend

__version__ = "0.1.0"


def optimize(*args, **kwargs):
    """See :func:`deepvis_repro.optimize.optimize` (imported lazily: torch-heavy)."""
    from .optimize import optimize as _optimize

    return _optimize(*args, **kwargs)


__all__ = ["DeepvisError", "load_backend", "list_backends", "optimize", "__version__"]
