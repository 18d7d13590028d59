"""``smk-report``: compare finished runs from their TensorBoard event files.

    smk-report lightning_logs/smk_switch/version_3 lightning_logs/default --out reports/ --names smk switch
    smk-report sweep/runs/switch sweep/runs/smk_switch --names switch smk_switch --out sweep/

Each RUN_DIR is a Lightning version dir (``events.out.tfevents.*``, ``config.yaml``,
``hparams.yaml``) or a parent of such dirs (every version dir below it with an event file
is a run). ``--names`` gives one name per run found, or one per RUN_DIR (shared by every
run found below it). Writes ``report.md`` (a table plus a legend) and ``report.png``
(train/loss, val/loss, train/g_acc_dense and train/kl_div against step) into ``--out``.

Runs that share a name (seeds of one arm) are grouped: one row per name with mean ± std
and the number of runs n, in the columns of the research protocol; ``--group`` groups
even single runs (by parent dir name when ``--names`` is not given). Otherwise each run
gets its own row.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from functools import partial
from pathlib import Path

import yaml

from smk_lightning.errors import exit_with_error

EVENT_GLOB = "events.out.tfevents.*"
MISSING = "—"
NMI_TAG = re.compile(r"^routing/[^/]+/domain_nmi$")
# panel titles: the training loss beside the validation loss, so a short run that validated
# once still has a curve; g_acc_dense is the accuracy to read (chance 1/E)
PLOT_TAGS = {"train/loss": "train/loss", "val/loss": "val/loss",
             "train/g_acc_dense": "train/g_acc_dense (chance 1/E)", "train/kl_div": "train/kl_div"}

# column header → what it is (and the tag it comes from), for the legend under the table
LEGEND = {
    "run": "run name (--names, else the run dir's parent/name, with more of its path where two runs would share it)",
    "router loss": "`model.router.loss` (stats `model.stats.scope` / `model.stats.engine`) from config.yaml",
    "settings": "the `model.router/stats/optim/model.*` values that are not the same in every run of this report "
                "(what tells the arms apart; seeds aside)",
    "steps": "last training step logged (largest step of any `train/*` tag)",
    "val loss": "final `val/loss`",
    "val ppl": "final `val/ppl`",
    "g_acc_dense": "final `train/g_acc_dense` (/ final `val/g_acc_dense` when logged): router argmax = ΔSC argmax "
                   "on rows where every expert is defined; chance 1/E",
    "kl_div": "final `train/kl_div` (/ final `val/kl_div` when logged)",
    "load max share": "mean of `routing/load_max_share` over the last 20% of steps",
    "dead experts": "mean of `routing/dead_experts` over the last 20% of steps",
    "domain NMI": "mean over layers of the final `routing/<layer>/domain_nmi`",
    "tokens/s": "median of `throughput/tokens_per_s` over the run",
    "peak memory MB": "max of `memory/peak_mb`",
}


# grouped table (one row per arm, mean ± std over its runs): the research protocol's columns
GROUP_LEGEND = {
    "arm": "name shared by the runs (seeds) of one arm",
    "n": "number of runs in the arm",
    "router loss": LEGEND["router loss"],
    "settings": LEGEND["settings"],
    "steps": LEGEND["steps"],
    "val loss": "final `val/loss`",
    "per run": "each run's final `val/loss`, in the order of the runs (seed 0, 1, …)",
    "val ppl": "final `val/ppl`",
    "g_acc_dense": "final `val/g_acc_dense` (router argmax = ΔSC argmax on rows where every expert is defined; chance 1/E)",
    "kl_div": "final `val/kl_div`",
    "agreement": "final `val/agreement`: target–router agreement, mean over tokens with ≥ 3 defined experts of the "
                 "correlation of the router's probabilities with ΔSC (0: unrelated, 1: same order and spacing)",
    "router entropy": "mean of `routing/entropy` over the last 20% of steps (uniform over E experts: log E)",
    "route change": "final `val/route_change`: share of a fixed validation batch's tokens whose top-1 expert changed "
                    "since the previous validation (route stability; lower is more stable)",
    "load max share": LEGEND["load max share"],
    "dead experts": LEGEND["dead experts"],
    "domain NMI": LEGEND["domain NMI"] + " (embedded corpus only)",
    "tokens/s": LEGEND["tokens/s"],
}


def find_runs(path: Path) -> list[Path]:
    """``path`` itself if it holds an event file, else every dir below it that does."""
    if any(path.glob(EVENT_GLOB)):
        return [path]
    return sorted({p.parent for p in path.rglob(EVENT_GLOB) if p.is_file()})


# config sections (under model.) whose values tell arms apart, and the keys that never do
SETTING_PARTS = ("router", "stats", "optim", "model")
SETTING_SKIP = {"stats.seed", "model.vocab_size"}


def load_run(run_dir: Path) -> dict:
    """One run: ``{"scalars": {tag: (steps, values)}, "config": {...}}``."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    scalars: dict[str, tuple[list[int], list[float]]] = {}
    # a resumed run can leave several event files in one dir: merge them by step
    for f in sorted(run_dir.glob(EVENT_GLOB)):
        acc = EventAccumulator(str(f), size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            merged = dict(zip(*scalars.get(tag, ([], []))))
            merged.update({e.step: e.value for e in acc.Scalars(tag)})
            steps = sorted(merged)
            scalars[tag] = (steps, [merged[s] for s in steps])

    config: dict = {}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        model = cfg.get("model") or {}
        router, stats = model.get("router") or {}, model.get("stats") or {}
        data, optim = cfg.get("data") or {}, model.get("optim") or {}
        per_step = [data.get("batch_size"), data.get("seq_len"), optim.get("accumulate_grad_batches") or 1]
        config = {"tokens_per_step": math.prod(per_step) if all(isinstance(x, int) for x in per_step) else None,
                  "router_loss": router.get("loss"), "stats_scope": stats.get("scope"),
                  "stats_engine": stats.get("engine"),
                  "settings": {f"{part}.{k}": v for part in SETTING_PARTS
                               for k, v in (model.get(part) or {}).items() if f"{part}.{k}" not in SETTING_SKIP}}
    return {"scalars": scalars, "config": config}


def mark_differences(runs: list[dict]) -> None:
    """Put into each run's config, as ``differs``, the settings (``SETTING_PARTS`` of
    ``model.*``) whose values are not the same in every run: what tells the arms apart."""
    settings = [r["config"].get("settings", {}) for r in runs]
    keys = sorted({k for s in settings for k in s})
    varying = [k for k in keys if len({repr(s.get(k)) for s in settings}) > 1]
    for run, s in zip(runs, settings):
        run["config"]["differs"] = " ".join(f"{k}={_short(s.get(k))}" for k in varying) or "—"


def _short(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _final(run: dict, tag: str) -> float | None:
    s = run["scalars"].get(tag)
    return s[1][-1] if s and s[1] else None


def _tail_mean(run: dict, tag: str, frac: float = 0.2) -> float | None:
    """Mean of the values logged in the last ``frac`` of the run's steps."""
    s = run["scalars"].get(tag)
    if not s or not s[1]:
        return None
    steps, values = s
    first, last = steps[0], steps[-1]
    cut = last - frac * (last - first)
    tail = [v for st, v in zip(steps, values) if st >= cut]
    return statistics.fmean(tail)


def _fmt(x: float | int | None, digits: int = 4) -> str:
    if x is None:
        return MISSING
    return str(x) if isinstance(x, int) else f"{x:.{digits}g}"


def _pair(a: float | None, b: float | None) -> str:
    if a is None and b is None:
        return MISSING
    return _fmt(a) if b is None else f"{_fmt(a)} / {_fmt(b)}"


def _metrics(run: dict) -> dict[str, float | None]:
    """The protocol's numbers of one run (None where not logged)."""
    sc = run["scalars"]
    nmis = [v for t in sc if NMI_TAG.match(t) and (v := _final(run, t)) is not None]
    tps = sc.get("throughput/tokens_per_s")
    return {
        "val loss": _final(run, "val/loss"),
        "val ppl": _final(run, "val/ppl"),
        "g_acc_dense": _final(run, "val/g_acc_dense"),
        "kl_div": _final(run, "val/kl_div"),
        "agreement": _final(run, "val/agreement"),
        "router entropy": _tail_mean(run, "routing/entropy"),
        "route change": _final(run, "val/route_change"),
        "load max share": _tail_mean(run, "routing/load_max_share"),
        "dead experts": _tail_mean(run, "routing/dead_experts"),
        "domain NMI": statistics.fmean(nmis) if nmis else None,
        "tokens/s": statistics.median(tps[1]) if tps and tps[1] else None,
    }


def table_row(name: str, run: dict) -> dict[str, str]:
    sc, cfg = run["scalars"], run["config"]
    train_steps = [s[0][-1] for t, s in sc.items() if t.startswith("train/") and s[0]]
    m = _metrics(run)
    peak = sc.get("memory/peak_mb")
    router = cfg.get("router_loss") or MISSING
    if cfg.get("stats_scope") or cfg.get("stats_engine"):
        router += f" ({cfg.get('stats_scope') or '?'}/{cfg.get('stats_engine') or '?'})"
    return {
        "run": name,
        "router loss": router,
        "settings": cfg.get("differs", MISSING),
        "steps": _fmt(max(train_steps) if train_steps else None),
        "val loss": _fmt(m["val loss"]),
        "val ppl": _fmt(m["val ppl"]),
        "g_acc_dense": _pair(_final(run, "train/g_acc_dense"), _final(run, "val/g_acc_dense")),
        "kl_div": _pair(_final(run, "train/kl_div"), _final(run, "val/kl_div")),
        "load max share": _fmt(m["load max share"]),
        "dead experts": _fmt(m["dead experts"], 3),
        "domain NMI": _fmt(m["domain NMI"]),
        "tokens/s": _fmt(round(m["tokens/s"]) if m["tokens/s"] is not None else None),
        "peak memory MB": _fmt(round(max(peak[1])) if peak and peak[1] else None),
    }


def _mean_std(values: list[float | None], n: int, fmt=lambda x: f"{x:.4g}") -> str:
    """Mean ± sample std over the runs that logged it; "(k of n)" when only k of n did."""
    xs = [v for v in values if v is not None]
    if not xs:
        return MISSING
    cell = fmt(statistics.fmean(xs))
    if len(xs) > 1:
        std = statistics.stdev(xs)
        cell += f" ± {fmt(std) if std >= 100 else f'{std:.2g}'}"
    if len(xs) < n:
        cell += f" ({len(xs)} of {n})"
    return cell


def group_row(name: str, runs: list[dict]) -> dict[str, str]:
    """One table row for the runs (seeds) of one arm."""
    per_run = [table_row(name, r) for r in runs]
    metrics = [_metrics(r) for r in runs]
    row = {"arm": name, "n": str(len(runs))}
    for col in ("router loss", "settings", "steps"):  # identical across seeds unless the arm is mixed up
        row[col] = ", ".join(dict.fromkeys(r[col] for r in per_run))
    for col in list(GROUP_LEGEND)[5:]:
        if col == "per run":
            row[col] = " ".join(_fmt(m["val loss"]) for m in metrics)
            continue
        fmt = (lambda x: f"{x:.0f}") if col == "tokens/s" else (lambda x: f"{x:.4g}")
        row[col] = _mean_std([m[col] for m in metrics], len(runs), fmt)
    return row


def markdown(rows: list[dict[str, str]], legend: dict[str, str] = LEGEND) -> str:
    cols = list(legend)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    lines += ["", f"{MISSING}: not logged by this run."]
    if legend is GROUP_LEGEND:
        lines += ["Cells are mean ± sample std over the arm's runs; \"(k of n)\": only k runs logged it."]
    lines += [""] + [f"- **{c}**: {what}" for c, what in legend.items()]
    return "\n".join(lines) + "\n"


def _curve(runs: list[dict], tag: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std of ``tag`` over the runs, at the steps every run logged it."""
    series = [dict(zip(*r["scalars"][tag])) for r in runs if r["scalars"].get(tag)]
    if not series:
        return [], [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    vals = [[s[st] for s in series] for st in steps]
    return steps, [statistics.fmean(v) for v in vals], [statistics.pstdev(v) for v in vals]


def figure(groups: list[tuple[str, list[dict]]], path: Path) -> list[str]:
    """One curve per group (its mean, with a ± std band when it has several runs); returns
    the tags that had data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOT_TAGS), figsize=(5 * len(PLOT_TAGS), 4))
    plotted = []
    for ax, (tag, title) in zip(axes, PLOT_TAGS.items()):
        for name, runs in groups:
            steps, mean, std = _curve(runs, tag)
            if not steps:
                continue
            label = name if len(runs) == 1 else f"{name} (n={len(runs)})"
            line, = ax.plot(steps, mean, marker="." if len(steps) < 30 else None, label=label)
            if len(runs) > 1:
                ax.fill_between(steps, [m - d for m, d in zip(mean, std)],
                                [m + d for m, d in zip(mean, std)], color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
            plotted.append(tag)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return plotted


_fail = partial(exit_with_error, "smk-report")  # bad input: one line, exit status 2


def write_report(named: list[tuple[str, Path]], out: Path, group: bool = False) -> str:
    """Write ``out/report.md`` and ``out/report.png`` for ``(name, run dir)`` pairs; runs
    sharing a name (or all, with ``group``) become one mean ± std row. Returns the markdown."""
    names = list(dict.fromkeys(n for n, _ in named))
    by_name = {n: [load_run(r) for m, r in named if m == n] for n in names}
    mark_differences([r for rs in by_name.values() for r in rs])
    groups = list(by_name.items())
    if group or any(len(rs) > 1 for _, rs in groups):
        md = markdown([group_row(n, rs) for n, rs in groups], GROUP_LEGEND)
    else:
        md = markdown([table_row(n, rs[0]) for n, rs in groups])
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(md)
    figure(groups, out / "report.png")
    return md


def _count(n: int) -> str:
    """``1.23 M``, ``640 k``, ``320``."""
    return f"{n / 1e6:.3g} M" if n >= 1e6 else f"{n / 1e3:.3g} k" if n >= 1e3 else str(n)


def _budget_cell(losses: list[float]) -> str:
    return f"{_mean_std(losses, len(losses))} (n={len(losses)})" if losses else MISSING


def write_budget(named: list[tuple[str, Path]], out: Path) -> str:
    """``out/budget.md`` and ``out/budget.png``: each arm's final ``val/loss`` against the
    tokens its runs trained on (last training step × tokens per optimizer step; one process),
    for runs of the same arms at several budgets. Returns the markdown."""
    points: dict[str, dict[int, list[float]]] = {}
    for name, run_dir in named:
        run = load_run(run_dir)
        loss, per_step = _final(run, "val/loss"), run["config"].get("tokens_per_step")
        steps = [s[0][-1] for tag, s in run["scalars"].items() if tag.startswith("train/") and s[0]]
        if loss is None or per_step is None or not steps:
            _fail(f"{run_dir}: no final val/loss, training step or data.batch_size/seq_len in config.yaml; "
                  "pass runs written by smk fit")
        points.setdefault(name, {}).setdefault(max(steps) * per_step, []).append(loss)
    budgets = sorted({b for by_budget in points.values() for b in by_budget})
    lines = ["| arm | " + " | ".join(f"{_count(b)} tokens" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for name, by_budget in points.items():
        lines.append(f"| {name} | " + " | ".join(_budget_cell(by_budget.get(b, [])) for b in budgets) + " |")
    md = "\n".join(lines + ["", "Final `val/loss` (mean ± sample std over the n runs at that budget; "
                                 f"{MISSING}: no run)."]) + "\n"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_budget in points.items():
        xs = sorted(by_budget)
        ax.errorbar([x / 1e6 for x in xs], [statistics.fmean(by_budget[x]) for x in xs],
                    yerr=[statistics.stdev(by_budget[x]) if len(by_budget[x]) > 1 else 0 for x in xs],
                    marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("final val/loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "budget.png", dpi=120)
    plt.close(fig)
    (out / "budget.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="smk-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=Path,
                        help="Lightning version dir (e.g. lightning_logs/default/version_3) or a parent of several")
    parser.add_argument("--out", type=Path, default=Path("."), help="output dir (default: .)")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="one display name per run found, or one per RUN_DIR for every run below it; "
                             "runs sharing a name are one mean ± std row (default: parent/name of each run dir, "
                             "with more of its path where two runs would share it)")
    parser.add_argument("--budget", action="store_true",
                        help="the RUN_DIRs hold the same arms trained for different numbers of steps (e.g. one "
                             "smk-sweep --out per --steps): write budget.md / budget.png, each arm's final val/loss "
                             "against its training tokens; runs are named by their parent dir (the arm) unless "
                             "--names says otherwise")
    parser.add_argument("--group", action="store_true",
                        help="one mean ± std row per name even for single runs; without --names, runs are "
                             "grouped by their parent dir (e.g. sweep/runs/<arm>/seed<k> by arm)")
    args = parser.parse_args(argv)

    found: list[tuple[int, Path]] = []  # (index of the RUN_DIR it came from, run dir)
    for i, d in enumerate(args.run_dirs):
        if not d.is_dir():
            _fail(f"{d}: no such directory; pass a Lightning run dir such as lightning_logs/default/version_0")
        runs_here = find_runs(d)
        if not runs_here:
            _fail(f"{d}: no {EVENT_GLOB} file in it or below it; "
                         "pass a Lightning run dir such as lightning_logs/default/version_0")
        found += [(i, r) for r in runs_here if r not in {f for _, f in found}]
    if args.names and len(args.names) == len(found):
        names = args.names
    elif args.names and len(args.names) == len(args.run_dirs):
        names = [args.names[i] for i, _ in found]
    elif args.names:
        _fail(f"--names got {len(args.names)} names for {len(found)} runs in {len(args.run_dirs)} RUN_DIRs "
              f"({', '.join(str(r) for _, r in found)}); pass one name per run or one per RUN_DIR")
    elif args.group or args.budget:
        names = [r.parent.name for _, r in found]
    else:
        names = distinct_names([r for _, r in found])

    if args.budget:
        write_budget(list(zip(names, (r for _, r in found))), args.out)
        print(f"wrote {args.out / 'budget.md'} and {args.out / 'budget.png'} ({len(found)} runs, {len(set(names))} arms)")
        return
    write_report(list(zip(names, (r for _, r in found))), args.out, args.group)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'report.png'} "
          f"({len(found)} runs, {len(set(names))} rows)")


def distinct_names(runs: list[Path]) -> list[str]:
    """``parent/name`` of each run dir, with as many more parent dirs as it takes for no two
    runs to share a name (two runs' ``smk/version_0`` would otherwise be averaged as one arm)."""
    parts = [r.resolve().parts for r in runs]
    for k in range(2, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return ["/".join(p) for p in parts]


if __name__ == "__main__":
    main()
