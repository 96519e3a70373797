"""deepvis-repro: Yosinski et al.'s Deep Visualization Toolbox for PyTorch.

    >>> import deepvis_repro as dv
    >>> backend = dv.load_backend()                 # the embedded EfficientNet-Lite0
    >>> result = dv.optimize(backend, ["fc:130"])   # an image that maximizes 'flamingo'
"""
from .errors import DeepvisError
from .registry import list_backends, load_backend

# Bound here, after the submodule's import: a function that imported deepvis_repro.optimize lazily
# would be replaced by the submodule on its first call (Python sets the package's attribute).
from .optimize import optimize  # noqa: E402

__version__ = "0.1.0"


__all__ = ["DeepvisError", "load_backend", "list_backends", "optimize", "__version__"]
