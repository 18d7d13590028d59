"""The monitors and the text sampler on fake trainers and modules: with gradient accumulation they
count every micro-batch but log once per optimizer step, use statistics only on the micro-batch
that computed them, never sample twice at one step, and show document separators in samples."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from smk_lightning.callbacks import RouterMonitor, SystemMonitor, TextSampler
from smk_lightning.callbacks import samples as samples_mod
from smk_lightning.callbacks.samples import decode_visible_eot
from smk_lightning.data.tokenizer import EOT_ID, train_tokenizer
from smk_lightning.training.state import StepState

E, N, D = 4, 12, 3


class FakeLogger:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def tags(self) -> set[str]:
        return {k for _, m in self.rows for k in m}

    def steps(self, tag: str) -> list[int]:
        return [s for s, m in self.rows if tag in m]


class FakeLayer:
    num_experts = E

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.last_topi_NK = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(N)])
        self.last_probs_NE = torch.softmax(torch.randn(N, E, generator=g), -1)


@dataclass
class FakeStepState(StepState):
    """SMKModule's step state with fixed metrics, counting how often they are computed."""

    module: object = None

    def metrics(self):
        self.module.metric_calls += 1
        return {name: {"g_acc": torch.tensor(0.5), "kl_div": torch.tensor(0.25)} for name in self.stats}


class FakeModule:
    """What the callbacks read from SMKModule: layers and the step state."""

    device = torch.device("cpu")
    training = True

    def __init__(self):
        self.moe_layers = {"layer0": FakeLayer(0)}
        self.step_state = FakeStepState(module=self)
        self.metric_calls = 0

    def compute_stats(self, value: float) -> None:
        mask = torch.ones(N, E, dtype=torch.bool)
        self.step_state.stats = {"layer0": (torch.full((N, E), value), torch.full((N, E), 2 * value), mask)}

    def log(self, *args, **kwargs):  # progress-bar copies only
        pass


def fake_trainer(domain_names=("a", "b", "c")):
    dm = SimpleNamespace(domain_names=list(domain_names))
    return SimpleNamespace(global_step=0, loggers=[FakeLogger()], datamodule=dm, world_size=1,
                           train_dataloader=SimpleNamespace(wait_s=0.0))


