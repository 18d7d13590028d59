"""``smk-bench``: the same training step with and without statistics, side by side in one
process, as ratios to the plain step (BENCHMARKS.md targets).

    smk-bench --config configs/default.yaml --steps 5 --json bench.json
    smk-bench --config configs/default.yaml --compile     # eager plain beside the compiled variants

Each variant trains ``warmup + steps`` steps of the real ``SMKModule.training_step``
(Lightning manual optimisation) on random tokens of the config's shape; the median
step time after warm-up is reported, with tokens/s; variants are interleaved over ``--rounds`` so slow
drifts of a shared machine hit all of them alike, and the ratio's spread is given as the
quartiles of the per-round ratios (each round's median against plain's in the same round). Peak memory: CUDA peak allocated on
GPU; on CPU the peak growth of the heap in use (glibc ``mallinfo2``, sampled every 2 ms):
the step's working set (activations, gradients, statistics), without the weights and
optimizer state. Memory is measured on two extra steps after the timed rounds, so the
sampler never runs beside a timed step.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import psutil
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from smk_lightning.cli.allocator import keep_freed_memory
from smk_lightning.cli.trainer_options import check_precision
from smk_lightning.errors import ConfigError
from smk_lightning.model import ModelConfig, MoELayer, MoETransformer
from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
from smk_lightning.training.module import SMKModule


@dataclass(frozen=True)
class Variant:
    """One timed training step: which statistics, which router, which model."""

    engine: str | None = None  # statistics engine (None: no statistics)
    scope: str = "routed"
    probe_fraction: float = 0.25
    router: str = "smk"  # with statistics: "smk" (smk_loss, no balance term) or "switch" (instruments only)
    dense_only: bool = False
    expert_impl: str | None = None  # override of the config's
    compiled: bool = False


_EAGER = {
    "plain": Variant(),
    "plain_loop": Variant(expert_impl="loop"),  # experts one matmul each, not grouped GEMMs
    "ghost_routed": Variant("ghost", "routed"),
    "ghost_dense": Variant("ghost", "dense"),
    "ghost_probe25": Variant("ghost", "probe"),
    # as `smk fit` runs the default Switch router with the statistics as instruments, every step
    "switch_probe25": Variant("ghost", "probe", router="switch"),
    "vmap_routed": Variant("vmap", "routed"),
    "vmap_dense": Variant("vmap", "dense"),
    "dense_ffn": Variant(dense_only=True),
}
# The same with model.compile: true (the forward, the ghost statistics and the targets and
# smk_loss compiled; the vmap and loop variants are not).
COMPILED = ("plain", "ghost_routed", "ghost_dense", "ghost_probe25", "switch_probe25", "dense_ffn")
VARIANTS = {**_EAGER, **{f"{name}_compiled": replace(_EAGER[name], compiled=True) for name in COMPILED}}


class StepTimer(L.Callback):
    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._t = device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_reader():
    """Bytes the C allocator has handed out and not taken back (glibc ``mallinfo2``), or,
    where that is missing, the process RSS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.mallinfo2()
    except (OSError, AttributeError):
        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    return lambda: (lambda m: m.uordblks + m.hblkhd)(libc.mallinfo2())


class HeapPeak:
    """Peak growth of the CPU heap in use while active (sampling thread, every 2 ms): the
    CPU counterpart of CUDA's peak allocated, counted from what was allocated before."""

    def __enter__(self):
        self._stop, read = False, _heap_reader()
        self.start = self.peak = read()

        def run():
            while not self._stop:
                self.peak = max(self.peak, read())
                time.sleep(0.002)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def load_shape(config: Path) -> tuple[ModelConfig, OptimConfig, int, int, str, int]:
    """(model config, optim config, seq_len, batch_size, precision, vmap_chunk) from a YAML config."""
    cfg = yaml.safe_load(config.read_text()) or {}
    m, d, t = cfg.get("model", {}) or {}, cfg.get("data", {}) or {}, cfg.get("trainer", {}) or {}
    model_kw = dict(m.get("model", {}) or {})
    if "vocab_size" in d:
        model_kw["vocab_size"] = d["vocab_size"]
    stats_kw = m.get("stats", {}) or {}
    return (ModelConfig(**model_kw), OptimConfig(**(m.get("optim", {}) or {})), int(d.get("seq_len", 128)),
            int(d.get("batch_size", 16)), str(t.get("precision", "32-true")),
            int(stats_kw.get("vmap_chunk_size", StatsConfig.vmap_chunk_size)))


