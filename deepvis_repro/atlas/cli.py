"""deepvis-mine: mine a corpus into a unit atlas, then write each unit's montages."""
from __future__ import annotations

import os
import sys

from ..console import exit_interrupted, resolve_device
from ..files import check_output_dir
from ..numerics import Numerics
from ..registry import instantiate_backend, instantiate_config
from ..errors import DeepvisError
from ..validate import flag, number, whole
from .corpus import open_corpus
from .mining import mine
from .page import write_index
from .patches import render_montages, resolve_mode
from .reading import write_readings
from .site import write_site
from .store import AtlasStore, layer_slug


def _layers(value):
    from omegaconf import ListConfig

    if value in (None, "all"):
        return None
    if isinstance(value, (list, tuple, ListConfig)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


#: Far past any use (the original kept 9), short of an allocation of gigabytes per layer.
MAX_TOP_K = 1000


def mine_task(cfg) -> None:
    top_k = whole("top_k", cfg.top_k, 1)
    if top_k > MAX_TOP_K:
        raise DeepvisError(f"top_k must be at most {MAX_TOP_K}, got {top_k}")
    negatives = flag("negatives", cfg.negatives)
    montages = flag("montages", cfg.montages)
    reading = flag("reading", cfg.reading)
    site = flag("site", cfg.site)
    sample = whole("reading_sample", cfg.reading_sample, 1)
    checkpoint_seconds = number("checkpoint_seconds", cfg.checkpoint_seconds, minimum=0.0)
    Numerics(str(cfg.numerics))  # checked before any work
    batch_size = whole("batch_size", cfg.batch_size, 1)
    every = whole("corpus.every", cfg.corpus.every, 1)
    device = resolve_device(cfg.device)
    engine = instantiate_config(cfg.engine, "engine")
    backend = instantiate_backend(cfg.backend).to(device)
    mode = resolve_mode(backend, str(cfg.deconv))  # every option checked before any work
    tile = whole("tile", cfg.tile, 1, allow_none=True)
    atlas_dir = cfg.atlas.dir or os.path.join("atlas", layer_slug(backend.name))
    check_output_dir(atlas_dir, "atlas.dir")
    corpus = open_corpus(cfg.corpus.path, every)
    print(f"corpus: {corpus.kind} {corpus.source or ''} ({len(corpus)} images); atlas: {atlas_dir}", flush=True)
    r = mine(backend, corpus, _layers(cfg.layers), top_k=top_k, engine=engine,
             negatives=negatives, batch_size=batch_size, atlas_dir=atlas_dir,
             checkpoint_seconds=checkpoint_seconds, numerics=str(cfg.numerics))
    if not r.complete:
        print(f"interrupted after {r.images_done} of {len(r.paths)} images; the state is saved in "
              f"{atlas_dir}: rerun the same command to continue", file=sys.stderr)

        exit_interrupted()
    rate = f", {r.images_done / r.seconds:.1f} images/s" if r.seconds > 0.5 else ""
    print(f"mined {len(r.paths)} images over {len(r.layers)} layer(s) in {r.seconds:.1f} s{rate}")
    if r.skipped:
        print(f"{len(r.skipped)} unreadable image(s) skipped, listed in {os.path.join(atlas_dir, 'skipped.tsv')}: "
              + ", ".join(os.path.basename(p) for _, p, _ in r.skipped[:3])
              + (" ..." if len(r.skipped) > 3 else ""), file=sys.stderr)
    if montages:
        written = render_montages(backend, atlas_dir, layers=r.layers, mode=mode, tile=tile,
                                  numerics=str(cfg.numerics))
        print(f"montages: {sum(written.values())} unit(s) written")
    if reading:
        with AtlasStore(atlas_dir).writer():
            write_readings(backend, atlas_dir, sample=sample)
    write_index(atlas_dir)
    if site:
        print(f"site: open {write_site(atlas_dir)}")
    print(f"atlas: {atlas_dir} (open {os.path.join(atlas_dir, 'index.html')})")
