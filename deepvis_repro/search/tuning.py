"""The search on Ray Tune: one trial per setting with its resources, ASHA early stopping on the
score reported during the optimization, and a ledger of finished trials that survives Ctrl-C and
SIGKILL.

Why a ledger of our own beside Tune's experiment state: Tune saves its state periodically, so a
kill between a trial's end and the next save would run that trial again. The driver appends each
finished trial to OUT/trials.jsonl (one whole, flushed line per trial) the moment Tune reports it;
a rerun with the same folder reads the ledger, skips those trials (the random sampler's trial i
is the same setting on every run; the model-based sampler is told their scores) and runs the rest.
OUT/trials.csv is rewritten from the ledger after each trial.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time

from ..errors import DeepvisError
from ..files import disk_error, write_json, write_text
from .space import sample, to_preset, tune_space

#: trials.csv's columns: the trial, its setting (as the preset it stands for), its measures
PARAM_COLUMNS = ("decay", "blur_radius", "blur_every", "small_norm_pct", "small_contrib_pct", "lr_policy",
                 "lr", "max_lr", "desired_prog", "steps")
MEASURE_COLUMNS = ("score", "judge_rank_median", "judge_top5", "recognizability", "relative_activation",
                   "feature_agreement", "total_variation", "hf_energy")
COLUMNS = ("trial", "status", "steps_run", "seconds", *PARAM_COLUMNS, *MEASURE_COLUMNS, "params")


class Ledger:
    """The finished trials of one search folder: trials.jsonl (the record) and trials.csv."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, "trials.jsonl")
        self.rows: list[dict] = []
        if os.path.lexists(self.path):
            if not os.path.isfile(self.path):
                raise DeepvisError(f"{self.path} is not a file: move it away or give another search.dir")
            try:
                with open(self.path, "rb") as f:
                    lines = f.read().split(b"\n")
            except OSError as e:
                raise DeepvisError(f"cannot read {self.path}: {e.strerror or e}") from None
            lines = [l for l in lines if l.strip()]
            for n, line in enumerate(lines, 1):
                try:
                    row = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    if n == len(lines):  # the last line of a run killed mid-write: that trial runs again
                        continue
                    raise DeepvisError(f"{self.path}: line {n} is not a JSON trial record (edited by hand?); "
                                       "move the file away or give another search.dir") from None
                problem = _row_problem(row)
                if problem:
                    raise DeepvisError(f"{self.path}: line {n} is not a trial record ({problem}); "
                                       "move the file away or give another search.dir")
                self.rows.append(row)
            self._rewrite_jsonl()  # a torn line would otherwise sit in front of the next one

    def _rewrite_jsonl(self):
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def done(self) -> set[int]:
        return {int(r["trial"]) for r in self.rows}

    def add(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.write_csv()

    def write_csv(self) -> None:
        """One row per finished trial, in trial order; a row never changes once written (the
        Pareto front, which can, goes to pareto.csv)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in sorted(self.rows, key=lambda r: int(r["trial"])):
            w.writerow({**{k: _cell(r.get(k)) for k in COLUMNS}, "params": json.dumps(r["params"], sort_keys=True)})
        write_text(os.path.join(self.folder, "trials.csv"), buf.getvalue())

    def write_pareto(self) -> set[int]:
        """pareto.csv: the trials on the front of relative activation against recognizability."""
        front = pareto_front(self.rows)
        lines = ["trial,relative_activation,recognizability,score"] + [
            f"{r['trial']},{_cell(r.get('relative_activation'))},{_cell(r.get('recognizability'))},{_cell(r.get('score'))}"
            for r in sorted(self.rows, key=lambda r: int(r["trial"])) if int(r["trial"]) in front]
        write_text(os.path.join(self.folder, "pareto.csv"), "\n".join(lines) + "\n")
        return front


def _row_problem(row) -> str | None:
    """What makes a ledger line unusable, or None: the fields the search reads, with their types."""
    if not isinstance(row, dict):
        return "not an object"
    t = row.get("trial")
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        return f"trial is {t!r}, not a whole number"
    if not isinstance(row.get("params"), dict):
        return "params is not an object"
    if not isinstance(row.get("status"), str):
        return "status is not a string"
    for k in ("score", *MEASURE_COLUMNS, "steps_run", "seconds"):
        v = row.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"{k} is {v!r}, not a number"[:120]
    return None


def _cell(v):
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return "" if v is None else v


def pareto_front(rows: list[dict], x: str = "relative_activation", y: str = "recognizability") -> set[int]:
    """Trials no other trial beats on both activation and recognizability (higher is better on
    both; a measure a search has no unit for counts as equal)."""
    def val(r, k):
        v = r.get(k)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0

    pts = [(int(r["trial"]), val(r, x), val(r, y)) for r in rows]
    return {t for t, a, b in pts
            if not any((a2 >= a and b2 >= b) and (a2 > a or b2 > b) for _, a2, b2 in pts)}


def row_from_result(trial: int, params: dict, result: dict, base_steps: int) -> dict:
    preset = to_preset(params, base_steps)
    finished = bool(result.get("finished"))
    return {"trial": int(trial), "status": "finished" if finished else "stopped early",
            "steps_run": int(result.get("step", 0)), "seconds": float(result.get("seconds", 0.0)),
            **{k: getattr(preset, k) for k in PARAM_COLUMNS},
            **{k: result.get(k) for k in MEASURE_COLUMNS},
            "units": json.loads(result["units"]) if isinstance(result.get("units"), str) else result.get("units"),
            "params": params}


def check_identity(folder: str, identity: dict) -> None:
    """A search folder holds one search: the same backend, units, space, sampler, seed and steps.
    A rerun continues it; a different search there is refused (its trials would not compare)."""
    path = os.path.join(folder, "search.json")
    if not os.path.exists(path):
        # trials or a panel without the identity they were made under: a rerun with other units
        # would adopt them as its own
        left = [n for n in ("trials.jsonl", "panel.npz") if os.path.exists(os.path.join(folder, n))]
        if left:
            raise DeepvisError(f"search.dir {folder} holds {' and '.join(left)} but no search.json (the search "
                               "they belong to): move them away or give another search.dir")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old != identity:
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise DeepvisError(f"search.dir {folder} holds another search (its {', '.join(diff)} differ); "
                               "give a new search.dir, or the same settings to continue it")
    os.makedirs(folder, exist_ok=True)
    write_json(path, identity)


def _trainable(config, runner):
    """A Ray Tune function trainable: the setting in ({"index", "params"} from the random
    sampler's list, or the model-based searcher's flat parameters), the runner's reports out."""
    from ray import tune

    params = config["setting"]["params"] if "setting" in config else dict(config)
    runner(params, tune.report)


def _init_ray(address: str | None, object_store_memory: int | None) -> bool:
    import logging

    import ray

    for name in ("ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return False
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=True)
    if address:
        probe_address(address)
    import signal

    ours = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=os.cpu_count(), object_store_memory=object_store_memory, **kw)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # ConnectionError, a ray:// without Ray Client, a cluster that went away ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DeepvisError(f"cannot reach the Ray cluster at engine.address={address}: {first} "
                           "(start one with 'ray start --head', or give engine.address=null for a local Ray)") from None
    # ray.init puts its own C++ handler on SIGTERM (a stack dump, then death by the signal: no
    # summary, no best files, status 134 or -15); ours saves what is done and exits 143
    for sig, handler in ours.items():
        if callable(handler):
            signal.signal(sig, handler)
    return True


