"""DDP (docs/design.md, "Distributed"): 2 ranks × batch b equal 1 rank × batch 2b over the same
tokens — loss, M_A / M_G, targets and every weight after 3 optimizer steps — with
Lightning's own DDP strategy (``ddp_spawn``: the same DDP wrapper as ``ddp``, launched
from inside pytest), 2 CPU processes on gloo, float64."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
from smk_lightning.training.module import SMKModule
from tests.helpers import RandomDataModule, tiny_model

STEPS, BATCH = 3, 4


class Recorder(L.Callback):
    """Per step: loss, statistics and targets; at the end: every weight. One file per rank."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        rec = {"loss": loss.detach().clone(), "stats": {}, "targets": {}}
        for name, (M_A, M_G, mask) in pl_module.step_state.stats.items():
            rec["stats"][name] = (M_A.clone(), M_G.clone(), mask.clone())
            t = pl_module.step_state.targets[name].targets
            rec["targets"][name] = (t.q_NE.clone(), t.hard_N.clone(), t.dsc_NE.clone())
        self.steps.append(rec)

    def on_train_end(self, trainer, pl_module):
        weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"steps": self.steps, "weights": weights}, Path(self.out) / f"rank{trainer.global_rank}.pt")


class InterleavedData(RandomDataModule):
    """Rank r of W reads samples r, r+W, r+2W, … in order (Lightning's own sampler shuffles)."""

    def train_dataloader(self):
        sampler = DistributedSampler(self.ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return DataLoader(self.ds, batch_size=self.batch_size, sampler=sampler)


def run(tmp: Path, scope: str, devices: int, compile_model: bool = False, precision: str = "64-true") -> list[dict]:
    L.seed_everything(0)
    module = SMKModule(
        model=tiny_model(compile=compile_model),
        optim=OptimConfig(warmup_steps=1, grad_clip=1.0),
        stats=StatsConfig(scope=scope, engine="ghost", val_batches=0),
        router=RouterConfig(loss="smk", balance="switch", balance_weight=0.5, z_loss_weight=0.01),
    )
    out = tmp / f"{scope}{devices}{'c' if compile_model else ''}{precision}"
    out.mkdir()
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=devices, precision=precision,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[Recorder(str(out))], use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=InterleavedData(n=24, batch_size=BATCH // devices))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


def interleave(a: torch.Tensor, b: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    """Rank 0 holds samples 0, 2, …, rank 1 samples 1, 3, … (DistributedSampler): merge them
    back into sample order, ``rows_per_sample`` flattened token rows per sample."""
    a = a.reshape(-1, rows_per_sample, *a.shape[1:])
    b = b.reshape(-1, rows_per_sample, *b.shape[1:])
    return torch.stack([a, b], dim=1).reshape(-1, *a.shape[2:])


@pytest.mark.parametrize("scope", ["routed", "dense"])
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path, scope):
    (one,) = run(tmp_path, scope, 1)
    r0, r1 = run(tmp_path, scope, 2)
    T = 16  # RandomDataModule's seq_len
    for step in range(STEPS):
        s1, s0, s2 = one["steps"][step], r0["steps"][step], r1["steps"][step]
        # the loss is each rank's mean over its tokens; equal token counts → mean of means
        torch.testing.assert_close((s0["loss"] + s2["loss"]) / 2, s1["loss"], rtol=1e-9, atol=1e-9)
        assert set(s1["stats"]) == set(s0["stats"]) == {"layer0", "layer1"}
        for name in s1["stats"]:
            fulls = s1["stats"][name] + s1["targets"][name]
            parts0 = s0["stats"][name] + s0["targets"][name]
            parts1 = s2["stats"][name] + s2["targets"][name]
            for full, p0, p1 in zip(fulls, parts0, parts1):
                merged = interleave(p0, p1, T)
                if merged.dtype in (torch.bool, torch.int64):
                    assert torch.equal(merged, full), (step, name)
                else:
                    torch.testing.assert_close(merged, full, rtol=1e-6, atol=1e-9, equal_nan=True)
    for k, w in one["weights"].items():
        torch.testing.assert_close(r0["weights"][k], w, rtol=1e-6, atol=1e-9, msg=f"{k} (rank 0 vs 1 process)")
        torch.testing.assert_close(r1["weights"][k], r0["weights"][k], rtol=0, atol=0, msg=f"{k} (rank 1 vs 0)")


# --------------------------------------------------------------------------- validation on your text
def _uneven_text(path: Path) -> None:
    """Documents of very different lengths: sharded by document over 2 ranks, the
    validation split would give the ranks different numbers of blocks."""
    import random

    rng = random.Random(0)
    words = "the a model expert router token gradient norm layer loss train data".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 200)))
                              for _ in range(300)) + "\n")