def batch(labelled=True):
    b = {"input_ids": torch.zeros(2, N // 2, dtype=torch.long)}
    if labelled:
        b["domain"] = torch.arange(N).remainder(D).view(2, N // 2)
    return b


def run_steps(cb, trainer, module, n_steps, accum, stats_on=lambda step: True, labelled=True):
    """Drive ``cb`` like Lightning under manual optimisation: global_step advances on the last
    micro-batch of each optimizer step, before on_train_batch_end."""
    for step in range(n_steps):
        for micro in range(accum):
            last = micro == accum - 1
            module.step_state = FakeStepState(module=module, boundary=last)
            if stats_on(step):
                module.compute_stats(float(step + 1))
            if last:
                trainer.global_step += 1
            cb.on_train_batch_end(trainer, module, None, batch(labelled), step * accum + micro)


# ------------------------------------------------------------------ RouterMonitor
def test_router_monitor_counts_every_micro_batch_logs_once_per_step():
    trainer, module = fake_trainer(), FakeModule()
    mon = RouterMonitor(log_every_n_steps=2, heatmap_every_n_steps=4)
    run_steps(mon, trainer, module, n_steps=3, accum=3)
    log = trainer.loggers[0]
    assert log.steps("routing/load_max_share") == [2]
    assert log.steps("train/layer0/g_acc") == [1, 2]  # first fresh statistics, then the log step
    assert "routing/layer0/g_acc" not in log.tags()  # per-layer training metrics live under train/
    # the domain counts of every micro-batch so far (9 of N tokens) wait for the heatmap step
    assert mon._domain_counts["layer0"].sum() == 9 * N
    run_steps(mon, trainer, module, n_steps=1, accum=3)
    assert log.steps("routing/layer0/domain_nmi") == [4]
    assert mon._load == {} and log.steps("routing/dead_experts") == [2, 4]


def test_router_monitor_loads_sum_over_the_step():
    trainer, module = fake_trainer(), FakeModule()
    mon = RouterMonitor(log_every_n_steps=1, heatmap_every_n_steps=1000)
    seen = []
    orig = mon._routing_scalars
    mon._routing_scalars = lambda: (seen.append(sum(int(v.sum()) for v in mon._load.values())), orig())[1]
    run_steps(mon, trainer, module, n_steps=2, accum=3)
    assert seen == [3 * N * 2, 3 * N * 2]  # 3 micro-batches × N tokens × top-2, per step


def test_router_monitor_never_logs_stale_statistics():
    """stats.every_n_steps=3: statistics exist on steps 1, 4, 7 (0-based 0, 3, 6); the log steps
    without statistics log none, and the next statistics step logs its own numbers."""
    trainer, module = fake_trainer(), FakeModule()
    mon = RouterMonitor(log_every_n_steps=2, heatmap_every_n_steps=1000)
    run_steps(mon, trainer, module, n_steps=8, accum=1, stats_on=lambda step: step % 3 == 0)
    log = trainer.loggers[0]
    assert log.steps("routing/entropy") == [2, 4, 6, 8]
    steps = log.steps("stats/layer0/M_A_mean")
    assert steps == [1, 4, 7]
    values = [m["stats/layer0/M_A_mean"] for s, m in log.rows if "stats/layer0/M_A_mean" in m]
    assert values == [1.0, 4.0, 7.0]  # each the value computed at that step
    assert module.metric_calls == 3


def test_router_monitor_ignores_statistics_left_by_validation():
    """The same statistics object seen again (what a validation run left behind) is not a
    training step's."""
    trainer, module = fake_trainer(), FakeModule()
    mon = RouterMonitor(log_every_n_steps=1, heatmap_every_n_steps=1000)
    module.compute_stats(1.0)
    trainer.global_step = 1
    mon.on_train_batch_end(trainer, module, None, batch(), 0)
    module.compute_stats(9.0)  # validation's statistics
    mon.on_validation_end(trainer, module)
    trainer.global_step = 2
    mon.on_train_batch_end(trainer, module, None, batch(), 1)  # no new statistics this step
    log = trainer.loggers[0]
    assert log.steps("stats/layer0/M_A_mean") == [1]
    assert log.steps("routing/entropy") == [1, 2]


def test_router_monitor_without_domain_labels():
    trainer, module = fake_trainer(domain_names=()), FakeModule()
    mon = RouterMonitor(log_every_n_steps=1, heatmap_every_n_steps=1)
    run_steps(mon, trainer, module, n_steps=2, accum=1, labelled=False)
    tags = trainer.loggers[0].tags()
    assert "routing/layer0/domain_nmi" not in tags and "train/g_acc" in tags
    assert not mon._domain_counts and not mon._mg_sums


# ------------------------------------------------------------------ SystemMonitor
def test_system_monitor_counts_all_micro_batches_and_data_wait():
    trainer, module = fake_trainer(), FakeModule()
    mon = SystemMonitor(log_every_n_steps=2)
    mon.on_train_batch_start(trainer, module, batch(), 0)
    trainer.train_dataloader.wait_s = 0.0
    seen_tokens = []
    orig = mon._start_interval
    mon._start_interval = lambda tr: (seen_tokens.append(mon._tokens), orig(tr))
    run_steps(mon, trainer, module, n_steps=4, accum=3)
    log = trainer.loggers[0]
    assert log.steps("throughput/tokens_per_s") == [2, 4]
    assert seen_tokens == [2 * 3 * N, 2 * 3 * N]  # every micro-batch's tokens
    assert log.steps("throughput/data_wait_frac") == [2, 4]
    assert all(0 <= m["throughput/data_wait_frac"] <= 1 for _, m in log.rows if "throughput/data_wait_frac" in m)


def test_loader_counts_time_waiting_for_batches(tmp_path):
    from smk_lightning.data import SMKDataModule

    dm = SMKDataModule(seq_len=16, batch_size=2, train_tokens=2_048, val_tokens=512, vocab_size=300,
                       cache_dir=str(tmp_path))
    loader = dm.train_dataloader()
    assert loader.wait_s == 0.0
    n = sum(1 for _ in loader)
    assert n > 0 and loader.wait_s > 0


# ------------------------------------------------------------------ TextSampler
class FakeExperiment:
    def __init__(self):
        self.texts: list[tuple[str, str, int]] = []

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def add_scalar(self, *args):
        pass


@pytest.fixture(scope="module")
def tok():
    docs = [f"the {w} sat on mat {i}." for i in range(200) for w in ("cat", "dog")]
    return train_tokenizer(docs, vocab_size=300)


class SamplingModule(FakeModule):
    """Generates a fixed continuation: 'the cat' <eot> 'the dog'."""

    def __init__(self, tok):
        super().__init__()
        self.cont = tok.encode(" the cat").ids + [EOT_ID] + tok.encode("the dog").ids

    def eval(self):
        pass

    def train(self, mode=True):
        pass

    def generate(self, idx, n, temperature, gen):
        return torch.cat([idx, torch.tensor([self.cont])], dim=1)


def test_sampler_once_per_step_and_not_twice_at_the_end(tok, monkeypatch):
    exp = FakeExperiment()
    monkeypatch.setattr(samples_mod, "tensorboard", lambda trainer: exp)
    trainer, module = fake_trainer(), SamplingModule(tok)
    trainer.datamodule = SimpleNamespace(tokenizer=tok, eot_id=EOT_ID, sample_prompts=lambda: ["the dog sat"])
    sampler = TextSampler(every_n_steps=2, max_new_tokens=4)
    run_steps(sampler, trainer, module, n_steps=4, accum=3)
    sampler.on_train_end(trainer, module)  # step 4 was sampled already
    assert [(tag, step) for tag, _, step in exp.texts] == [("samples", 2), ("samples", 4)]
    text = exp.texts[0][1]
    assert "the dog sat" in text  # the prompt from the data module
    assert "the cat<|endoftext|>the dog" in text  # the document separator is visible


def test_decode_visible_eot(tok):
    ids = tok.encode("the cat").ids + [EOT_ID, EOT_ID] + tok.encode("the dog").ids
    assert decode_visible_eot(tok, ids, EOT_ID) == "the cat<|endoftext|><|endoftext|>the dog"
    assert decode_visible_eot(tok, ids, None) == tok.decode(ids)