def probe_address(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT nothing listens on: one line now (Ray itself retries it for minutes)."""
    import socket

    target = address.split("://", 1)[1] if address.startswith("ray://") else address
    if address == "auto" or "://" in target or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        port_n = int(port)
    except ValueError:
        raise DeepvisError(f"engine.address must be auto, HOST:PORT or ray://HOST:PORT, got '{address}'") from None
    try:
        socket.create_connection((host, port_n), timeout=timeout).close()
    except OSError as e:
        raise DeepvisError(f"cannot reach the Ray cluster at engine.address={address}: {e.strerror or e} "
                           "(start one with 'ray start --head', or give engine.address=null for a local Ray)") from None


def _check_resources(cpus: float, gpus: float) -> None:
    """A trial that asks for more than the whole cluster has is never scheduled (Ray waits for
    it for ever): say so instead."""
    import ray

    have = ray.cluster_resources()
    for what, asked, key in (("cpus_per_trial", cpus, "CPU"), ("gpus_per_trial", gpus, "GPU")):
        if asked > have.get(key, 0.0) + 1e-9:
            raise DeepvisError(f"engine.{what}={asked:g}, but the Ray cluster has {have.get(key, 0.0):g} {key}s: "
                               f"no trial could ever start (give at most {have.get(key, 0.0):g})")


def run_search(runner, space: dict, *, folder: str, trials: int, base_steps: int, sampler: str = "random",
               seed: int = 0, address: str | None = None, cpus_per_trial: float | None = None,
               gpus_per_trial: float = 0.0, object_store_memory: int | None = 300_000_000,
               asha: dict | None = None, progress: bool = True) -> Ledger:
    """Run the trials the folder's ledger does not hold yet; returns the ledger. ``runner`` is a
    callable runner(params, report) (trial.TrialRunner, or any objective: a test gives a
    synthetic one). The identity check (check_identity) is the caller's."""
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C reaches us: the ledger is already written
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "1")
    try:  # Ray is optional (the search extra) and heavy: imported when a search runs
        import ray
        from ray import tune
    except ImportError:
        raise DeepvisError("deepvis-search runs on Ray Tune: pip install -e \".[search]\" "
                           "(or pip install 'ray[tune]')") from None
    ledger = Ledger(folder)
    done = ledger.done()
    if sampler not in ("random", "tpe"):
        raise DeepvisError(f"search.sampler must be random or tpe, got '{sampler}'")
    remaining = [i for i in range(int(trials)) if i not in done] if sampler == "random" else \
        list(range(len(done), max(len(done), int(trials))))
    if not remaining:
        return ledger
    started = _init_ray(address, object_store_memory)
    try:
        cpus = float(cpus_per_trial or ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        resources = {"cpu": cpus, "gpu": float(gpus_per_trial or 0)}
        _check_resources(resources["cpu"], resources["gpu"])
        tracker = _progress_callback(ledger, trials, base_steps, progress)
        kw = {}
        if sampler == "random":
            settings = sample(space, int(trials), seed)
            param_space = {"setting": tune.grid_search([{"index": i, "params": settings[i]} for i in remaining])}
        else:
            param_space = {}
            kw["search_alg"] = _tpe(space, ledger, seed)
        scheduler = None
        if asha and int(asha.get("grace_steps", 20)) < int(base_steps):  # else no rung to stop at
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="step", max_t=int(base_steps),
                                      grace_period=int(asha.get("grace_steps", 20)),
                                      reduction_factor=float(asha.get("reduction_factor", 2)))
        name = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trainable, runner=runner), resources),
            param_space=param_space,
            tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler,
                                        num_samples=1 if sampler == "random" else len(remaining), reuse_actors=True, **kw),
            run_config=tune.RunConfig(name=name, storage_path=os.path.abspath(os.path.join(folder, "tune")),
                                      callbacks=[tracker], verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)))
        try:
            tuner.fit()
        except (KeyboardInterrupt, DeepvisError):
            raise
        except OSError as e:  # a full disk under search.dir/tune
            raise disk_error(getattr(e, "filename", None) or os.path.join(folder, "tune"), e) from None
        except Exception as e:  # the cluster went away ('ray stop'), a Ray error of its own
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise DeepvisError(f"the search's Ray Tune run stopped: {type(e).__name__}: {first}; the "
                               f"finished trials are in {ledger.path}: rerun the same command to continue") from None
        if tracker.errors:
            # a trial that failed is a fault to fix, never an interruption to rerun past
            raise DeepvisError(f"{len(tracker.errors)} trial(s) failed ({tracker.errors[0]}); the finished "
                               f"trials are in {ledger.path}")
    finally:
        if started:
            import ray

            ray.shutdown()
    return ledger


