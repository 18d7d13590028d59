"""``smk-sweep``: run ``smk fit`` for every config × seed, then report mean ± std per arm.

    smk-sweep configs/experiments/*.yaml --base configs/default.yaml --seeds 3 --out sweeps/embedded

Each run is its own process (``python -m smk_lightning.cli fit``), ``--jobs`` at a time,
seeded with ``--seed_everything k --model.stats.seed k`` for k = 0 … seeds-1 (the data
and its order stay the same across seeds), logged to ``OUT/runs/<arm>/seed<k>/``. Then
``OUT/report.md`` and ``OUT/report.png`` compare the arms (``smk-report``'s grouped mode).

Resumable: a run that finished is marked done in its ``sweep.json`` and skipped; an
interrupted one resumes from its ``checkpoints/last.ckpt``, or starts again if it has
none. A run dir made by a different command (other configs, overrides or steps) is an
error rather than silently reused: pick another ``--out`` or delete that dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

from smk_lightning.errors import exit_with_error

STATE = "sweep.json"  # per run: the command it was made with and whether it finished
LOG = "fit.log"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


_fail = partial(exit_with_error, "smk-sweep")  # bad input: one line, exit status 2


def parse_sets(sets: list[str], names: list[str]) -> dict[str, list[str]]:
    """``[ARM:]key=value`` → ``{arm: ["--key", "value", ...]}``; without ``ARM:`` for every arm."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for item in sets:
        key, eq, value = item.partition("=")
        arm, colon, key = key.rpartition(":")
        key = key.strip().removeprefix("--")
        if not eq or not key:
            _fail(f"--set {item!r}: expected key=value or ARM:key=value, e.g. trainer.max_steps=200")
        if colon and arm not in out:
            _fail(f"--set {item!r}: no arm named {arm!r} (arms: {', '.join(names)})")
        for n in [arm] if colon else names:
            out[n] += [f"--{key}", value]
    return out


MIN_VALIDATIONS = 5  # a curve needs points: --steps validates at least this often


