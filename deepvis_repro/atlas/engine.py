"""Where mining runs. One small seam: an engine's ``run(job, todo)`` yields, for each batch index
in ``todo`` (in any order), ``(index, ids, ok, errors, candidates)``; the driver in mining.py
merges them. The batches are fixed by global position, so every engine computes the same numbers.

- :class:`LocalEngine`: a torch DataLoader whose worker processes decode the next batches while
  the main process runs the network (on the CPU or a GPU).
- :class:`RayEngine`: Ray Data, for a cluster: a decode stage (tasks) streams batches into a pool
  of actors that each hold the model and return the batch's own top-k; the driver merges them.
  ``pip install -e ".[ray]"``; joins a running cluster (``address``) or starts a local one.

Both also have ``map(make_worker, batches)`` for other batched work (every unit's optimized
image): the worker is built once per process (per actor on Ray) and results come back as they
finish, as ``(batch, result)``.
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch

from ..allocator import keep_freed_memory
from ..errors import DeepvisError
from .corpus import BatchDecoder
from .miner import Miner


def default_workers() -> int:
    """Decode workers: the cores left after the network's, at least one, at most eight."""
    n = os.cpu_count() or 1
    return max(0, min(8, n - 1)) if n > 1 else 0


class _BatchDataset(torch.utils.data.Dataset):
    """Item j: batch todo[j], decoded (in a worker process)."""

    def __init__(self, job, todo):
        self.items = job.corpus.items
        self.ranges = [job.batch_range(i) for i in todo]
        self.todo = list(todo)
        self.decoder = job.decoder()

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, j):
        r = self.ranges[j]
        d = self.decoder([self.items[i] for i in r])
        return {"index": self.todo[j], "ids": np.arange(r.start, r.stop, dtype=np.int64),
                "images": torch.from_numpy(d["images"]), "ok": d["ok"], "errors": d["errors"]}


class LocalEngine:
    name = "local"

    def __init__(self, workers: int | None = None, prefetch: int = 2):
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 0:
            raise DeepvisError(f"engine.workers must be >= 0, got {workers}")
        self.prefetch = int(prefetch)

    def map(self, make_worker, batches):
        worker = make_worker()
        for b in batches:
            yield b, worker(b)

    def run(self, job, todo):
        if not todo:
            return
        miner = Miner(job.backend, job.layers, job.k, job.negatives, job.numerics)
        loader = torch.utils.data.DataLoader(
            _BatchDataset(job, todo), batch_size=None, shuffle=False, num_workers=self.workers,
            pin_memory=job.backend.device.type == "cuda",
            prefetch_factor=self.prefetch if self.workers else None, collate_fn=_identity)
        for b in loader:
            cands = miner(b["images"], b["ids"], b["ok"])
            yield b["index"], b["ids"], b["ok"], b["errors"], cands


def _identity(x):
    return x


# ----- Ray ------------------------------------------------------------------------------------
def pack(cands: dict, layers: list[str]) -> bytes:
    """A batch's per-layer top-k as one npz blob (numbers only: no pickle crosses the wire)."""
    arrays = {}
    for n, l in enumerate(layers):
        for side, (v, i, p) in cands[l].items():
            arrays[f"L{n}_{side}_v"] = v.cpu().numpy()
            arrays[f"L{n}_{side}_i"] = i.cpu().numpy()
            arrays[f"L{n}_{side}_p"] = p.cpu().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(blob: bytes, layers: list[str], device) -> dict:
    out = {}
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        for n, l in enumerate(layers):
            out[l] = {}
            for side in ("top", "bottom"):
                if f"L{n}_{side}_v" in z.files:
                    out[l][side] = tuple(torch.from_numpy(z[f"L{n}_{side}_{c}"]).to(device) for c in "vip")
    return out


class _DecodeBatch:
    """Ray read stage: one row (a batch's index and items) -> the decoded batch."""

    def __init__(self, view: dict):
        self.decoder = BatchDecoder(view)

    def __call__(self, row: dict) -> dict:
        items = str(row["items"]).split("\n")
        d = self.decoder(items)
        return {"index": row["index"], "start": row["start"], "images": d["images"], "ok": d["ok"],
                "errors": "\n".join(e.replace("\n", " ") for e in d["errors"])}


class _MinerActor:
    """Ray actor: holds the model, turns decoded batches into their own top-k."""

    def __init__(self, backend_box, layers, k, negatives, device, threads, numerics):
        import ray

        keep_freed_memory()  # as the commands do (allocator.py)
        if threads:
            torch.set_num_threads(int(threads))  # the driver's: identical numbers, bit for bit
        backend = ray.get(backend_box[0]).to(device)
        self.layers = layers
        self.miner = Miner(backend, layers, k, negatives, numerics)

    def __call__(self, batch: dict) -> dict:
        out = {"index": [], "start": [], "payload": [], "ok": [], "errors": []}
        for j in range(len(batch["index"])):
            images, ok = np.asarray(batch["images"][j]), np.asarray(batch["ok"][j], bool)
            start = int(batch["start"][j])
            ids = np.arange(start, start + len(images), dtype=np.int64)
            out["payload"].append(pack(self.miner(images, ids, ok), self.layers))
            out["index"].append(int(batch["index"][j]))
            out["start"].append(start)
            out["ok"].append(ok.astype(np.uint8).tobytes())
            out["errors"].append(str(batch["errors"][j]))
        return {"index": np.array(out["index"], np.int64), "start": np.array(out["start"], np.int64),
                "payload": np.array(out["payload"], dtype=object), "ok": np.array(out["ok"], dtype=object),
                "errors": np.array(out["errors"], dtype=object)}


