"""Top-k mining over an image corpus: every image through the network once, for every channel
of every chosen layer the images whose spatial maximum is largest (and, optionally, smallest).

The work is cut into batches by global position (batch i holds images i*B .. i*B+B-1), whatever
the engine: a batch's activations, and so the result, do not depend on where or when it ran. The
merge is order-independent (topk.py). The running state is checkpointed atomically; a rerun of the
same command continues from the checkpoint and gives exactly the result of an uninterrupted run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DeepvisError
from ..files import load_sealed_npz, remove_stale_partials, save_sealed_npz, signals_deferred
from ..numerics import Numerics
from ..outputs import versions
from ..progress import progress as progress_bar
from ..units import layer_shapes, shown_layers
from .corpus import BatchDecoder, Corpus, as_corpus
from .engine import LocalEngine, RayEngine
from .miner import mines_prefix
from .store import AtlasStore, backend_identity
from .topk import TopK


CHECKPOINT = os.path.join("checkpoint", "mining.npz")


@dataclass
class MiningResult:
    """What mining found, per layer name: ``values[layer]`` (channels, k) in descending order,
    ``image_ids[layer]`` (channels, k) indices into ``paths`` (-1: fewer than k images),
    ``positions[layer]`` (channels, k, 2) as (y, x) in the layer's map ((0, 0) for fc layers);
    with negatives the same for the k smallest (``min_*``, ascending)."""
    paths: list[str]
    layers: list[str]
    top_k: int
    values: dict = field(default_factory=dict)
    image_ids: dict = field(default_factory=dict)
    positions: dict = field(default_factory=dict)
    min_values: dict = field(default_factory=dict)
    min_image_ids: dict = field(default_factory=dict)
    min_positions: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)   # (image id, path, reason)
    images_done: int = 0
    complete: bool = True
    seconds: float = 0.0
    atlas_dir: str | None = None


@dataclass
class MiningJob:
    backend: object
    layers: list
    k: int
    negatives: bool
    corpus: Corpus
    batch_size: int
    numerics: str = "default"  # deepvis_repro/numerics.py; bf16: the forward passes in bfloat16

    @property
    def n_batches(self) -> int:
        return -(-len(self.corpus) // self.batch_size)

    def batch_range(self, index: int) -> range:
        return range(index * self.batch_size, min(len(self.corpus), (index + 1) * self.batch_size))

    def decoder(self) -> BatchDecoder:
        return BatchDecoder(self.backend.view_spec())


def make_engine(engine, **options):
    """'local', 'ray', or an engine object (anything with run(job, todo) and a name)."""
    if not isinstance(engine, str):
        return engine
    if engine == "local":
        return LocalEngine(**options)
    if engine == "ray":
        return RayEngine(**options)
    raise DeepvisError(f"unknown engine '{engine}'; valid: local, ray")


def _resolve_layers(backend, layers) -> list[str]:
    if layers in (None, "all") or layers == ["all"]:
        return shown_layers(backend)  # every layer whose layout is decided
    if isinstance(layers, str):
        layers = [layers]
    names = [backend.check_layer(l) for l in layers]  # a layer of unknown layout: one line
    if not names:
        raise DeepvisError("no layers to mine: name at least one, e.g. layers=[blocks.5]")
    return sorted(dict.fromkeys(names), key=backend.layers.index)


def _identity(job: MiningJob) -> dict:
    return {"backend": backend_identity(job.backend), "corpus": job.corpus.identity(),
            "layers": list(job.layers), "top_k": job.k, "negatives": job.negatives,
            "batch_size": job.batch_size, "numerics": job.numerics, "threads": torch.get_num_threads()}


def _differs(old: dict, new: dict) -> str | None:
    """The first difference between two identities, in words."""
    # (not "threads": any thread count gives the same result but for the last bits of fc layers)
    for key in ("backend", "corpus", "layers", "top_k", "negatives", "batch_size", "numerics"):
        a, b = old.get(key, "default" if key == "numerics" else None), new.get(key)  # atlases before bf16
        if a != b:
            if key == "backend":
                return (f"another model ({a.get('name')} weights {str(a.get('weights_sha256'))[:12]}, "
                        f"view {a.get('input_size')} crop={a.get('crop')}) than this run's "
                        f"({b.get('name')} weights {str(b.get('weights_sha256'))[:12]}, "
                        f"view {b.get('input_size')} crop={b.get('crop')})")
            if key == "corpus":
                return (f"another corpus ({a.get('kind')} {a.get('source')}, {a.get('count')} images) "
                        f"than this run's ({b.get('kind')} {b.get('source')}, {b.get('count')} images)")
            return f"{key} {a} (this run: {b})"
    return None


class _State:
    """The running top-k of every layer, the batches merged so far and the skipped images."""

    def __init__(self, job: MiningJob, device):
        shapes = layer_shapes(job.backend, job.layers)
        self.job = job
        self.top = {l: TopK.empty(shapes[l][0], job.k, True, device) for l in job.layers}
        self.bottom = {l: TopK.empty(shapes[l][0], job.k, False, device) for l in job.layers} \
            if job.negatives else {}
        self.done = np.zeros(job.n_batches, bool)
        self.skipped: dict[int, str] = {}

    def merge(self, index: int, cands: dict, ids, ok, errors) -> None:
        """All layers at once: a Ctrl-C between two layers cannot leave a half-merged batch."""
        top = {l: self.top[l].merged(*cands[l]["top"]) for l in self.job.layers}
        bottom = {l: self.bottom[l].merged(*cands[l]["bottom"]) for l in self.bottom}
        self.top, self.bottom = top, bottom
        for i, good, err in zip(np.asarray(ids).tolist(), np.asarray(ok).tolist(), errors):
            if not good:
                self.skipped[int(i)] = err or "unreadable"
        self.done[index] = True

    @property
    def images_done(self) -> int:
        return int(sum(len(self.job.batch_range(i)) for i in np.flatnonzero(self.done)))

    def arrays(self) -> dict:
        out = {"done": self.done, "skipped_ids": np.array(sorted(self.skipped), np.int64),
               "skipped_reasons": np.array([self.skipped[i] for i in sorted(self.skipped)], dtype=str)}
        for n, l in enumerate(self.job.layers):
            out.update(self.top[l].to_arrays(f"L{n}_top_"))
            if self.bottom:
                out.update(self.bottom[l].to_arrays(f"L{n}_bottom_"))
        return out

    def load(self, z, device) -> None:
        self.done = np.array(z["done"], bool)
        self.skipped = {int(i): str(r) for i, r in zip(z["skipped_ids"], z["skipped_reasons"])}
        for n, l in enumerate(self.job.layers):
            self.top[l] = TopK.from_arrays(z, f"L{n}_top_", True, device)
            if self.bottom:
                self.bottom[l] = TopK.from_arrays(z, f"L{n}_bottom_", False, device)


def mine(backend, paths=None, layers=None, top_k: int = 9, engine="local", *, negatives: bool = False,
         batch_size: int = 32, atlas_dir=None, progress: bool = True, checkpoint_seconds: float = 60.0,
         engine_options: dict | None = None, numerics: str = "default") -> MiningResult:
    """Mine the top-k images of every channel of ``layers`` (default: all) over ``paths`` (a list
    of image paths, a folder, a .txt list, a video, or None for the demo corpus).

    With ``atlas_dir`` the state is checkpointed there (every ``checkpoint_seconds``, on Ctrl-C
    and at the end) and a rerun resumes it; a rerun with another model, corpus or settings is
    refused. Ctrl-C returns what was merged so far (``result.complete`` is False). numerics:
    "default", "portable" or "bf16" (deepvis_repro/numerics.py), part of the atlas's identity.
    """
    t0 = time.perf_counter()
    k = int(top_k)
    if k < 1:
        raise DeepvisError(f"top_k must be at least 1, got {top_k}")
    if int(batch_size) < 1:
        raise DeepvisError(f"batch_size must be at least 1, got {batch_size}")
    corpus = as_corpus(paths)
    job = MiningJob(backend, _resolve_layers(backend, layers), k, bool(negatives), corpus, int(batch_size),
                    Numerics(str(numerics)).mode)
    eng = make_engine(engine, **(engine_options or {}))
    identity = _identity(job)
    state = _State(job, backend.device)
    store = AtlasStore(atlas_dir) if atlas_dir else None
    if store is None:
        return _mine(job, eng, identity, state, None, t0, progress, checkpoint_seconds)
    with store.writer():
        if _open_store(store, job, identity, state) == "mined":
            return load_result(store.root)  # already complete: the same command is a no-op
        return _mine(job, eng, identity, state, store, t0, progress, checkpoint_seconds)


def _mine(job, eng, identity, state, store, t0, progress, checkpoint_seconds) -> MiningResult:
    corpus = job.corpus
    todo = [int(i) for i in np.flatnonzero(~state.done)]
    interrupted = False
    bar = progress_bar(total=len(corpus), desc=f"mine {len(job.layers)} layer(s), {eng.name}", unit="img",
                       initial=state.images_done, enabled=progress)
    last_save = time.perf_counter()
    try:
        for index, ids, ok, errors, cands in eng.run(job, todo):
            state.merge(index, cands, ids, ok, errors)
            bar.update(len(ids))
            if state.skipped:
                bar.set_postfix_str(f"{len(state.skipped)} skipped", refresh=False)
            if store is not None and time.perf_counter() - last_save > checkpoint_seconds:
                _checkpoint(store, state)
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if not interrupted and not state.done.all():
        raise DeepvisError(f"engine {eng.name} returned {int(state.done.sum())} of {job.n_batches} batches")
    return _finish(store, job, state, identity, t0, interrupted)


def _open_store(store: AtlasStore, job: MiningJob, identity: dict, state: _State) -> str:
    """Check the folder against this run; load its checkpoint. Returns the atlas's state."""
    os.makedirs(store.path("checkpoint"), exist_ok=True)
    remove_stale_partials(store.path("checkpoint"))
    remove_stale_partials(store.root)
    manifest = store.manifest()
    if manifest is not None and manifest.get("mining"):
        why = _differs(manifest["mining"], identity)
        if why:
            raise DeepvisError(f"atlas {store.root} was mined with {why}; refusing to mix results: "
                               "give another atlas.dir, or delete this one to start over")
        if manifest.get("state") == "mined" and all(os.path.isfile(store.layer_arrays_path(l))
                                                     for l in job.layers):
            return "mined"
    ck = store.path(CHECKPOINT)
    if os.path.isfile(ck):
        try:
            z = load_sealed_npz(ck, "the mining checkpoint")  # damaged or hand-edited: refused
            if len(z["done"]) != job.n_batches:
                raise ValueError("batch count differs")
            state.load(z, job.backend.device)
        except (DeepvisError, ValueError, KeyError, IndexError, TypeError) as e:
            raise DeepvisError(f"atlas {store.root}: the mining checkpoint is unusable ({e}); "
                               f"delete {ck} to start over") from None
    elif manifest is None or not manifest.get("mining"):
        store.write_corpus(job.corpus.items)
        store.write_manifest({"state": "mining", "mining": identity, "corpus_items": len(job.corpus)})
    return "mining"