def val_interval(steps: int) -> int:
    """The largest divisor of ``steps`` that validates at least ``MIN_VALIDATIONS`` times (a
    divisor, so the last validation is at the last step)."""
    return max((d for d in range(1, steps // MIN_VALIDATIONS + 1) if steps % d == 0), default=1)


def fit_command(configs: list[Path], seed: int, runs: Path, name: str, extra: list[str]) -> list[str]:
    """The ``smk fit`` arguments of one run (without the interpreter and --ckpt_path)."""
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    args += ["--seed_everything", str(seed), "--model.stats.seed", str(seed),
             "--trainer.logger.init_args.save_dir", str(runs),
             "--trainer.logger.init_args.name", name,
             "--trainer.logger.init_args.version", f"seed{seed}",
             # a progress bar in a log file is one line per step
             "--trainer.enable_progress_bar", "false"]
    return args + extra


def plan(run_dir: Path, command: list[str]) -> str:
    """What to do with a run dir: "skip" (finished), "resume" (interrupted, has last.ckpt),
    "fresh" (absent, or interrupted before its first checkpoint), or "conflict" (made by a
    different command, or not by smk-sweep: never deleted or mixed in)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "fresh"
    try:
        state = json.loads((run_dir / STATE).read_text())
    except (OSError, ValueError):
        return "conflict"
    if state.get("command") != command:
        return "conflict"
    if state.get("done"):
        return "skip"
    return "resume" if (run_dir / "checkpoints" / "last.ckpt").is_file() else "fresh"


def _write_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(run_dir / STATE)  # never a half-written state after a crash


def _last_error(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    errs = [x for x in lines if x.startswith("smk: error:") or "Error" in x]
    return (errs or lines or ["(empty log)"])[-1][:300]


@dataclass
class Run:
    """One run of the sweep; ``proc`` and ``log`` while it is running."""

    name: str
    seed: int
    command: list[str]
    run_dir: Path
    action: str  # plan()'s answer
    head: str = ""  # "[i/n] arm seed k:" of the sweep's progress lines
    proc: subprocess.Popen | None = None
    log: IO | None = None
    t0: float = 0.0

    def start(self, env: dict[str, str] | None) -> None:
        """Launch (or resume) the run's ``smk fit`` in the background."""
        if self.action == "fresh" and self.run_dir.exists():
            shutil.rmtree(self.run_dir)  # a partial run without checkpoint: its events would mix in
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_state(self.run_dir, {"command": self.command, "done": False})
        argv = [sys.executable, "-m", "smk_lightning.cli", *self.command]
        if self.action == "resume":
            argv += ["--ckpt_path", str(self.run_dir / "checkpoints" / "last.ckpt")]
        self.log = open(self.run_dir / LOG, "a")  # noqa: SIM115 (closed in finish())
        self.log.write(f"$ {' '.join(argv)}\n")
        self.log.flush()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def finish(self) -> str | None:
        """After the process ended: mark the run done, or return its error line."""
        self.log.close()
        rc = self.proc.returncode
        if rc != 0:
            # smk's own bad-input status stays 2; anything else is a failed run
            return f"{self.run_dir} failed (exit {rc}): {_last_error(self.run_dir / LOG)} (log: {self.run_dir / LOG})"
        seconds = time.perf_counter() - self.t0
        _write_state(self.run_dir, {"command": self.command, "done": True, "seconds": round(seconds, 1)})
        return None


def thread_env(jobs: int) -> dict[str, str] | None:
    """The environment of each run when ``jobs`` run side by side: an equal share of the CPU
    cores as torch's threads (``OMP_NUM_THREADS``), unless the caller set it; None (inherit
    everything) for one job at a time."""
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def run_all(runs: list[Run], jobs: int, poll_s: float = 0.5) -> None:
    """Run every run not yet done, ``jobs`` at a time. A failed run stops new starts; the
    others finish (so their state is written), then the sweep fails with the first error.
    Ctrl-C reaches the runs too: each saves its last.ckpt, and the sweep waits for them."""
    env = thread_env(jobs)
    todo = [r for r in runs if r.action != "skip"]
    for i, r in enumerate(runs, 1):
        r.head = f"[{i}/{len(runs)}] {r.name} seed {r.seed}:"
        if r.action == "skip":
            print(f"{r.head} done before, skipped", flush=True)
    running: list[Run] = []
    error = None
    try:
        while (todo and error is None) or running:
            while todo and error is None and len(running) < jobs:
                r = todo.pop(0)
                print(f"{r.head} {'resuming' if r.action == 'resume' else 'running'} (log: {r.run_dir / LOG})",
                      flush=True)
                r.start(env)
                running.append(r)
            time.sleep(poll_s)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                err = r.finish()
                if err is None:
                    print(f"{r.head} finished in {time.perf_counter() - r.t0:.0f} s", flush=True)
                elif error is None:
                    error = (err, 2 if r.proc.returncode == 2 else 1)
    except KeyboardInterrupt:
        # the runs got the same Ctrl-C: give each time to save last.ckpt
        for r in running:
            try:
                r.proc.wait(timeout=300)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                r.proc.kill()
                r.proc.wait()
        _fail(f"interrupted during {', '.join(str(r.run_dir) for r in running)}; "
              "run the same command again to resume", 130)
    if error is not None:
        _fail(f"{error[0]}; fix it and run the same command again to resume", error[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="smk-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", metavar="CONFIG", type=Path,
                        help="one YAML per arm (the same file may be given twice with different --set)")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="one name per CONFIG (default: each config's file name without .yaml)")
    parser.add_argument("--base", action="append", metavar="BASE", type=Path, default=[],
                        help="config passed before every arm's CONFIG, e.g. configs/default.yaml (repeatable)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm (default: 3)")
    parser.add_argument("--out", type=Path, required=True, help="sweep dir: runs/, report.md, report.png")
    parser.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="[ARM:]KEY=VALUE",
                        help="pass --KEY VALUE to every run, or with ARM: to that arm's runs only")
    parser.add_argument("--steps", type=int,
                        help="trainer.max_steps of every run; it also validates every largest divisor of the steps "
                             f"that gives at least {MIN_VALIDATIONS} validations (a curve), unless --set "
                             "trainer.val_check_interval=N says otherwise")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs side by side (default: 1); on the CPU each gets an equal share of the cores "
                             "as its threads (OMP_NUM_THREADS, unless you set it); on a GPU they share the GPU")
    parser.error = _fail  # one line, not the usage block
    args = parser.parse_args(argv)

    names = args.names or [c.stem for c in args.configs]
    if len(names) != len(args.configs):
        _fail(f"--names got {len(names)} names for {len(args.configs)} configs; pass one name per CONFIG")
    if len(set(names)) != len(names):
        _fail(f"arm names must differ (got {' '.join(names)}); pass --names")
    bad = [n for n in names if not NAME.match(n)]
    if bad:
        _fail(f"arm name {bad[0]!r} is not a plain file name; use letters, digits, '_', '-', '.'")
    for c in [*args.base, *args.configs]:
        if not c.is_file():
            _fail(f"{c}: no such config file")
    if args.seeds < 1:
        _fail(f"--seeds={args.seeds} must be >= 1")
    if args.jobs < 1:
        _fail(f"--jobs={args.jobs} must be >= 1")
    if args.steps is not None and args.steps < 1:
        _fail(f"--steps={args.steps} must be >= 1")
    sets = parse_sets(args.sets, names)

    runs_dir = (args.out / "runs").resolve()
    steps = ["--trainer.max_steps", str(args.steps)] if args.steps else []
    if args.steps and not any(s.removeprefix("--").split("=")[0].endswith("val_check_interval")
                              for s in args.sets):
        steps += ["--trainer.val_check_interval", str(val_interval(args.steps))]
    runs: list[Run] = []
    for name, cfg in zip(names, args.configs):
        configs = [p.resolve() for p in [*args.base, cfg]]
        for seed in range(args.seeds):
            cmd = fit_command(configs, seed, runs_dir, name, sets[name] + steps)
            run_dir = runs_dir / name / f"seed{seed}"
            runs.append(Run(name, seed, cmd, run_dir, plan(run_dir, cmd)))
    conflicts = [r.run_dir for r in runs if r.action == "conflict"]
    if conflicts:
        _fail(f"{conflicts[0]} was made by a different command (configs, --set or --steps changed) "
              "or not by smk-sweep; use another --out or delete that run dir")

    run_all(runs, args.jobs)

    from smk_lightning.tools.report import write_report

    write_report([(r.name, r.run_dir) for r in runs], args.out, group=True)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'report.png'} "
          f"({len(names)} arms × {args.seeds} seeds)")


if __name__ == "__main__":
    main()
