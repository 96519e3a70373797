"""deepvis-search: the command (conf/search.yaml). Every option is checked before any work; the
search folder's ledger makes a rerun continue where a Ctrl-C or a kill left it."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from omegaconf import ListConfig, OmegaConf

from ..bf16 import fallback_note
from ..console import output_dir, resolve_device, seed_everything
from ..errors import DeepvisError
from ..files import check_output_dir, folder_lock, write_json
from ..numerics import Numerics
from ..optimize import backend_lr_scale
from ..outputs import machine, versions
from ..registry import instantiate_backend
from ..reproduce.harness import profile_units
from ..reproduce.stats import fmt_interval
from ..units import resolve_units
from ..validate import flag, number, whole
from .holdout import comparison_line, holdout_profile, validate
from .panel import load_or_build_panel
from .select import choose_best, pareto_figure, write_presets
from .space import check_space
from .trial import TrialRunner
from .tuning import Ledger, check_identity, probe_address, run_search


#: The paper tried about 300 settings; a search of a million would never end on any machine.
MAX_TRIALS = 100_000


def torch_device_type(device: str) -> str:
    return str(device).split(":")[0]


def _units(value) -> list[str]:
    units = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value] if value else []
    if not units:
        raise DeepvisError("search.units names no units; e.g. 'search.units=[fc:130,fc:366,blocks.10:5]'")
    return [str(u) for u in units]


def search_task(cfg) -> None:
    s, e = cfg.search, cfg.engine
    trials = whole("search.trials", s.trials, 1)
    if trials > MAX_TRIALS:
        raise DeepvisError(f"search.trials must be at most {MAX_TRIALS:,}, got {trials:,}")
    validating = flag("search.validate", s.validate)
    steps = whole("search.steps", s.steps, 1)
    seed = whole("search.seed", s.seed, 0)
    report_every = whole("search.report_every", s.report_every, 1)
    units = _units(s.units)
    sampler = str(s.sampler)
    if sampler not in ("random", "tpe"):
        raise DeepvisError(f"search.sampler must be random or tpe, got '{sampler}'")
    space = check_space(OmegaConf.to_container(s.space))
    asha = OmegaConf.to_container(s.asha) if s.asha else None
    if asha:
        asha = {"grace_steps": whole("search.asha.grace_steps", asha.get("grace_steps", 20), 1),
                "reduction_factor": number("search.asha.reduction_factor", asha.get("reduction_factor", 2),
                                           minimum=1.01)}
    cpus = number("engine.cpus_per_trial", e.cpus_per_trial, positive=True, allow_none=True)
    gpus = number("engine.gpus_per_trial", e.gpus_per_trial or 0, minimum=0.0)
    numerics = Numerics(str(cfg.numerics)).mode
    if e.address:
        probe_address(str(e.address))  # nothing listening there: one line now, not after the model loads
    folder = str(s.dir) if s.dir else output_dir()
    check_output_dir(folder, "search.dir")
    with folder_lock(folder, "search.dir", "wait for it to finish, or give another search.dir"):
        _search(cfg, s, e, trials=trials, validating=validating, steps=steps, seed=seed,
                report_every=report_every, units=units, sampler=sampler, space=space, asha=asha, cpus=cpus,
                gpus=gpus, numerics=numerics, folder=folder)


def _search(cfg, s, e, *, trials, validating, steps, seed, report_every, units, sampler, space, asha, cpus, gpus,
            numerics, folder) -> None:
    seed_everything(seed)
    device = resolve_device(cfg.device)
    if Numerics(numerics).runs_as(torch_device_type(device)) != numerics:
        # said here, where it is seen (a trial's own warning is lost inside its Ray worker)
        print(f"deepvis: {fallback_note(torch_device_type(device))}", file=sys.stderr, flush=True)
        numerics = "default"
    backend = instantiate_backend(cfg.backend).to(device)
    resolve_units(backend, units)  # a wrong unit is one line now, not an error in every trial
    if validating:  # a held-out class out of range is one line now, not after every trial ran
        try:
            profile_units(backend, holdout_profile(backend, OmegaConf.to_container(s.holdout), units, steps, []))
        except DeepvisError as err:
            raise DeepvisError(f"search.holdout: {err}".replace("profile.", "")) from None
    judge = instantiate_backend(cfg.judge).to(device)
    lr_scale = backend_lr_scale(backend)  # calibrated once here, not in every trial
    identity = {"backend": backend.name, "judge": judge.name, "units": units, "space": space, "sampler": sampler,
                "seed": seed, "steps": steps, "report_every": report_every, "asha": asha,
                "corpus": s.corpus, "numerics": numerics, "lr_scale": lr_scale}
    check_identity(folder, identity)
    panel = load_or_build_panel(os.path.join(folder, "panel.npz"), backend, judge, units, s.corpus)
    threads = int(cpus) if cpus else None
    runner = TrialRunner(backend, judge, panel, steps, report_every, seed, threads=threads, numerics=numerics)
    t0 = time.perf_counter()
    print(f"search: {trials} settings ({sampler}) on {len(units)} units of {backend.name}, up to {steps} steps "
          f"each, judged by {judge.name}; folder {folder}", flush=True)
    interrupted = False
    try:
        ledger = run_search(runner, space, folder=folder, trials=trials, base_steps=steps, sampler=sampler,
                            seed=seed, address=e.address, cpus_per_trial=cpus, gpus_per_trial=gpus,
                            object_store_memory=e.object_store_memory, asha=asha)
    except KeyboardInterrupt:
        interrupted, ledger = True, Ledger(folder)
    rows = ledger.rows
    if not rows:
        if interrupted:
            raise KeyboardInterrupt
        raise DeepvisError(f"no trial finished (see the warnings above); nothing written to {folder}")
    front = ledger.write_pareto()
    best = choose_best(rows, space, steps)
    here = machine()
    provenance = {"backend": backend.name, "judge": judge.name, "units": units, "trials": len(rows),
                  "budget_steps": steps, "sampler": sampler, "seed": seed, "lr_scale": lr_scale,
                  "search_dir": os.path.abspath(folder), "command": "deepvis-search " + " ".join(sys.argv[1:]),
                  "machine": here,
                  "date": time.strftime("%Y-%m-%d")}
    paths = write_presets(folder, best, steps, provenance)
    pareto_figure(os.path.join(folder, "pareto.png"), rows, front, best)
    summary = {"identity": identity, "trials": len(rows), "finished": sum(r["status"] == "finished" for r in rows),
               "stopped_early": sum(r["status"] != "finished" for r in rows), "seconds_this_run": time.perf_counter() - t0,
               "pareto": sorted(front), "best": [{"file": p, "trial": r["trial"], "score": r["score"]}
                                                 for p, r in zip(paths, best)],
               "versions": versions(), "machine": here}
    print(f"{len(rows)} trials in {folder}/trials.csv ({summary['stopped_early']} stopped early); "
          f"Pareto front: {len(front)} trials")
    for p, r in zip(paths, best):
        print(f"  {os.path.basename(p)}: trial {r['trial']}, score {r['score']:.3f}, median judge rank "
              f"{r['judge_rank_median'] if r['judge_rank_median'] is not None else '-'}, {_describe(r)}")
    if interrupted or len(rows) < trials:
        write_json(os.path.join(folder, "summary.json"), summary)
        print(f"interrupted: {len(rows)} of {trials} trials done; rerun the same command to continue",
              file=sys.stderr)
        if interrupted:
            raise KeyboardInterrupt
        return
    if validating:
        summary["validation"] = _validate(cfg, backend, judge, units, steps, paths, folder, seed, numerics,
                                          identity)
    write_json(os.path.join(folder, "summary.json"), summary)
    print(f"presets: {', '.join(paths)} (use as regularization=FILE)")


def _describe(r: dict) -> str:
    parts = []
    if r["decay"]:
        parts.append(f"decay {r['decay']:.2g}")
    if r["blur_radius"] and r["blur_every"]:
        parts.append(f"blur {r['blur_radius']:.2f} every {r['blur_every']}")
    if r["small_norm_pct"]:
        parts.append(f"norm clip {r['small_norm_pct']:.0f}%")
    if r["small_contrib_pct"]:
        parts.append(f"contrib clip {r['small_contrib_pct']:.0f}%")
    lr = f"lr {r['lr']:.0f}" if r["lr_policy"] == "constant" else f"progress {r['desired_prog']:.2g} (max lr {r['max_lr']:.0f})"
    return ", ".join(parts or ["no regularizer"]) + f", {lr}, {r['steps']} steps"


def _validate(cfg, backend, judge, units, steps, paths, folder, seed, numerics, identity) -> dict:
    profile = holdout_profile(backend, OmegaConf.to_container(cfg.search.holdout), units, steps, paths)
    out = Path(folder) / "validation"
    info = {"backend": backend.name, "judge": judge.name, "command": "deepvis-search (validation)",
            "versions": versions(), "machine": machine(), "numerics_mode": numerics,
            "profile_config": profile, "references": None, "search": identity}
    v = validate(backend, judge, profile, out, info, seed=seed, numerics=numerics)

    for srow in v["metrics"]["summary"]:
        ci = srow["intervals"]
        print(f"  {srow['setting']:<8} median judge rank {fmt_interval(ci['judge_rank'], 0)}  "
              f"activation {fmt_interval(ci['activation'])}  TV {fmt_interval(ci['total_variation'], 4)}")
    for p in v["vs_paper_3"]:
        print(comparison_line(p))
    print(f"validation on held-out units: {v['report']}")
    return {"report": v["report"], "vs_paper_3": v["vs_paper_3"],
            "summary": [{k: x[k] for k in ("setting", "units", "median_judge_rank", "judge_top5", "intervals")}
                        for x in v["metrics"]["summary"]]}
