"""Estimates of each part's seconds from the probe, and the budget's cuts."""
from __future__ import annotations

import copy
import heapq
import json
import math
from typing import Any

from gpurec.common import Log, STUDY_NAMES
from gpurec.probe import probe_key


def run_seconds(study: str, job_cfg: dict[str, Any], probe: dict[str, Any], startup: float, meta: dict[str, Any]) -> float:
    """Estimated seconds of one run alone: start-up + epochs x (steps x step + validation) + test."""
    p = probe[study].get(probe_key(job_cfg))
    if p is None or "error" in p:
        p = max((v for v in probe[study].values() if "error" not in v), key=lambda v: v["step_s"])
    n_train = job_cfg["data"].get("subset") or meta["train"]
    steps = math.ceil(n_train / job_cfg["data"]["batch_size"])
    epochs = job_cfg["train"]["epochs"]
    return startup + epochs * (steps * p["step_s"] + meta["val"] * p["eval_sample_s"]) + meta["test"] * p["eval_sample_s"]


def schedule(durations: list[float], slots: int) -> float:
    """Wall time of ``taskloom compare --jobs slots``: jobs start in order as slots free up."""
    free = [0.0] * max(1, slots)
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
    return max(free) if durations else 0.0


def estimate(settings: dict[str, Any], model: dict[str, Any]) -> dict[str, float]:
    """Seconds of every part for these settings (from the probe in ``model``)."""
    jobs = settings["jobs"]
    slowdown = jobs / model["speedup"](jobs)
    parts: dict[str, float] = {}
    for study in settings["studies"]:
        if study not in settings["parts"]:
            continue
        durations = []
        for cfg in model["jobs"][study]:
            if cfg["seed"] >= settings["seeds"]:
                continue
            if study == "mtfl" and not settings["weighting"] and cfg["weighting_row"]:
                continue
            c = copy.deepcopy(cfg["config"])
            c["train"]["epochs"] = settings["epochs"][study]
            # (the start-up was measured with every slot starting at once: it takes no slowdown)
            alone = run_seconds(study, c, model["probe"], model["startup"], model["meta"][study])
            durations.append(model["startup"] + (alone - model["startup"]) * slowdown)
        parts[study] = model["compare_overhead"] + schedule(durations, jobs)
    if "bench" in settings["parts"]:
        parts["bench"] = model["bench"](settings)
    if "tests" in settings["parts"]:
        parts["tests"] = model["tests"]
    return parts


def total(parts: dict[str, float], fixed: float) -> float:
    """Tests run beside the studies: they add to the total only where they outlast them."""
    studies = sum(v for k, v in parts.items() if k in STUDY_NAMES)
    return fixed + parts.get("bench", 0.0) + max(studies, parts.get("tests", 0.0))


def fit_budget(settings: dict[str, Any], model: dict[str, Any], budget: float | None, fixed: float,
               log: Log) -> tuple[dict[str, Any], list[str]]:
    """Cut the settings until the estimate fits ``budget``: the MTFL loss-weighting rows (when
    'auto'), UTKFace epochs to 20, seeds to 2, UTKFace epochs to 12, the benchmark, seeds to 1,
    MTFL epochs to 20 then 10 (below the issue's floor of 30), UTKFace epochs to 6."""
    cuts: list[str] = []
    if budget is None:
        return settings, cuts
    steps = []
    if settings["weighting_auto"] and settings["weighting"]:
        steps.append(("MTFL loss-weighting rows off", lambda s: s.update(weighting=False)))
    for e in (20,):
        steps.append((f"UTKFace {e} epochs", lambda s, e=e: s["epochs"].update(utkface=min(e, s["epochs"]["utkface"]))))
    steps.append(("2 seeds", lambda s: s.update(seeds=min(2, s["seeds"]))))
    steps.append(("UTKFace 12 epochs", lambda s: s["epochs"].update(utkface=min(12, s["epochs"]["utkface"]))))
    steps.append(("no benchmark", lambda s: s.update(parts=[p for p in s["parts"] if p != "bench"])))
    steps.append(("1 seed", lambda s: s.update(seeds=1)))
    for e in (20, 10):
        steps.append((f"MTFL {e} epochs (below the floor of 30)",
                      lambda s, e=e: s["epochs"].update(mtfl=min(e, s["epochs"]["mtfl"]))))
    steps.append(("UTKFace 6 epochs", lambda s: s["epochs"].update(utkface=min(6, s["epochs"]["utkface"]))))
    s = copy.deepcopy(settings)
    for name, cut in steps:
        if total(estimate(s, model), fixed) <= budget:
            break
        before = json.dumps(s, sort_keys=True)
        cut(s)
        if json.dumps(s, sort_keys=True) != before:
            cuts.append(name)
    over = total(estimate(s, model), fixed)
    if over > budget:
        log(f"budget: even with every cut the estimate is {over:.0f} s > {budget:.0f} s; running what fits by deadline")
    return s, cuts


def print_plan(settings: dict[str, Any], model: dict[str, Any], fixed_parts: dict[str, float], log: Log,
               cuts: list[str], budget: float | None) -> dict[str, float]:
    parts = estimate(settings, model)
    fixed = sum(fixed_parts.values())
    log("")
    log("| part | estimate s | what |")
    log("|---|---|---|")
    for name, sec in fixed_parts.items():
        log(f"| {name} | {sec:.0f} | measured |")
    if "bench" in parts:
        log(f"| bench | {parts['bench']:.0f} | step_time.py batched + fusion, fp32 / bf16 / bf16+channels_last |")
    for study in STUDY_NAMES:
        if study in parts:
            n = sum(1 for c in model["jobs"][study] if c["seed"] < settings["seeds"]
                    and (settings["weighting"] or not c["weighting_row"]))
            log(f"| {study} | {parts[study]:.0f} | {n} runs, {settings['epochs'][study]} epochs of batch "
                f"{settings['batch'][study]} on {model['meta'][study]['train']} faces, {settings['seeds']} seeds, "
                f"{settings['jobs']} at once ({model['speedup'](settings['jobs']):.1f}x one) |")
    if "tests" in parts:
        log(f"| tests | {parts['tests']:.0f} | beside the studies (a guess, not probed) |")
    log(f"| **total** | **{total(parts, fixed):.0f}** | budget {budget if budget is not None else 'none'}"
        f"{'; cuts: ' + ', '.join(cuts) if cuts else ''} |")
    flags = (f"--mtfl-epochs {settings['epochs']['mtfl']} --utk-epochs {settings['epochs']['utkface']} "
             f"--seeds {settings['seeds']} --jobs {settings['jobs']} --weighting {'on' if settings['weighting'] else 'off'} "
             f"--parts {' '.join(settings['parts'])}")
    log(f"flags: {flags}")
    return parts