def _val_scalars(run_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    return {k: ea.Scalars(k)[-1].value for k in ("val/loss", "val/ppl", "val/g_acc", "val/kl_div")}


def test_validation_on_your_text_is_the_same_on_two_ranks(tmp_path, monkeypatch):
    """``smk validate`` on 2 ranks (ddp_spawn, gloo) of a text whose document-sharded validation
    split would be uneven (checked): every rank evaluates the same blocks, so val/loss is
    log(val/ppl) and every validation number equals one process's. (Sharded, the ranks had
    5 and 6 blocks, and Lightning's sync_dist mean gave val/loss = 1.1 × log(val/ppl).)"""
    from smk_lightning.cli import main
    from smk_lightning.data import SMKDataModule
    from smk_lightning.data.stream import PackedTokenStream

    monkeypatch.chdir(tmp_path)
    _uneven_text(tmp_path / "mine.txt")
    smoke = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")
    common = ["--config", smoke, "--data.data_files", "mine.txt", "--data.cache_dir", "cache",
              "--trainer.limit_val_batches", "1.0", "--model.stats.val_batches", "4",
              "--model.stats.scope", "routed"]  # probe rows are drawn per rank: routed scope is the same on both
    dm = SMKDataModule(data_files="mine.txt", seq_len=64, batch_size=8, vocab_size=512, cache_dir="cache")
    dm.prepare_data()
    _, val_src = dm._sources()
    sharded = [len(list(PackedTokenStream(val_src, dm._tokenizer_file, 64, r, 2))) for r in range(2)]
    assert sharded[0] != sharded[1], sharded  # the case the test is about

    main(["validate", *common])
    main(["validate", *common, "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"])
    one, two = (_val_scalars(tmp_path / "lightning_logs" / "smoke" / f"version_{v}") for v in (0, 1))
    assert abs(two["val/loss"] - math.log(two["val/ppl"])) < 1e-4, two
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-4), (k, one, two)


# --------------------------------------------------------------------------- resume under DDP
class BatchLog(L.Callback):
    """Each rank appends ``step crc32(input_ids)`` of every training batch to ``<tag>.rank<r>``
    in the working directory."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import zlib

        with open(f"{self.tag}.rank{trainer.global_rank}", "a") as f:
            f.write(f"{trainer.global_step} {zlib.crc32(batch['input_ids'].numpy().tobytes())}\n")


def test_resume_on_two_ranks_reads_each_ranks_own_data(tmp_path, monkeypatch):
    """``--ckpt_path`` on 2 ranks: every rank goes on with its own stream, batch for batch as an
    uninterrupted run (the checkpoint is rank 0's file; it held rank 0's data position only,
    and after a resume rank 1 trained on rank 0's batches). On 1 process, that checkpoint's
    data position is refused with a warning and the stream starts a fresh epoch."""
    from smk_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    smoke = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")

    def fit(tag: str, steps: int, *extra: str) -> None:
        main(["fit", "--config", smoke, "--data.cache_dir", "cache", "--trainer.max_steps", str(steps),
              "--trainer.val_check_interval", "5", "--trainer.limit_val_batches", "1", "--samples.every_n_steps", "0",
              "--trainer.logger.init_args.version", tag, "--trainer.callbacks+=tests.test_ddp.BatchLog",
              "--trainer.callbacks.tag", tag, *extra])

    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"]
    fit("full", 10, *ddp)
    fit("part", 5, *ddp)
    fit("part", 10, *ddp, "--ckpt_path", "last")
    for r in (0, 1):
        full, part = ((tmp_path / f"{tag}.rank{r}").read_text().splitlines() for tag in ("full", "part"))
        assert len(full) == 10 and part == full, r
    assert (tmp_path / "full.rank0").read_text() != (tmp_path / "full.rank1").read_text()
    with pytest.warns(UserWarning, match="saved by 2 rank"):
        fit("one", 12, "--ckpt_path", "lightning_logs/smoke/part/checkpoints/last.ckpt")