# Dense bf16 tensor-core peak (TFLOP/s, without sparsity) of the GPUs we measure on, for the
# MFU estimate; elsewhere pass --peak-tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token (PaLM's MFU convention): 6 × the parameters a token
    passes through (an MoE layer's experts count top_k/E; the token embedding is a lookup,
    so only its use as the tied head counts) + 12 × layers × d_model × seq_len (attention)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    experts = {id(w): m.top_k / m.num_experts for m in moe for w in (*m.in_weights(), m.w2)}
    # named_parameters lists a tied embedding/head weight once: it counts as the head
    active = sum(p.numel() * experts.get(id(p), 1.0) for p in model.parameters())
    if not cfg.tie_embeddings:
        active -= model.embed.weight.numel()  # the untied embedding is only a lookup
    return 6 * active + 12 * cfg.n_layers * cfg.d_model * seq_len


def random_batches(n: int, batch_size: int, seq_len: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (n * batch_size, seq_len + 1), generator=g)
    return [{"input_ids": r[:-1], "targets": r[1:], "domain": torch.zeros(seq_len, dtype=torch.long)} for r in data]


def build_module(name: str, model_cfg: ModelConfig, optim: OptimConfig, vmap_chunk: int) -> SMKModule:
    v = VARIANTS[name]
    if v.expert_impl is not None:
        model_cfg = replace(model_cfg, expert_impl=v.expert_impl)
    if v.compiled:
        model_cfg = replace(model_cfg, compile=True)
    stats = StatsConfig(enabled=v.engine is not None, engine=v.engine or "ghost", scope=v.scope,
                        probe_fraction=v.probe_fraction, val_batches=0, vmap_chunk_size=vmap_chunk)
    # With statistics: smk_loss without the balance term (which needs no statistics), so the
    # ratio to plain is the cost of the statistics and smk_loss alone; or the Switch router
    # (the statistics as instruments). Without: no router loss.
    if v.engine is None:
        router = RouterConfig(loss="none")
    elif v.router == "switch":
        router = RouterConfig(loss="switch")
    else:
        router = RouterConfig(loss="smk", balance_weight=0.0)
    torch.manual_seed(0)
    return SMKModule(model=model_cfg, optim=replace(optim, warmup_steps=1), stats=stats, router=router,
                     dense_only=v.dense_only)


def fit_steps(module: SMKModule, batches: list[dict], batch_size: int, precision: str, device: torch.device,
              callbacks: list) -> None:
    """Train ``module`` for ``len(batches) // batch_size`` steps with a fresh Trainer."""
    trainer = L.Trainer(max_steps=len(batches) // batch_size, accelerator=device.type, devices=1,
                        precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=batch_size))


def time_steps(module: SMKModule, batches: list[dict], batch_size: int, precision: str, warmup: int,
               device: torch.device) -> list[float]:
    """Seconds per step after warm-up (nothing else runs beside the steps)."""
    timer = StepTimer(device)
    fit_steps(module, batches, batch_size, precision, device, [timer])
    return timer.times[warmup:]


def peak_memory_mb(module: SMKModule, batches: list[dict], batch_size: int, precision: str,
                   device: torch.device) -> float:
    """Peak memory of two more steps, measured apart from the timed ones (the CPU heap
    sampler takes the allocator's lock, which would slow the steps it watches)."""
    batches = batches[: 2 * batch_size]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fit_steps(module, batches, batch_size, precision, device, [])
        return torch.cuda.max_memory_allocated(device) / 2**20
    with HeapPeak() as heap:
        fit_steps(module, batches, batch_size, precision, device, [])
    return (heap.peak - heap.start) / 2**20