def load_result(atlas_dir) -> MiningResult:
    """The MiningResult of a finished atlas, read back from its files."""
    store = AtlasStore(atlas_dir)
    m = store.manifest()
    if m is None or m.get("state") not in ("mined",) and "layers" not in m:
        raise DeepvisError(f"{atlas_dir} holds no finished mining (run deepvis-mine first)")
    layers = list(m["layers"])
    r = MiningResult(paths=store.corpus(), layers=layers, top_k=int(m["top_k"]),
                     seconds=float(m.get("seconds", 0.0)), atlas_dir=store.root)
    r.images_done = len(r.paths)
    for l in layers:
        a = store.layer_arrays(l)
        r.values[l], r.image_ids[l], r.positions[l] = a["values"], a["image_ids"], a["positions"]
        if "min_values" in a:
            r.min_values[l], r.min_image_ids[l], r.min_positions[l] = (a["min_values"], a["min_image_ids"],
                                                                       a["min_positions"])
    skipped = store.path("skipped.tsv")
    if os.path.isfile(skipped):
        with open(skipped, encoding="utf-8", errors="surrogateescape") as f:
            rows = [l.rstrip("\n").split("\t", 2) for l in f][1:]
        r.skipped = [(int(i), p, reason) for i, p, reason in rows]
    return r


