"""Non-finite steps: a NaN loss or gradient is skipped (weights, optimizer and schedule
untouched, counted in train/skipped_steps); optim.max_skipped_steps in a row stop the run
with NonFiniteTrainingError and a checkpoint of the last good state."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from smk_lightning.training.config import OptimConfig, StatsConfig
from smk_lightning.training.module import NonFiniteTrainingError, SMKModule
from tests.helpers import RandomDataModule, tiny_model


class NaNModule(SMKModule):
    """SMKModule whose main loss (``nan_loss``) or one parameter's gradient (``nan_grad``)
    is NaN on the chosen training calls (0-based count of training_step calls)."""

    def __init__(self, nan_loss=(), nan_grad=(), **kw) -> None:
        super().__init__(**kw)
        self.nan_loss, self.nan_grad = set(nan_loss), set(nan_grad)
        self.call = -1
        self.grad_param = next(p for n, p in self.named_parameters() if ".router." not in n and p.dim() >= 2)
        self.grad_param.register_hook(lambda g: g * float("nan") if self.call in self.nan_grad else g)

    def training_step(self, batch, batch_idx):
        self.call += 1
        return super().training_step(batch, batch_idx)

    def lm_loss(self, logits_BTV, targets_BT):
        loss = super().lm_loss(logits_BTV, targets_BT)
        if self.training and self.call in self.nan_loss:
            return loss * float("nan")
        return loss


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def opt_snapshot(opt) -> list:
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in opt.state.values()]


class Recorder(L.Callback):
    """Weights before / after every training call, the skip counter and the logged metric."""

    def __init__(self) -> None:
        self.before, self.after, self.skipped, self.logged, self.global_step, self.lr = [], [], [], [], [], []
        self.opt_before, self.opt_after = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(snapshot(pl_module))
        self.opt_before.append(opt_snapshot(pl_module.optimizers().optimizer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(snapshot(pl_module))
        self.opt_after.append(opt_snapshot(pl_module.optimizers().optimizer))
        self.skipped.append(pl_module.guard.skipped)
        self.logged.append(float(trainer.callback_metrics["train/skipped_steps"]))
        self.global_step.append(trainer.global_step)
        self.lr.append(pl_module.lr_schedulers().get_last_lr()[0])


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_opt(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b))


def train(tmp_path: Path, max_steps: int, max_skipped: int = 10, ckpt_path: str | None = None, **nan):
    torch.manual_seed(0)
    module = NaNModule(model=tiny_model(), optim=OptimConfig(warmup_steps=2, max_skipped_steps=max_skipped),
                       stats=StatsConfig(scope="probe", val_batches=0), **nan)
    rec = Recorder()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, save_top_k=0)
    trainer = L.Trainer(max_steps=max_steps, logger=CSVLogger(tmp_path / "logs"), log_every_n_steps=1,
                        enable_checkpointing=True, callbacks=[rec, ckpt_cb], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                        default_root_dir=tmp_path)
    try:
        # weights_only=False: a checkpoint of a module built in Python holds its config dataclasses
        trainer.fit(module, datamodule=RandomDataModule(), ckpt_path=ckpt_path,
                    weights_only=False if ckpt_path else None)
    except NonFiniteTrainingError as e:
        return module, rec, trainer, e
    return module, rec, trainer, None


def logged_skips(tmp_path: Path) -> list[float]:
    import csv

    csvs = sorted((tmp_path / "logs").rglob("metrics.csv"))
    rows = list(csv.DictReader(csvs[-1].open()))
    return [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")]


def test_single_nan_loss_step_is_skipped(tmp_path):
    bad = 2
    module, rec, trainer, err = train(tmp_path, max_steps=5, nan_loss={bad})
    assert err is None
    # the NaN step changed nothing: weights, optimizer state, schedule
    assert same(rec.before[bad], rec.after[bad]), "weights changed on a NaN step"
    assert same_opt(rec.opt_before[bad], rec.opt_after[bad]), "optimizer state changed on a NaN step"
    assert rec.lr[bad] == rec.lr[bad - 1]
    # good steps before and after do change the weights
    for i in (bad - 1, bad + 1):
        assert not same(rec.before[i], rec.after[i])
        assert all(torch.isfinite(v).all() for v in rec.after[i].values() if v.is_floating_point())
    assert rec.skipped == [0, 0, 1, 1, 1, 1]
    assert rec.logged == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert logged_skips(tmp_path)[-1] == 1.0
    # training went on to max_steps (max_steps counts good steps; one extra batch was consumed)
    assert trainer.global_step == 5 and len(rec.after) == 6
    assert rec.global_step == [1, 2, 2, 3, 4, 5]
    assert module.guard.consecutive == 0


def test_nan_gradient_is_skipped(tmp_path):
    bad = 1
    module, rec, trainer, err = train(tmp_path, max_steps=3, nan_grad={bad})
    assert err is None
    assert same(rec.before[bad], rec.after[bad]), "weights changed on a NaN-gradient step"
    assert same_opt(rec.opt_before[bad], rec.opt_after[bad])
    assert not same(rec.before[bad + 1], rec.after[bad + 1])
    assert rec.skipped == [0, 1, 1, 1]
    assert trainer.global_step == 3


def test_consecutive_nan_steps_stop_with_a_checkpoint_of_the_last_good_state(tmp_path):
    K, first_bad = 3, 3
    bad = set(range(first_bad, first_bad + K))
    module, rec, trainer, err = train(tmp_path, max_steps=20, max_skipped=K, nan_loss=bad)
    assert isinstance(err, NonFiniteTrainingError)
    msg = str(err)
    assert f"{K} training steps in a row" in msg
    m = re.search(r"the last good state is in (\S+\.ckpt)", msg)
    assert m, msg
    path = Path(m.group(1))
    assert path.is_file() and path.parent == tmp_path / "ckpts"
    # it stopped on the K-th bad step, not later
    assert module.call == first_bad + K - 1
    ck = torch.load(path, map_location="cpu", weights_only=False)
    last_good = rec.after[first_bad - 1]
    assert ck["global_step"] == first_bad
    assert same({k: v for k, v in ck["state_dict"].items()}, last_good)
    assert same(snapshot(module), last_good), "weights moved during the skipped steps"
    # optimizer state in the checkpoint: the one after the last good step
    saved_state = list(ck["optimizer_states"][0]["state"].values())
    good_state = rec.opt_after[first_bad - 1]
    assert len(saved_state) == len(good_state)
    for s, g in zip(saved_state, good_state):
        for k in g:
            assert torch.equal(torch.as_tensor(s[k]), torch.as_tensor(g[k])), k


def test_resume_from_last_good_tolerates_a_single_nan_step(tmp_path):
    """After stopping on K NaN steps and resuming from last-good.ckpt (as the error message
    says), one transient NaN step must be skipped, not stop the run again.
    BUG: the checkpoint saves consecutive_skips=K in smk_state and on_load_checkpoint
    restores it, so the first NaN step after the resume already exceeds the limit."""
    K = 2
    _, _, _, err = train(tmp_path / "a", max_steps=20, max_skipped=K, nan_loss={1, 2})
    assert isinstance(err, NonFiniteTrainingError)
    ckpt = tmp_path / "a" / "ckpts" / "last-good.ckpt"
    smk_state = torch.load(ckpt, map_location="cpu", weights_only=False)["smk_state"]
    state = {k: smk_state[k] for k in ("skipped_steps", "consecutive_skips")}
    # resume (fresh module, its own call counter): NaN on the first call only
    module, rec, trainer, err = train(tmp_path / "b", max_steps=4, max_skipped=K, ckpt_path=str(ckpt),
                                      nan_loss={0})
    assert err is None, f"resumed run stopped on one NaN step (saved smk_state={state}): {err}"
    assert trainer.global_step == 4
