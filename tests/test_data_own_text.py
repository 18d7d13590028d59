"""Training on your own text through ``smk fit``: one line about the data at the start, no domain
figures or domain NMI (user text has no domain labels), per-layer training metrics under
``train/<layer>/``, and text samples whose prompts come from held-out documents, logged once a
step with the document separator visible."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from smk_lightning.cli import main

SMOKE = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")


def _lines() -> list[str]:
    return [f"the {w} sat on the mat number {i} and looked at the {w}s." for i in range(400)
            for w in ("cat", "dog", "bird")]


@pytest.fixture(scope="module")
def own_text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_text")
    (root / "my.txt").write_text("\n".join(_lines()), encoding="utf-8")
    import os

    cwd = Path.cwd()
    os.chdir(root)
    try:
        main(["fit", "--config", SMOKE, "--data.data_files", "my.txt", "--data.cache_dir", "cache",
              "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--samples.every_n_steps", "3",
              "--router_monitor.heatmap_every_n_steps", "3"])
    finally:
        os.chdir(cwd)
    ea = EventAccumulator(str(next((root / "lightning_logs" / "smoke" / "version_0").glob("events.out.tfevents.*"))),
                          size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_no_domain_tags_without_domain_labels(own_text_run):
    tags = own_text_run.Tags()
    assert not [t for t in tags["scalars"] if "domain_nmi" in t]
    assert not [t for t in tags["images"] if "domain" in t]
    assert "routing/layer0/load" in tags["histograms"]


def test_per_layer_metrics_under_train(own_text_run):
    scalars = own_text_run.Tags()["scalars"]
    assert "train/layer0/g_acc" in scalars and "train/layer0/kl_div" in scalars
    assert not [t for t in scalars if t.startswith("routing/layer0/") and t.endswith(("g_acc", "kl_div"))]


def test_samples_prompted_from_held_out_documents(own_text_run):
    events = own_text_run.Tensors("samples/text_summary")
    assert [e.step for e in events] == [3, 6]  # every 3 steps, and not again at the end
    text = events[-1].tensor_proto.string_val[0].decode()
    first_val_doc = next(t for t in _lines() if zlib.crc32(t.encode()) % 50 == 0)
    assert f"**{' '.join(first_val_doc.split()[:6])}** →" in text
    assert "12 + 7 =" not in text


def test_data_line_at_start(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    (tmp_path / "my.txt").write_text("\n".join(_lines()), encoding="utf-8")
    main(["fit", "--config", SMOKE, "--data.data_files", "my.txt", "--data.cache_dir", "cache",
          "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
          "--samples.every_n_steps", "0"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert len(lines) == 1
    assert "my.txt" in lines[0] and "val documents" in lines[0] and "one document in 50" in lines[0]
    assert "tokenizer: " in lines[0] and "trained on" in lines[0]