def _checkpoint(store: AtlasStore, state: _State) -> None:
    with signals_deferred():
        save_sealed_npz(store.path(CHECKPOINT), **state.arrays())


def _finish(store, job, state, identity, t0, interrupted) -> MiningResult:
    r = MiningResult(paths=list(job.corpus.items), layers=list(job.layers), top_k=job.k,
                     images_done=state.images_done, complete=not interrupted,
                     seconds=time.perf_counter() - t0, atlas_dir=store.root if store else None)
    r.skipped = [(i, job.corpus.items[i], state.skipped[i]) for i in sorted(state.skipped)]
    if not interrupted and r.paths and len(r.skipped) == len(r.paths):
        # nothing was mined: an atlas of empty entries would look like a result
        where = ""
        if store is not None:
            store.write_skipped(r.skipped)
            where = f", listed in {store.path('skipped.tsv')}"
        first = r.skipped[0]
        raise DeepvisError(f"no readable image in the corpus: all {len(r.paths)} were skipped{where} "
                           f"(e.g. {os.path.basename(str(first[1]))}: {first[2]})")
    for l in job.layers:
        r.values[l], r.image_ids[l], r.positions[l] = state.top[l].result()
        if state.bottom:
            r.min_values[l], r.min_image_ids[l], r.min_positions[l] = state.bottom[l].result()
    if store is None:
        return r
    with signals_deferred():  # the checkpoint and the atlas files agree, whatever arrives now
        if interrupted:
            save_sealed_npz(store.path(CHECKPOINT), **state.arrays())
            return r

        shapes = layer_shapes(job.backend, job.layers)
        os.makedirs(store.path("layers"), exist_ok=True)
        digests = {}
        for l in job.layers:
            arrays = {"values": r.values[l], "image_ids": r.image_ids[l], "positions": r.positions[l]}
            if state.bottom:
                arrays.update(min_values=r.min_values[l], min_image_ids=r.min_image_ids[l],
                              min_positions=r.min_positions[l])
            digests[l] = save_sealed_npz(store.layer_arrays_path(l), **arrays)
        store.write_skipped(r.skipped)
        manifest = store.manifest() or {}
        manifest.update({
            "state": "mined", "mining": identity, "corpus_items": len(job.corpus),
            "layers": {l: {"channels": int(shapes[l][0]), "shape": list(shapes[l]),
                           "file": os.path.relpath(store.layer_arrays_path(l), store.root), "sha256": digests[l],
                           # mined beside the grid as its row H (miner.mines_prefix): position (H, p) is token p
                           **({"prefix": list(job.backend.layer_layout(l).prefix)}
                              if mines_prefix(job.backend, l) else {})}
                       for l in job.layers},
            "top_k": job.k, "negatives": job.negatives, "skipped": len(r.skipped),
            "seconds": round(r.seconds, 2), "versions": versions(),
        })
        manifest.pop("format", None)
        store.write_manifest(manifest)
        try:
            os.unlink(store.path(CHECKPOINT))
        except FileNotFoundError:
            pass
    return r
