"""``smk-report``: compare finished runs from their TensorBoard event files.

    smk-report lightning_logs/smk/version_3 lightning_logs/switch --out reports/ --names smk switch

Each RUN_DIR is a Lightning version dir (``events.out.tfevents.*``, ``config.yaml``,
``hparams.yaml``) or a parent of such dirs (every version dir below it with an event file
is a run). Writes ``report.md`` (one table row per run, plus a legend) and ``report.png``
(val/loss, train/g_acc and train/kl_div against step) into ``--out``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import yaml

EVENT_GLOB = "events.out.tfevents.*"
MISSING = "—"
NMI_TAG = re.compile(r"^routing/[^/]+/domain_nmi$")
PLOT_TAGS = ("val/loss", "train/g_acc", "train/kl_div")

# column header → what it is (and the tag it comes from), for the legend under the table
LEGEND = {
    "run": "run name (--names, else the run dir's parent/name)",
    "router loss": "`model.router.loss` (stats `model.stats.scope` / `model.stats.engine`) from config.yaml",
    "steps": "last training step logged (largest step of any `train/*` tag)",
    "val loss": "final `val/loss`",
    "val ppl": "final `val/ppl`",
    "g_acc": "final `train/g_acc` (/ final `val/g_acc` when logged)",
    "kl_div": "final `train/kl_div` (/ final `val/kl_div` when logged)",
    "load max share": "mean of `routing/load_max_share` over the last 20% of steps",
    "dead experts": "mean of `routing/dead_experts` over the last 20% of steps",
    "domain NMI": "mean over layers of the final `routing/<layer>/domain_nmi`",
    "tokens/s": "median of `throughput/tokens_per_s` over the run",
    "peak memory MB": "max of `memory/peak_mb`",
}


def find_runs(path: Path) -> list[Path]:
    """``path`` itself if it holds an event file, else every dir below it that does."""
    if any(path.glob(EVENT_GLOB)):
        return [path]
    return sorted({p.parent for p in path.rglob(EVENT_GLOB) if p.is_file()})


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
        config = {"router_loss": router.get("loss"), "stats_scope": stats.get("scope"),
                  "stats_engine": stats.get("engine")}
    return {"scalars": scalars, "config": config}


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


def table_row(name: str, run: dict) -> dict[str, str]:
    sc, cfg = run["scalars"], run["config"]
    train_steps = [s[0][-1] for t, s in sc.items() if t.startswith("train/") and s[0]]
    nmis = [v for t in sc if NMI_TAG.match(t) and (v := _final(run, t)) is not None]
    tps = sc.get("throughput/tokens_per_s")
    peak = sc.get("memory/peak_mb")
    router = cfg.get("router_loss") or MISSING
    if cfg.get("stats_scope") or cfg.get("stats_engine"):
        router += f" ({cfg.get('stats_scope') or '?'}/{cfg.get('stats_engine') or '?'})"
    return {
        "run": name,
        "router loss": router,
        "steps": _fmt(max(train_steps) if train_steps else None),
        "val loss": _fmt(_final(run, "val/loss")),
        "val ppl": _fmt(_final(run, "val/ppl")),
        "g_acc": _pair(_final(run, "train/g_acc"), _final(run, "val/g_acc")),
        "kl_div": _pair(_final(run, "train/kl_div"), _final(run, "val/kl_div")),
        "load max share": _fmt(_tail_mean(run, "routing/load_max_share")),
        "dead experts": _fmt(_tail_mean(run, "routing/dead_experts"), 3),
        "domain NMI": _fmt(statistics.fmean(nmis) if nmis else None),
        "tokens/s": _fmt(round(statistics.median(tps[1])) if tps and tps[1] else None),
        "peak memory MB": _fmt(round(max(peak[1])) if peak and peak[1] else None),
    }


def markdown(rows: list[dict[str, str]]) -> str:
    cols = list(LEGEND)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    lines += ["", f"{MISSING}: not logged by this run.", ""]
    lines += [f"- **{c}**: {what}" for c, what in LEGEND.items()]
    return "\n".join(lines) + "\n"


def figure(runs: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOT_TAGS), figsize=(5 * len(PLOT_TAGS), 4))
    for ax, tag in zip(axes, PLOT_TAGS):
        for name, run in runs:
            s = run["scalars"].get(tag)
            if s and s[0]:
                ax.plot(s[0], s[1], marker="." if len(s[0]) < 30 else None, label=name)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fail(msg: str) -> None:
    """Bad input: one line on stderr, exit status 2 (as argparse does), no traceback."""
    print(f"smk-report: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="smk-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=Path,
                        help="Lightning version dir (e.g. lightning_logs/smk/version_3) or a parent of several")
    parser.add_argument("--out", type=Path, default=Path("."), help="output dir (default: .)")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="one display name per run found (default: parent/name of each run dir)")
    args = parser.parse_args(argv)

    found: list[Path] = []
    for d in args.run_dirs:
        if not d.is_dir():
            _fail(f"{d}: no such directory; pass a Lightning run dir such as lightning_logs/smk/version_0")
        runs_here = find_runs(d)
        if not runs_here:
            _fail(f"{d}: no {EVENT_GLOB} file in it or below it; "
                         "pass a Lightning run dir such as lightning_logs/smk/version_0")
        found += [r for r in runs_here if r not in found]
    if args.names and len(args.names) != len(found):
        _fail(f"--names got {len(args.names)} names for {len(found)} runs "
                     f"({', '.join(map(str, found))}); pass one name per run")
    names = args.names or [f"{r.parent.name}/{r.name}" for r in found]

    runs = [(n, load_run(r)) for n, r in zip(names, found)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(markdown([table_row(n, r) for n, r in runs]))
    figure(runs, args.out / "report.png")
    print(f"wrote {args.out / 'report.md'} and {args.out / 'report.png'} ({len(runs)} runs)")


if __name__ == "__main__":
    main()