def _tpe(space: dict, ledger: Ledger, seed: int):
    try:
        import optuna  # (OptunaSearch imports without it and fails later)
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise DeepvisError("search.sampler=tpe needs Optuna 3 or newer: pip install 'optuna>=3'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study
    rows = sorted(ledger.rows, key=lambda r: int(r["trial"]))
    # multivariate: the switches and their values are modelled together (independent TPE settles
    # on whichever switch pattern led early and then only tunes the values; tests/test_search.py)
    import warnings

    with warnings.catch_warnings():  # multivariate is "experimental" in Optuna's words since 2.2
        warnings.simplefilter("ignore")
        # seeded by the search's seed and how far it got: a resumed search must not draw its random
        # start again (the same seed alone would repeat the first run's settings under new numbers)
        sampler = optuna.samplers.TPESampler(seed=int(seed) + 1_000_003 * len(rows), multivariate=True,
                                             n_startup_trials=16)
    return OptunaSearch(space=tune_space(space), metric="score", mode="max", sampler=sampler,
                        points_to_evaluate=[r["params"] for r in rows] or None,
                        evaluated_rewards=[float(r["score"] or 0.0) for r in rows] or None)


def _progress_callback(ledger: Ledger, n_trials: int, base_steps: int, enabled: bool):
    """A Ray Tune callback (made here: Ray is imported only when a search runs): each finished
    trial goes into the ledger at once, and one line says trials done, the best score so far and
    the time left."""
    from ray.tune import Callback

    class SearchProgress(Callback):
        def __init__(self):
            self.errors: list[str] = []
            self.t0, self.finished_here = time.perf_counter(), 0

        @staticmethod
        def _index(trial) -> tuple[int, dict]:
            cfg = trial.config
            if "setting" in cfg:
                return int(cfg["setting"]["index"]), cfg["setting"]["params"]
            return len(ledger.rows), dict(cfg)  # the model-based sampler: numbered as they finish

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            if "score" not in result:
                return
            index, params = self._index(trial)
            if index in ledger.done():
                return
            row = row_from_result(index, params, result, base_steps)
            ledger.add(row)
            self.finished_here += 1
            if enabled:
                best = max(ledger.rows, key=lambda r: r["score"] if r["score"] is not None else -1)
                per = (time.perf_counter() - self.t0) / self.finished_here
                how = "" if row["status"] == "finished" else f" (stopped early at step {row['steps_run']})"
                print(f"trial {index}: score {row['score']:.3f}{how}; {len(ledger.rows)}/{n_trials} done, "
                      f"best {best['score']:.3f} (trial {best['trial']}), about "
                      f"{_minutes(per * max(0, n_trials - len(ledger.rows)))} left", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            index, _ = self._index(trial)
            err = getattr(trial, "error_file", None)
            text = ""
            if err and os.path.exists(err):
                with open(err, encoding="utf-8", errors="replace") as f:
                    lines = [l.strip() for l in f.read().strip().splitlines() if l.strip()]
                text = lines[-1][:300] if lines else ""
            self.errors.append(f"trial {index} failed: {text or 'see ' + str(err)}")

    return SearchProgress()


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