class _MapActor:
    def __init__(self, make_worker, threads):
        keep_freed_memory()
        if threads:
            torch.set_num_threads(int(threads))
        self.worker = make_worker()

    def run(self, key, batch):
        return key, self.worker(batch)


def _unpack_ok(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, np.uint8).astype(bool)


class RayEngine:
    """Mining on Ray Data: a decode stage and an actor pool of miners.

    address: a running cluster ('auto', 'ray://host:10001'), or None to start a local one.
    actors: actors in the pool; num_cpus / num_gpus: per actor (fractional CPUs: on a small
    machine a whole CPU per actor starves the decode stage); decode_cpus: per decode task;
    device: where an actor runs the model (cuda when it has a GPU); threads: torch threads per
    actor (default: the driver's, which keeps the numbers identical to the local engine);
    object_store_memory: bytes, for a local cluster.
    """
    name = "ray"

    def __init__(self, address: str | None = None, actors: int = 1, num_cpus: float = 0.5,
                 num_gpus: float = 0.0, decode_cpus: float = 0.5, device: str | None = None,
                 threads: int | None = None, object_store_memory: int | None = 300_000_000):
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError:
            raise DeepvisError("engine=ray needs Ray Data: pip install -e \".[ray]\" "
                               "(or pip install 'ray[data]')") from None
        if int(actors) < 1:
            raise DeepvisError(f"engine.actors must be at least 1, got {actors}")
        self.address, self.actors = address, int(actors)
        self.num_cpus, self.num_gpus, self.decode_cpus = float(num_cpus), float(num_gpus), float(decode_cpus)
        self.device = device or ("cuda" if self.num_gpus > 0 else "cpu")
        self.threads = threads
        self.object_store_memory = object_store_memory

    def _init(self):
        import logging

        import ray

        for name in ("ray", "ray.data"):  # the driver shows its own progress and errors
            logging.getLogger(name).setLevel(logging.ERROR)
        if ray.is_initialized():
            return False
        kw = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                  configure_logging=True)
        if self.address:
            ray.init(address=self.address, **kw)
        else:
            ray.init(num_cpus=os.cpu_count(), object_store_memory=self.object_store_memory, **kw)
        return True

    def map(self, make_worker, batches):
        """Batches over a pool of actors, each holding one worker (make_worker must pickle:
        a callable class instance whose __call__(batch) returns the result)."""
        import ray
        from ray.util import ActorPool

        batches = list(batches)
        if not batches:
            return
        started = self._init()
        try:
            remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus or None)(_MapActor)
            threads = self.threads or torch.get_num_threads()
            pool = ActorPool([remote.remote(make_worker, threads) for _ in range(min(self.actors, len(batches)))])
            for i, result in pool.map_unordered(lambda a, ib: a.run.remote(*ib), list(enumerate(batches))):
                yield batches[i], result
        finally:
            if started:
                ray.shutdown()

    def run(self, job, todo):
        import copy

        import ray
        import ray.data

        if not todo:
            return
        started = self._init()
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # the driver shows one bar of its own
            ctx.print_on_execution_start = False
            backend = job.backend if job.backend.device.type == "cpu" else copy.deepcopy(job.backend).to("cpu")
            box = [ray.put(backend)]  # in a list: the actors fetch it themselves, once each
            items = job.corpus.items
            rows = []
            for i in todo:
                r = job.batch_range(i)
                rows.append({"index": int(i), "start": r.start, "items": "\n".join(items[r.start:r.stop])})
            ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(1, self.actors * 4)))
            ds = ds.map(_decode_fn(job.backend.view_spec()), num_cpus=self.decode_cpus)
            kwargs = dict(batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=self.actors),
                          fn_constructor_args=(box, list(job.layers), job.k, job.negatives, self.device,
                                               self.threads or torch.get_num_threads(), job.numerics),
                          num_cpus=self.num_cpus, num_gpus=self.num_gpus or None)
            ds = _map_batches_no_restarts(ds, _MinerActor, kwargs)
            for row in ds.iter_rows():
                ok = _unpack_ok(row["ok"])
                start = int(row["start"])
                ids = np.arange(start, start + len(ok), dtype=np.int64)
                errors = str(row["errors"]).split("\n")
                cands = unpack(row["payload"], list(job.layers), job.backend.device)
                yield int(row["index"]), ids, ok, errors, cands
        finally:
            if started:
                ray.shutdown()


def _no_restarts() -> dict:
    return {"max_restarts": 0}


def _map_batches_no_restarts(ds, fn, kwargs):
    """map_batches whose actors are not restarted: a lost actor fails the run (the checkpoint
    lets the rerun continue) instead of Ray restarting it with its model argument gone, and
    Ray's core worker logging an error about it. Ray 2.60 has no undeprecated way to say so
    (ray_remote_args_fn goes in 2.64): where it is gone, Ray's default applies."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            return ds.map_batches(fn, ray_remote_args_fn=_no_restarts, **kwargs)
    except TypeError:
        return ds.map_batches(fn, **kwargs)


def _decode_fn(view: dict):
    """A plain function for Ray's task-based map (a callable class would need an actor pool)."""
    dec = _DecodeBatch(view)

    def decode(row):
        return dec(row)
    return decode
