"""The search report: ``search.json`` (everything), ``search.md`` (the table and the verdict),
``search.png`` (score vs shift with seed error bars: the paper's Fig. 6 view), each written
atomically; ``search.json`` is written last (it is the manifest). ``--patch-out`` writes the
patched model with the winning shift through ``bnnshift.patch``.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._io import LOCK_NAME, atomic_write_bytes, atomic_write_json, atomic_write_text
from .errors import OutputError
from .vocab import Schedule

if TYPE_CHECKING:  # pragma: no cover - the types only: search writes its report, so report imports
    # nothing of search at run time (no import circle); results.py itself imports neither
    from .search.config import SearchConfig
    from .search.context import SearchContext
    from .search.results import SearchSummary

__all__ = ["write_report", "render_markdown", "render_png", "render_table", "write_patched", "verdict",
           "paired_differences", "val_stats", "budget_text", "run_info", "search_json", "halving_groups"]


def _pct(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v * 100:.{nd}f}"


def _score_text(s) -> str:
    if s.mean is None:
        return "-"
    return f"{s.mean * 100:.2f} ± {(s.std or 0) * 100:.2f}" if s.n > 1 else f"{s.mean * 100:.2f}"


def _key(t: float) -> float:
    return round(float(t), 9)


def budget_text(summary: "SearchSummary") -> str:
    """What a score is measured after: "one epoch", or "N steps" with --steps."""
    steps = (summary.config or {}).get("steps")
    return f"{steps} steps" if steps else "one epoch"


def _values(summary: "SearchSummary", field: str) -> dict[float, dict[int, float]]:
    """shift -> seed -> value of ``field`` ('score', 'val_acc') over the ok candidates."""
    out: dict[float, dict[int, float]] = {}
    for c in summary.candidates:
        v = getattr(c, field, None)
        if c.ok and v is not None:
            out.setdefault(_key(c.shift), {})[c.seed] = float(v)
    return out


def _mean_std(vals: list[float]) -> tuple[float | None, float | None]:
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return m, sd


def val_stats(summary: "SearchSummary") -> dict[float, tuple[float, float, int]] | None:
    """shift -> (mean, std, n) of the held-out accuracy over seeds; ``None`` without --val."""
    vals = _values(summary, "val_acc")
    if not vals:
        return None
    return {t: (*_mean_std(list(by.values())), len(by)) for t, by in vals.items()}  # type: ignore[misc]


def paired_differences(summary: "SearchSummary") -> dict[float, list[float]]:
    """shift -> per-seed ``score(t, seed) - score(0, seed)`` over the seeds where both trained
    the same number of steps (every candidate of a seed starts from the same weights and sees
    the same batches, so the pair differs only in t). Empty without t = 0."""
    scores = _values(summary, "score")
    steps = {(_key(c.shift), c.seed): c.steps for c in summary.candidates if c.ok}
    base = scores.get(_key(0.0))
    if not base:
        return {}
    out = {}
    for t, by in scores.items():
        out[t] = [v - base[seed] for seed, v in sorted(by.items())
                  if seed in base and steps.get((t, seed)) == steps.get((_key(0.0), seed))]
    return out


def _diff_text(d: list[float] | None) -> str:
    if not d:
        return "-"
    m, sd = _mean_std(d)
    return f"{m * 100:+.2f}" + (f" ± {sd * 100:.2f}" if len(d) > 1 else "")


def verdict(summary: "SearchSummary") -> dict[str, Any]:
    """The search's answer in words, honest about the noise, the same both ways.

    ``{"text": str, "winner": float | None, "tie": bool, "resolved": bool, "notes": [str]}``:
    ``winner`` is the best mean score (``summary.winner``). The text names a shift only when it
    is ahead of t = 0 beyond the seed noise (``summary.ahead_of_baseline``), and t = 0 only when
    it is ahead of the best other shift beyond the noise (``summary.baseline_ahead``); else "tie
    within noise", whichever of the two has the better mean. ``resolved`` is true only when such
    a comparison beyond the noise exists (a winner, shift or t = 0) over the epoch; a tie is not
    resolved, nor is a lead beyond the noise at an early successive-halving rung where one of the
    two stopped (``EARLY_RUNG``). With
    fewer than ``validate.MIN_VERDICT_SEEDS`` (3) seeds per shift there is no noise estimate:
    "not resolved" (``resolved`` false, ``tie`` false). Notes: too few seeds, a winner at the
    edge of the grid, a search from a trained checkpoint (the paper searches from scratch,
    docs/paper.md claim 5).
    """
    from .validate import MIN_VERDICT_SEEDS

    w = summary.winner
    notes: list[str] = []
    tie = False
    few = len(summary.seeds) < MIN_VERDICT_SEEDS
    resolved = False
    runner = getattr(summary, "runner_up", None)
    base_ahead = getattr(summary, "baseline_ahead", None)
    if w is None:
        text = "no winner: every candidate failed"
    elif summary.ahead_of_baseline and _early_rung(summary, w):
        diff, where = _diff_to_baseline(summary, w)
        text = f"not resolved (t = {w:g}: {diff * 100:+.2f} points vs t = 0{where}; {EARLY_RUNG}"
        notes.append(summary.noise_note)
    elif summary.ahead_of_baseline:
        resolved = True
        text = f"t = {w:g} ({summary.noise_note})"
    elif _key(w) == _key(0.0):
        if base_ahead and runner is not None and _early_rung(summary, runner):
            diff, where = _diff_to_baseline(summary, runner)
            text = (f"not resolved (t = 0 scores best; best shift t = {runner:g}: {diff * 100:+.2f} points vs "
                    f"t = 0{where}; {EARLY_RUNG}")
            notes.append(summary.noise_note)
        elif base_ahead:
            resolved = True
            text = f"t = 0 (no shift) scores best ({summary.noise_note})"
        elif base_ahead is False and runner is not None:
            tie = True
            diff, where = _diff_to_baseline(summary, runner)
            text = (f"tie within noise (best mean t = 0; best shift t = {runner:g}: {diff * 100:+.2f} points "
                    f"vs t = 0{where})")
            notes.append(summary.noise_note)
        elif runner is None:
            text = "t = 0 (no shift) scores best (not resolved: no other shift to compare with)"
        else:
            text = "t = 0 (no shift) scores best (not resolved: too few seeds)"
    elif summary.baseline is None:
        text = f"best t = {w:g} (t = 0 is not in the grid: nothing to compare with)"
    elif summary.ahead_of_baseline is None:  # no noise estimate (fewer than 3 seeds)
        diff, where = _diff_to_baseline(summary, w)
        text = f"not resolved (best mean t = {w:g}: {diff * 100:+.2f} points vs t = 0{where}, too few seeds to judge)"
    else:
        tie = True
        diff, where = _diff_to_baseline(summary, w)
        text = f"tie within noise (best mean t = {w:g}: {diff * 100:+.2f} points vs t = 0{where})"
        notes.append(summary.noise_note)
    if few and w is not None:
        n = len(summary.seeds)
        notes.append(f"{n} seed{'s' if n != 1 else ''}: no noise estimate; rerun with --seeds {MIN_VERDICT_SEEDS} "
                     "or more before trusting a difference")
    grid = sorted({_key(t) for t in summary.shifts})
    if w is not None and len(grid) > 2 and _key(w) in (grid[0], grid[-1]) and _key(w) != _key(0.0):
        side = "below" if _key(w) == grid[0] else "above"
        notes.append(f"the best t = {w:g} is at the edge of the grid: extend --shifts {side} it")
    if (summary.config or {}).get("checkpoint"):
        notes.append("searched from a trained checkpoint: the paper searches from scratch (random or full-precision "
                     "init, docs/paper.md); weights and BN statistics trained at t = 0 favour t = 0")
    return {"text": text, "winner": w, "tie": tie, "resolved": resolved, "notes": notes}


# successive halving: a lead beyond the noise at an early rung is no verdict (measured, docs/search.md
# "would --seeds 3 --schedule halving answer": none of 7 such claims did a 5-seed full search make)
EARLY_RUNG = ("beyond the noise only at that rung: an early rung's lead does not predict the epoch's; "
              "rerun with --schedule full for a verdict)")


def _early_rung(summary: "SearchSummary", w: float) -> bool:
    """Whether successive halving stopped t = 0 or shift ``w`` at an earlier rung than the other
    (their comparison is then at that rung, not over the epoch)."""
    stats = {_key(st.shift): st for st in summary.stats}
    ws, bs = stats.get(_key(w)), stats.get(_key(0.0))
    return (ws is not None and bs is not None and ws.rung is not None and bs.rung is not None
            and ws.rung != bs.rung)


def _diff_to_baseline(summary: "SearchSummary", w: float) -> tuple[float, str]:
    """Shift ``w``'s mean score minus t = 0's at equal steps, and where: when successive halving
    eliminated one of them at an earlier rung, both at that rung (paired: same batches, same steps)."""
    stats = {_key(st.shift): st for st in summary.stats}
    ws, bs = stats.get(_key(w)), stats.get(_key(0.0))
    if ws is None or ws.mean is None or bs is None or bs.mean is None:
        return 0.0, ""
    if bs.rung is None or ws.rung is None or ws.rung == bs.rung:
        return ws.mean - bs.mean, ""
    stopped = bs if bs.rung < ws.rung else ws  # the one successive halving eliminated first
    r = stopped.rung

    def at_rung(t: float) -> list[float]:
        return [c.rung_scores[r] for c in summary.candidates
                if _key(c.shift) == _key(t) and c.ok and len(c.rung_scores or []) > r]

    wv, bv = at_rung(w), at_rung(0.0)
    if not wv or not bv:
        return ws.mean - bs.mean, ""
    return (sum(wv) / len(wv) - sum(bv) / len(bv),
            f" at rung {r}, after {stopped.steps} steps, where t = {stopped.shift:g} stopped")


def run_info(summary: "SearchSummary") -> dict[str, Any]:
    """Where the scores came from: the command line, torch's version, CPU threads and device
    (scores depend on the thread count under one config hash: reductions run in another order)."""
    import os
    import sys

    import torch

    return {"argv": list(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "device": (summary.config or {}).get("device") or "cpu", "python": sys.version.split()[0]}


def search_json(summary: "SearchSummary") -> dict[str, Any]:
    """``search.json`` / ``search --json``: the summary, the verdict and the run's environment
    (docs/search.schema.json)."""
    return {**summary.to_json(), "verdict": verdict(summary), "run": run_info(summary)}


def _is_halving(summary: "SearchSummary") -> bool:
    return (getattr(summary, "schedule", None) or {}).get("name") == Schedule.HALVING


def _epoch_steps(summary: "SearchSummary") -> int | None:
    steps = (summary.schedule or {}).get("rung_steps") or []
    return steps[-1] if steps else None


def _steps_text(summary: "SearchSummary", s) -> str:
    """``58/234``: the training steps a shift's score covers out of the epoch's."""
    total = _epoch_steps(summary)
    if s.steps is None:
        return "-"
    return f"{s.steps}/{total}" if total else str(s.steps)


def halving_groups(summary: "SearchSummary") -> list[tuple[str, list]]:
    """Successive halving's table order, survivors first: ``[(label, [ShiftStats...]), ...]``.

    The shifts of the last rung reached (they finished the epoch) come first, then the
    eliminated ones by the rung they stopped at, latest rung first; within a group by score
    (best first; failed last). A group's scores cover the same number of steps; across groups
    they do not (an eliminated shift's score is its train accuracy after fewer steps)."""
    groups: dict = {}
    for s in summary.stats:
        groups.setdefault(s.rung, []).append(s)
    order = sorted(groups, key=lambda r: -1 if r is None else r, reverse=True)
    total = _epoch_steps(summary)
    out = []
    for i, rung in enumerate(order):
        rows = sorted(groups[rung], key=lambda s: (s.mean is None, -(s.mean or 0.0), abs(s.shift)))
        steps = max((s.steps for s in rows if s.steps is not None), default=None)
        if rung is None:
            label = "not trained"
        elif i == 0 and steps == total:
            label = f"finished the epoch (rung {rung}, {steps}/{total} steps)"
        else:
            label = (f"eliminated at rung {rung}: scores after {steps}/{total} steps, not comparable with the rows "
                     "above")
        out.append((label, rows))
    return out


def _status_text(summary: "SearchSummary", s, finished: bool) -> str:
    failed = f" ({s.failed} failed)" if s.failed else ""
    if not _is_halving(summary) or s.rung is None or s.status == "failed":
        return s.status + failed
    return ("finished" if finished else f"eliminated at rung {s.rung}") + failed


def _stop_text(stop: dict) -> str:
    tight = stop.get("tightest") or {}
    lead = (f"; tightest lead t = {tight['ahead']:g} over t = {tight['behind']:g}: "
            f"{tight['margin'] * 100:.2f} points, {tight['z']:.1f} paired SE" if tight.get("z") is not None else
            (f"; t = {tight['ahead']:g} led t = {tight['behind']:g} at every step" if tight else ""))
    return (f"stopped early at step {stop['steps']} of {stop['planned_steps']}: the kept shifts held for "
            f"{stop['window']} steps{lead}; {stop['steps_saved']} candidate steps saved")


def _schedule_lines(summary: "SearchSummary") -> list[str]:
    """The successive-halving schedule: each rung's steps, candidates and survivors; the cost."""
    sch, cost = summary.schedule or {}, summary.cost or {}
    out = [f"- schedule: successive halving (eta {sch.get('eta'):g}, first rung {sch.get('min_fraction'):g} of the "
           f"epoch); {cost.get('candidate_steps')} candidate steps vs {cost.get('full_grid_candidate_steps')} for "
           f"the full grid ({(cost.get('ratio') or 0):.2f}x)" + _wall_text(cost)]
    if sch.get("fallback"):
        out.append(f"- fell back to the full schedule: {sch['fallback'].removeprefix('full: ')}")
    elif sch.get("plan_note"):
        out.append(f"- rungs: {sch['plan_note']}")
    if sch.get("stop_when_stable"):
        out.append(f"- --stop-when-stable: a rung ends once the shifts it keeps held for {sch['stable_fraction']:g} "
                   f"of its steps and each leads each eliminated shift by more than {sch['stable_z']:g} paired standard "
                   f"errors; {cost.get('steps_saved_by_stable_stop', 0)} candidate steps saved")
    for r in summary.rungs:
        kept = ", ".join(f"{t:g}" for t in r.get("kept") or []) or "-"
        line = (f"  - rung {r['rung']} ({r['steps']} steps, {r['fraction'] * 100:.1f}% of the epoch): "
                f"{len(r['candidates'])} shift{'s' if len(r['candidates']) != 1 else ''}, kept {kept}")
        if r.get("stopped_early"):
            line += f"; {_stop_text(r['stopped_early'])}"
        if r.get("decision"):
            line += f"; {r['decision']['action']}: {r['decision']['why']}"
            if r["decision"].get("baseline") and r["decision"]["action"] != "baseline":
                line += f"; {r['decision']['baseline']}"
        sc = r.get("scores") or {}
        if sc:  # every rung's scores (mean over seeds, at equal steps)
            line += "; scores " + ", ".join(f"t={float(t):g} {'-' if v is None else f'{v * 100:.2f}%'}"
                                           for t, v in sorted(sc.items(), key=lambda kv: float(kv[0])))
        out.append(line)
    return out


def _wall_text(cost: dict[str, Any]) -> str:
    """The halving run's wall time next to its step ratio (the full grid's estimated from this
    run's seconds per training step)."""
    wall = cost.get("wall_seconds")
    if wall is None:
        return ""
    est = cost.get("full_grid_seconds_estimate")
    if not est:
        return f"; wall {wall:.1f}s"
    return (f"; wall {wall:.1f}s vs ~{est:.1f}s of training steps for the full grid "
            f"({(cost.get('wall_ratio_estimate') or 0):.2f}x, estimated)")


def _val_text(vs: dict[float, tuple[float, float, int]] | None, shift: float) -> str:
    if not vs or _key(shift) not in vs:
        return "-"
    m, sd, n = vs[_key(shift)]
    return f"{m * 100:.2f}" + (f" ± {sd * 100:.2f}" if n > 1 else "")


def render_markdown(summary: "SearchSummary") -> str:
    cfg = summary.config
    lines = [f"# bnnshift search: {cfg.get('model', 'model')} on {cfg.get('data', '-')}", ""]
    v = verdict(summary)
    lines.append(f"- metric: `{summary.metric}` (percent) after {budget_text(summary)}, seeds: {summary.seeds}, "
                 f"sites: {len(summary.sites)}")
    lines.append(f"- verdict: **{v['text']}**")
    lines += [f"- note: {n}" for n in v["notes"]]
    lines.append(f"- same initial weights across candidates of a seed: {summary.shared_init}; "
                 f"same batch order: {summary.shared_batches}")
    comp = ("compiled" if summary.compiled else "eager") if summary.compiled is not None else "-"
    if summary.compile_seconds:
        comp += f" (first compiled step {summary.compile_seconds:.1f}s)"
    if summary.compile_error:
        comp += f"; compile failed, eager fallback: {summary.compile_error}"
    lines.append(f"- training step: {comp}; wall time {summary.seconds:.1f}s; resumed candidates: {summary.resumed}")
    if getattr(summary, "step_path", None):
        lines.append(f"- --compile auto chose {summary.step_path['reason']}")
    lines.append(f"- config hash: `{summary.config_hash}`")
    halving = _is_halving(summary)
    if halving:
        lines += _schedule_lines(summary)
    vs, diffs = val_stats(summary), paired_differences(summary)
    val_col = "| val % " if vs else ""
    diff_col = "| score - t=0, per seed " if diffs else ""
    if halving:  # survivors first; each score says how many steps it covers
        lines += ["", f"| # | t | score | after steps | rung {val_col}{diff_col}| loss | +1 share (mean over sites) | n "
                      "| status |",
                  "|---|---|---|---|---|" + ("---|" if vs else "") + ("---|" if diffs else "") + "---|---|---|---|"]
        groups = halving_groups(summary)
    else:
        lines += ["", f"| t | score {val_col}{diff_col}| loss | +1 share (mean over sites) | n | status |",
                  "|---|---|" + ("---|" if vs else "") + ("---|" if diffs else "") + "---|---|---|---|"]
        groups = [("", list(summary.stats))]
    rank = 0
    for gi, (_label, rows) in enumerate(groups):
        for s in rows:
            rank += 1
            mark = (" **(best)**" if v["tie"] else " **(winner)**") if summary.winner is not None and \
                s.shift == summary.winner else ""
            head = (f"| {rank} | {s.shift:g}{mark} | {_score_text(s)} | {_steps_text(summary, s)} | "
                    f"{'-' if s.rung is None else s.rung} " if halving else f"| {s.shift:g}{mark} | {_score_text(s)} ")
            val = f"| {_val_text(vs, s.shift)} " if vs else ""
            diff = f"| {_diff_text(diffs.get(_key(s.shift)))} " if diffs else ""
            lines.append(f"{head}{val}{diff}| {'-' if s.loss is None else f'{s.loss:.4f}'} | "
                         f"{'-' if s.plus_fraction_mean is None else f'{s.plus_fraction_mean:.3f}'} | {s.n} | "
                         f"{_status_text(summary, s, gi == 0)} |")
    if halving:
        lines += ["", "Successive halving: the shifts that finished the epoch are ranked first, then the eliminated "
                      "ones by the rung they stopped at; a score is the train accuracy over its row's steps, so "
                      "compare scores within one rung (each rung's scores at equal steps are listed above)."]
    failed = [c for c in summary.candidates if not c.ok]
    if failed:
        lines += ["", "## Failed candidates", ""]
        for c in failed:
            lines.append(f"- t = {c.shift:g}, seed {c.seed}: {c.error or 'failed'}"
                         + (f" (step {c.failed_step})" if c.failed_step else ""))
    if summary.sites and any(s.plus_fraction for s in summary.stats):
        lines += ["", "## +1 share per site at the end of the epoch (BN statistics re-estimated)", "",
                  "| t | " + " | ".join(summary.sites) + " |", "|---|" + "---|" * len(summary.sites)]
        for s in summary.stats:
            lines.append(f"| {s.shift:g} | " + " | ".join(
                "-" if s.plus_fraction.get(n) is None else f"{s.plus_fraction[n]:.3f}" for n in summary.sites) + " |")
    over = "the first epoch" if budget_text(summary) == "one epoch" else f"the first {budget_text(summary)}"
    lines += ["", f"Score = train accuracy accumulated over {over} (Kim et al. CVPR 2021, claim 5: over one "
              "epoch its trend over t follows the final validation accuracy). \"score - t=0\": the difference to "
              "t = 0 of the same seed (same initial weights, same batches), mean ± std over seeds. "
              "![score vs shift](search.png)", ""]
    return "\n".join(lines)


def render_png(summary: "SearchSummary") -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    diffs = paired_differences(summary)
    vs = val_stats(summary)
    fig = Figure(figsize=(6, 6.5 if diffs else 4), dpi=100)
    if diffs:
        ax, dax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    else:
        ax, dax = fig.add_subplot(111), None
    ok = [s for s in summary.stats if s.mean is not None]
    v = verdict(summary)
    budget = budget_text(summary)
    if _is_halving(summary) and summary.rungs:
        # one curve per rung: the train accuracy so far of every shift that reached it
        ok = [s for s in ok if s.rung == max(x.rung or 0 for x in ok)]
        for r in summary.rungs[:-1]:
            pts = sorted((float(k), v) for k, v in (r.get("scores") or {}).items() if v is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], marker=".", linestyle="--", alpha=0.7,
                        label=f"rung {r['rung']} ({r['fraction'] * 100:.0f}% of the epoch)")
    if ok:
        ax.errorbar([s.shift for s in ok], [s.mean * 100 for s in ok], yerr=[(s.std or 0) * 100 for s in ok],
                    marker="o", capsize=3,
                    label=summary.metric + (" (whole epoch, last rung)" if _is_halving(summary) else ""))
        if summary.winner is not None:
            w = next(s for s in ok if s.shift == summary.winner)
            ax.plot([w.shift], [w.mean * 100], marker="*", markersize=14, color="tab:red", linestyle="none",
                    label=f"best t={w.shift:g} (tie within noise)" if v["tie"] else f"winner t={w.shift:g}")
    if vs:
        pts = sorted(vs.items())
        ax.errorbar([t for t, _ in pts], [m * 100 for _, (m, _, _) in pts], yerr=[sd * 100 for _, (_, sd, _) in pts],
                    marker="s", capsize=3, color="tab:green", label="val_acc (held-out, BN re-estimated)")
    if dax is not None:
        for t, d in sorted(diffs.items()):
            dax.plot([t] * len(d), [x * 100 for x in d], marker="o", linestyle="none", color="tab:blue", alpha=0.5,
                     markersize=4)
        means = [(t, sum(d) / len(d)) for t, d in sorted(diffs.items()) if d]
        dax.plot([t for t, _ in means], [m * 100 for _, m in means], color="tab:blue", label="mean over seeds")
        dax.axhline(0.0, color="gray", linewidth=0.8)
        dax.axvline(0.0, color="gray", linewidth=0.8, linestyle=":")
        dax.set_xlabel("threshold shift t  (sign(x - t))")
        dax.set_ylabel("score - score(t=0)\nsame seed (points)")
        dax.grid(True, alpha=0.3)
        dax.legend(loc="best", fontsize=8)
    bad = [s for s in summary.stats if s.mean is None]
    if bad and ok:
        lo = min(s.mean for s in ok) * 100
        ax.plot([s.shift for s in bad], [lo] * len(bad), marker="x", color="gray", linestyle="none", label="failed")
    ax.axvline(0.0, color="gray", linewidth=0.8, linestyle=":")
    if dax is None:
        ax.set_xlabel("threshold shift t  (sign(x - t))")
    ax.set_ylabel(f"{summary.metric} after {budget} (%)")
    n_seeds = len(summary.seeds)
    ax.set_title(f"{summary.config.get('model', 'model')}: score after {budget} vs shift "
                 f"({n_seeds} seed{'s' if n_seeds != 1 else ''})" + ("\ntie within noise" if v["tie"] else ""),
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(summary: "SearchSummary", out_dir: str | Path) -> dict[str, str]:
    """Write search.md, search.png, then search.json (the manifest) into ``out_dir``.

    Returns ``{"json": path, "md": path, "png": path, "journal": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": str(out / "search.md"), "png": str(out / "search.png"), "json": str(out / "search.json"),
             "journal": str(out / "journal.jsonl")}
    summary.files = files
    atomic_write_text(files["md"], render_markdown(summary))
    atomic_write_bytes(files["png"], render_png(summary))
    atomic_write_json(files["json"], search_json(summary))
    return files


def render_table(summary: "SearchSummary"):
    """The final rich table: t, score mean ± std, loss, +1 share (mean over sites), status."""
    from rich.table import Table

    t = Table(title=f"search: {summary.metric} after {budget_text(summary)} ({len(summary.seeds)} seed"
                    f"{'s' if len(summary.seeds) != 1 else ''}, {len(summary.sites)} sites)")
    halving = _is_halving(summary)
    vs, diffs = val_stats(summary), paired_differences(summary)
    extra = (*(("val %",) if vs else ()), *(("vs t=0",) if diffs else ()))
    cols = ("#", "t", "score %", "after steps", "rung") if halving else ("t", "score %")
    for c in (*cols, *extra, "loss", "+1 share", "n", "status"):
        t.add_column(c, justify="right" if c != "status" else "left")
    groups = halving_groups(summary) if halving else [("", list(summary.stats))]
    rank = 0
    for gi, (_label, rows) in enumerate(groups):
        if gi:
            t.add_section()  # a line between the finished shifts and each rung's eliminated ones
        for s in rows:
            rank += 1
            win = summary.winner is not None and s.shift == summary.winner
            more = (*((_val_text(vs, s.shift),) if vs else ()),
                    *((_diff_text(diffs.get(_key(s.shift))),) if diffs else ()))
            head = ((str(rank), f"{s.shift:g}" + (" *" if win else ""), _score_text(s), _steps_text(summary, s),
                     "-" if s.rung is None else str(s.rung)) if halving
                    else (f"{s.shift:g}" + (" *" if win else ""), _score_text(s)))
            t.add_row(*head, *more, "-" if s.loss is None else f"{s.loss:.4f}",
                      "-" if s.plus_fraction_mean is None else f"{s.plus_fraction_mean:.3f}", str(s.n),
                      _status_text(summary, s, gi == 0), style="bold" if win else None)
    if halving and summary.cost.get("ratio") is not None:
        saved = summary.cost.get("steps_saved_by_stable_stop")
        t.caption = (f"successive halving: finished shifts first, then the eliminated ones by rung (their scores "
                     f"cover fewer steps); {summary.cost['candidate_steps']} candidate steps, "
                     f"{summary.cost['ratio']:.2f}x the full grid's"
                     + (f", {saved} saved by --stop-when-stable" if saved else ""))
    return t


# ------------------------------------------------------------------------------ --patch-out


def write_patched(ctx: "SearchContext", summary: "SearchSummary", out_dir: str | Path, *, force: bool = False,
                  cfg: "SearchConfig | None" = None) -> Path:
    """Write the model (initial weights, or the checkpoint) patched with the winning shift: the
    same code path and files as ``bnnshift patch`` (``patch_model`` -> ``build_recipe`` ->
    ``save_patched``: ``model.safetensors`` + ``patch.json``)."""
    from . import patch as patch_mod

    shift = float(summary.winner)
    shifts = {s.name: shift for s in ctx.sites}
    return _via_patch_module(patch_mod, ctx, shifts, out_dir, force=force, cfg=cfg)


def _via_patch_module(patch_mod, ctx, shifts, out_dir, *, force, cfg) -> Path:
    """The same code path as ``bnnshift patch``: patch_model -> build_recipe -> save_patched."""
    seed = cfg.seeds[0] if cfg is not None else 0
    model = ctx.factory(seed)
    t = next(iter(shifts.values()))
    if cfg is not None and cfg.hardtanh:
        patch_mod.patch_model(model, [], None, hardtanh_shift=t, hardtanh_sites=ctx.sites)
    else:
        patch_mod.patch_model(model, ctx.sites, float(t))
    loaded = ctx.loaded
    recipe = patch_mod.build_recipe(model, spec=getattr(loaded, "spec", None), input_shape=ctx.input_shape,
                                    checkpoint=getattr(loaded, "checkpoint", None),
                                    checkpoint_sha256=getattr(loaded, "checkpoint_sha256", None))
    norm = getattr(ctx, "normalisation", None)
    if isinstance(norm, dict) and norm.get("source") == "given" and hasattr(recipe, "normalisation"):
        src = "--mean/--std" if cfg is not None and getattr(cfg, "mean", None) is not None else "timm pretrained_cfg"
        recipe.normalisation = {"mean": list(norm["mean"]), "std": list(norm["std"]), "source": src}
    from ._io import replace_dir
    from .journal import OutputLock

    # one writer per output, as search --out and patch -o (reentrant: the CLI took it before the search)
    with OutputLock(out_dir, beside=True):
        d = Path(out_dir)
        if not force and d.is_dir() and any(c.name != LOCK_NAME for c in d.iterdir()):
            raise OutputError(f"output directory {d} is not empty", hint="pass --force to overwrite")
        with replace_dir(out_dir, force=True) as tmp:  # swapped in whole
            patch_mod.save_patched(model, recipe, tmp, force=True)
    return Path(out_dir)
