"""The unit atlas: per-unit pictures for any backend ("what does this unit respond to?").

    >>> from deepvis_repro.atlas import mine, receptive_field
    >>> r = mine(backend, "photos/", ["blocks.5", "fc"], top_k=9)      # or engine="ray"
    >>> r.values["fc"].shape, r.image_ids["fc"][130], r.positions["blocks.5"][3]
    >>> receptive_field(backend, "blocks.5", 3, 4)                    # (top, left, bottom, right)

Modules: corpus (what is mined), topk (the merge), receptive (fields from the model), mining
(the loop, checkpoints, resume), engine (local / Ray), patches (crops, deconv, montages), store
(the on-disk layout), page (index.html, figures), optimized (every unit's optimized image),
cli (deepvis-mine).
"""
from .mining import MiningResult, load_result, mine
from .receptive import layer_geometry, receptive_field

__all__ = ["mine", "MiningResult", "load_result", "receptive_field", "layer_geometry"]