class _CountOps(TorchDispatchMode):
    def __init__(self, counts: list[int]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[-1] += 1
        return func(*args, **(kwargs or {}))


class OpCounter(L.Callback):
    """Aten ops dispatched in each training batch (views included): a launch-bound GPU step
    pays about the same per op, whatever its size."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self._on: ExitStack | None = None

    def on_train_batch_start(self, *args) -> None:
        self.counts.append(0)
        self._on = ExitStack()
        self._on.enter_context(_CountOps(self.counts))

    def on_train_batch_end(self, *args) -> None:
        self._on.close()


def ops_per_step(module: SMKModule, batches: list[dict], batch_size: int, precision: str,
                 device: torch.device) -> int:
    """Ops dispatched by the second of two more training steps (the first may set up state)."""
    counter = OpCounter()
    fit_steps(module, batches[: 2 * batch_size], batch_size, precision, device, [counter])
    return counter.counts[-1]


def _quartiles(xs: list[float]) -> tuple[float, float]:
    """(first, third) quartile; both the value itself for a single round."""
    if len(xs) < 2:
        return (xs[0], xs[0])
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return (q[0], q[2])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="smk-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/default.yaml"), help="YAML config whose model and data shape to time")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleave the variants this many times (vmap variants run once: they are slow)")
    ap.add_argument("--variants", nargs="+", default=list(_EAGER), choices=list(VARIANTS),
                    help="variants to run (default: the eager ones)")
    ap.add_argument("--compile", action="store_true",
                    help="run plain and the compiled variants (model.compile: true) instead of the default set; "
                         "ratios are then also given against plain_compiled")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--precision", default=None, help="override the config's trainer.precision")
    ap.add_argument("--batch-size", type=int, default=None, help="override the config's data.batch_size")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak FLOP/s of the device in TFLOP/s for the MFU column (default: known for "
                         "H100/H200/A100 in bf16; none on CPU)")
    ap.add_argument("--count-ops", action="store_true",
                    help="also count the aten ops each variant's training step dispatches (one extra step, "
                         "the GPU's code path): what a launch-bound GPU step pays for")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice); 1 on a loaded machine, where a "
                         "descheduled second thread stalls every op")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as `smk` runs: the variants' steps are timed as training runs them
    if not args.config.is_file():
        ap.error(f"--config {args.config} does not exist; pass a YAML from configs/")
    for flag, value, least in (("--steps", args.steps, 1), ("--rounds", args.rounds, 1), ("--warmup", args.warmup, 0),
                               ("--batch-size", args.batch_size, 1), ("--threads", args.threads, 1)):
        if value is not None and value < least:
            ap.error(f"{flag} {value} must be >= {least}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    device = torch.device(dev)
    model_cfg, optim, seq_len, batch_size, precision, vmap_chunk = load_shape(args.config)
    if args.batch_size is not None:
        batch_size = args.batch_size
    if args.precision is not None:
        precision = args.precision  # as asked, also bf16 on the CPU
    elif device.type == "cpu" and "bf16" in str(precision):  # a GPU config on the CPU: float32, as before
        precision = "32-true"
    try:
        check_precision(precision, device.type)  # what smk refuses, refused here too, in one line
    except ConfigError as e:
        ap.error(str(e).replace("--trainer.precision", "--precision").replace("trainer.precision", "--precision"))
    if args.compile:
        args.variants = ["plain", *(f"{name}_compiled" for name in COMPILED)]
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")
    import logging

    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # every short fit would print its banner
    try:
        batches = random_batches(args.warmup + args.steps, batch_size, seq_len, model_cfg.vocab_size)
        modules = {name: build_module(name, model_cfg, optim, vmap_chunk) for name in args.variants}
        times: dict[str, list[float]] = {name: [] for name in args.variants}
        round_s: dict[str, list[float]] = {name: [] for name in args.variants}  # median per round
        for r in range(args.rounds):
            for name in args.variants:
                if name.startswith("vmap") and r > 0:
                    continue
                ts = time_steps(modules[name], batches, batch_size, precision, args.warmup, device)
                times[name] += ts
                round_s[name].append(statistics.median(ts))
                print(f"  round {r + 1}/{args.rounds} {name:22s} {statistics.median(ts) * 1e3:9.1f} ms/step", flush=True)
        # After the timed rounds: the optimizer state exists, so on CPU the heap growth is the
        # step's working set (activations, gradients, statistics).
        peaks = {name: peak_memory_mb(modules[name], batches, batch_size, precision, device) for name in args.variants}
        # not for compiled variants: the counting mode would itself make dynamo compile anew
        ops = {name: ops_per_step(modules[name], batches, batch_size, precision, device)
               if args.count_ops and not VARIANTS[name].compiled else None for name in args.variants}
        tokens = batch_size * seq_len
        results = {name: {"step_s": statistics.median(times[name]), "tokens_per_s": tokens / statistics.median(times[name]),
                          "peak_mb": peaks[name], "ops_per_step": ops[name]} for name in args.variants}
        base = results["plain"]["step_s"]
        results["ratios"] = {k: v["step_s"] / base for k, v in results.items() if k != "ratios"}
        if "plain_compiled" in results:
            base_c = results["plain_compiled"]["step_s"]
            results["ratios_compiled"] = {k: v["step_s"] / base_c for k, v in results.items()
                                          if k.endswith("_compiled")}
        # The spread of the ratio: each round's ratio to plain's time in the same round (a
        # pair measured minutes apart at most), as quartiles over the rounds.
        for name in args.variants:
            paired = [t / b for t, b in zip(round_s[name], round_s["plain"])]
            results[name]["ratio_rounds"] = paired
            results[name]["ratio_iqr"] = _quartiles(paired)
            if "plain_compiled" in results and name.endswith("_compiled"):
                paired = [t / b for t, b in zip(round_s[name], round_s["plain_compiled"])]
                results[name]["ratio_compiled_iqr"] = _quartiles(paired)
        n_params = sum(p.numel() for p in SMKModule(model=model_cfg).parameters())
        peak = args.peak_tflops
        if peak is None and device.type == "cuda" and "bf16" in precision:
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        # MFU of every variant against the plain step's model FLOPs (what the model computes;
        # statistics are overhead), so it falls as the ratio to plain rises.
        flops = train_flops_per_token(model_cfg, seq_len) * tokens
        for name in args.variants:
            results[name]["mfu"] = flops / results[name]["step_s"] / (peak * 1e12) if peak else None
        results["meta"] = {"config": str(args.config), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
                           "precision": precision, "batch_size": batch_size, "seq_len": seq_len, "params": n_params,
                           "expert_impl": model_cfg.expert_impl,
                           "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
                           "train_flops_per_token": flops / tokens, "peak_tflops": peak}
        print(f"\n{args.config} on {results['meta']['device']}, {precision}, batch {batch_size}×{seq_len}, "
              f"{n_params / 1e6:.1f} M params, expert_impl {model_cfg.expert_impl} (plain_loop: loop)")
        print(f"{'variant':22s} {'ms/step':>9s} {'tokens/s':>9s} {'× plain':>8s} {'rounds: q1–q3':>14s} "
              f"{'peak MB':>9s} {'MFU':>6s}" + (f" {'ops/step':>9s}" if args.count_ops else ""))
        for name in args.variants:
            r = results[name]
            mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else "     —"
            q1, q3 = r["ratio_iqr"]
            ops = r["ops_per_step"]
            print(f"{name:22s} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:9.0f} {results['ratios'][name]:8.2f} "
                  f"{f'{q1:.2f}–{q3:.2f}':>14s} {r['peak_mb']:9.0f} {mfu}"
                  + (f" {ops if ops is not None else '—':>9}" if args.count_ops else ""))
        if "ratios_compiled" in results:
            print(f"\n{'compiled variant':22s} {'× plain_compiled':>17s} {'rounds: q1–q3':>14s}")
            for name, ratio in results["ratios_compiled"].items():
                q1, q3 = results[name]["ratio_compiled_iqr"]
                print(f"{name:22s} {ratio:17.2f} {f'{q1:.2f}–{q3:.2f}':>14s}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        lightning_log.setLevel(level)  # a caller (a test, a notebook) keeps its logging and threads
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
