"""Bad input through ``smk`` (``cli.main``): one ``smk: error: ...`` line on stderr naming the
bad value, exit status 2, no traceback, and no run directory or checkpoint written."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from smk_lightning.cli import main
from smk_lightning.cli.checkpoint import load_state_dict_message
from smk_lightning.errors import ConfigError

SMOKE = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")
SHORT = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--samples.every_n_steps", "0"]


def fails(tmp_path: Path, capsys, *args: str, subcommand: str = "fit") -> str:
    """Run ``smk <subcommand> --config smoke.yaml <args>``; return the error line after the checks."""
    argv = [subcommand, "--config", SMOKE, "--data.cache_dir", str(tmp_path / "cache"), *args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("smk: error: ")]
    assert len(lines) == 1, err
    assert not list(tmp_path.glob("lightning_logs/**/*.ckpt"))
    assert not (tmp_path / "lightning_logs").exists(), "a run directory was written"
    return lines[0]


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- 1. config keys and types -----------------------------------------------------------------
def test_unknown_key_on_command_line(here, capsys):
    msg = fails(here, capsys, "--model.model.bogus", "3")
    assert "--model.model.bogus" in msg and "smk fit --help" in msg


def test_unknown_key_in_yaml(here, capsys):
    (here / "bad.yaml").write_text("model:\n  model:\n    bogus: 3\n")
    msg = fails(here, capsys, "--config", str(here / "bad.yaml"))
    assert "model.model.bogus" in msg


def test_wrong_type(here, capsys):
    msg = fails(here, capsys, "--model.model.d_model", "abc")
    assert "model.model.d_model" in msg and "abc" in msg and "int" in msg


def test_missing_config_file(here, capsys):
    msg = fails(here, capsys, "--config", str(here / "nothere.yaml"))
    assert "nothere.yaml" in msg and "does not exist" in msg


# -- 2./3. model shape ------------------------------------------------------------------------
def test_top_k_above_num_experts(here, capsys):
    msg = fails(here, capsys, "--model.model.top_k", "9", "--model.model.num_experts", "8")
    assert "top_k=9" in msg and "num_experts=8" in msg


@pytest.mark.parametrize("extra, words", [
    (("--trainer.precision", "64-true"), "trainer.precision=64-true"),
    (("--model.model.activation_checkpointing", "true"), "activation_checkpointing=true"),
    (("--model.model.expert_impl", "loop"), "expert_impl to auto or grouped"),
])
def test_compile_refuses_what_it_cannot_hold(here, capsys, extra, words):
    msg = fails(here, capsys, "--model.model.compile", "true", *extra)
    assert "model.compile=true" in msg and words in msg, msg


def test_d_model_not_divisible_by_heads(here, capsys):
    msg = fails(here, capsys, "--model.model.d_model", "30", "--model.model.n_heads", "4")
    assert "d_model=30" in msg and "n_heads=4" in msg and "divid" in msg


# -- 4. sequence length -----------------------------------------------------------------------
def test_seq_len_above_max_seq_len(here, capsys):
    msg = fails(here, capsys, "--data.seq_len", "128")
    assert "seq_len=128" in msg and "max_seq_len=64" in msg


# -- 5./6. statistics options -----------------------------------------------------------------
@pytest.mark.parametrize("key", ["engine", "scope"])
def test_unknown_stats_engine_or_scope(here, capsys, key):
    msg = fails(here, capsys, f"--model.stats.{key}", "bogus")
    assert f"model.stats.{key}" in msg and "bogus" in msg


@pytest.mark.parametrize(("fraction", "scope"), [("0", "probe"), ("1.5", "dense"), ("-0.1", "routed")])
def test_probe_fraction_out_of_range(here, capsys, scope, fraction):
    msg = fails(here, capsys, "--model.stats.scope", scope, "--model.stats.probe_fraction", fraction)
    assert f"probe_fraction={float(fraction)}" in msg and "(0, 1]" in msg


@pytest.mark.parametrize("scope", ["probe", "dense", "routed"])
@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1, float("nan")])
def test_probe_fraction_rejected_for_every_scope(scope, fraction):
    from smk_lightning.training.config import StatsConfig

    with pytest.raises(ConfigError, match="probe_fraction"):
        StatsConfig(scope=scope, probe_fraction=fraction)


def test_unknown_engine_programmatic_is_value_error():
    from smk_lightning.model.moe import MoELayer
    from smk_lightning.stats import expert_token_stats

    layer = MoELayer(8, 16, 4, 2, "swiglu", True)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="bogus"):
        expert_token_stats(layer, x, x, engine="bogus")
    with pytest.raises(ConfigError, match="bogus"):
        from smk_lightning.training.config import StatsConfig

        StatsConfig(engine="bogus")


# -- 7. data files ----------------------------------------------------------------------------
def test_data_file_missing(here, capsys):
    msg = fails(here, capsys, "--data.data_files", str(here / "nothere.txt"))
    assert "nothere.txt" in msg and "matches no file" in msg


def test_data_glob_matches_nothing(here, capsys):
    msg = fails(here, capsys, "--data.data_files", str(here / "*.nomatch"))
    assert "*.nomatch" in msg and "matches no file" in msg


def test_data_file_empty(here, capsys):
    (here / "empty.txt").write_bytes(b"")
    msg = fails(here, capsys, "--data.data_files", str(here / "empty.txt"))
    assert "empty.txt" in msg and "empty" in msg


def test_data_file_binary(here, capsys):
    rng = random.Random(0)
    (here / "blob.txt").write_bytes(bytes(rng.randrange(256) for _ in range(4096)) + b"\0")
    msg = fails(here, capsys, "--data.data_files", str(here / "blob.txt"))
    assert "blob.txt" in msg and "binary" in msg


def test_data_file_only_invalid_utf8(here, capsys):
    (here / "bad.txt").write_bytes(b"\xff\xfe bad\n" * 20)
    msg = fails(here, capsys, "--data.data_files", str(here / "bad.txt"))
    assert "no usable text" in msg


def test_data_corpus_shorter_than_one_block(here, capsys):
    (here / "tiny.txt").write_text("hello world\n" * 3)
    msg = fails(here, capsys, "--data.data_files", str(here / "tiny.txt"))
    assert "fewer than seq_len+1=65 tokens" in msg and "seq_len" in msg


def test_invalid_utf8_lines_are_skipped_and_counted(here, capsys):
    rng = random.Random(0)
    with open(here / "mixed.txt", "wb") as fh:
        for i in range(1500):
            fh.write(f"the {rng.choice(['cat', 'dog', 'owl'])} sat on mat {i} and looked around.\n".encode())
        for _ in range(7):
            fh.write(b"bad \xff\xfe bytes\n")
    with pytest.warns(UserWarning, match="skipping 7 line"):
        main(["fit", "--config", SMOKE, "--data.data_files", str(here / "mixed.txt"),
              "--data.cache_dir", str(here / "cache"), *SHORT])
    assert (here / "lightning_logs" / "smoke" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert "Traceback" not in capsys.readouterr().err


# -- 8. tokenizer -----------------------------------------------------------------------------
def test_tokenizer_larger_than_vocab(here, capsys):
    from smk_lightning.data import generate_documents
    from smk_lightning.data.tokenizer import train_tokenizer

    tok = train_tokenizer((d["text"] for d in generate_documents(0, 150_000)), vocab_size=800)
    n = tok.get_vocab_size()
    assert n > 512  # the smoke config's data.vocab_size
    tok.save(str(here / "big.json"))
    msg = fails(here, capsys, "--data.tokenizer_path", str(here / "big.json"))
    assert f"has {n} tokens but vocab_size is 512" in msg and "--data.vocab_size" in msg


def test_tokenizer_path_missing(here, capsys):
    msg = fails(here, capsys, "--data.tokenizer_path", str(here / "nothere.json"))
    assert "nothere.json" in msg and "does not exist" in msg


def test_tokenizer_file_invalid(here, capsys):
    (here / "tok.json").write_text('{"x": 1}')
    msg = fails(here, capsys, "--data.tokenizer_path", str(here / "tok.json"))
    assert "tok.json" in msg and "not a valid tokenizer.json" in msg


# -- 9./10. checkpoints -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 steps of the smoke config: (root, last.ckpt, the same without its hyper-parameters)."""
    root = tmp_path_factory.mktemp("ckpt")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        main(["fit", "--config", SMOKE, "--data.cache_dir", str(root / "cache"), *SHORT])
    finally:
        os.chdir(cwd)
    run_dir = root / "lightning_logs" / "smoke" / "version_0"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    bare = run_dir / "checkpoints" / "no_hparams.ckpt"  # like a checkpoint saved by other code
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state.pop("hyper_parameters")
    torch.save(state, bare)
    return root, ckpt, bare


def test_checkpoint_of_other_shape(trained, here, capsys):
    root, _, bare = trained
    msg = fails(here, capsys, "--model.model.d_model", "64", "--ckpt_path", str(bare),
                subcommand="validate")
    for part in ("does not match the model config", "model.embed.weight", "(512, 32)", "(512, 64)",
                 "config.yaml"):
        assert part in msg
    assert str(bare.parents[1] / "config.yaml") in msg


def test_checkpoint_of_other_depth(trained, here, capsys):
    _, _, bare = trained
    msg = fails(here, capsys, "--model.model.n_layers", "3", "--ckpt_path", str(bare), subcommand="validate")
    assert "lacks" in msg and "model.blocks.2" in msg and "config.yaml" in msg


def test_checkpoint_hparams_override_is_reported(trained, here, capsys):
    """Lightning takes the model settings from a checkpoint's hyper-parameters: validate runs on
    the checkpoint's shape, and the overridden command-line value is named in a warning."""
    root, ckpt, _ = trained
    with pytest.warns(UserWarning, match=r"model\.model\.d_model=32 \(config: 64\)"):
        main(["validate", "--config", SMOKE, "--data.cache_dir", str(root / "cache"),
              "--model.model.d_model", "64", "--ckpt_path", str(ckpt), "--trainer.limit_val_batches", "1"])
    assert "Traceback" not in capsys.readouterr().err


def test_load_state_dict_error_is_reformatted():
    small, big = torch.nn.Linear(4, 3), torch.nn.Linear(4, 5)
    with pytest.raises(RuntimeError) as e:
        big.load_state_dict(small.state_dict())
    msg = load_state_dict_message(e.value)
    assert msg and "weight has shape (3, 4) in the checkpoint but (5, 4) in the config" in msg
    assert "1 more parameters differ" in msg and "\n" not in msg
    with pytest.raises(RuntimeError) as e:
        torch.nn.Sequential(small, small).load_state_dict(torch.nn.Sequential(small).state_dict())
    assert "missing parameter 1.weight" in load_state_dict_message(e.value)
    assert load_state_dict_message(RuntimeError("CUDA out of memory")) is None


def test_missing_checkpoint(here, capsys):
    msg = fails(here, capsys, "--ckpt_path", str(here / "nope.ckpt"), subcommand="validate")
    assert "nope.ckpt" in msg and "does not exist" in msg
    msg = fails(here, capsys, "--ckpt_path", str(here / "nope.ckpt"))
    assert "nope.ckpt" in msg


class Evil:
    """Stands for any pickled object (code runs when it is unpickled)."""


def test_checkpoint_with_pickled_code_is_refused(trained, here, capsys):
    root, ckpt, _ = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["extra"] = Evil()
    bad = here / "pickled.ckpt"
    torch.save(state, bad)
    for sub in ("validate", "fit"):
        msg = fails(here, capsys, "--ckpt_path", str(bad), subcommand=sub)
        assert str(bad) in msg and "Evil" in msg and "weights_only" in msg


def test_truncated_checkpoint_is_refused(trained, here, capsys):
    _, ckpt, _ = trained
    cut = here / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    msg = fails(here, capsys, "--ckpt_path", str(cut), subcommand="validate")
    assert str(cut) in msg and "not a readable checkpoint" in msg


def test_resume_last_without_any_checkpoint(here, capsys):
    msg = fails(here, capsys, "--ckpt_path", "last")
    assert "no last.ckpt" in msg and "lightning_logs/smoke/*/checkpoints/last.ckpt" in msg and "drop --ckpt_path" in msg


# -- 11. options --help offers that the project cannot honour -----------------------------------
@pytest.mark.parametrize("args", [["--optimizer", "AdamW"], ["--lr_scheduler", "StepLR"],
                                  ["--optimizer.lr", "0.1"]])
def test_optimizer_options_do_not_exist(here, capsys, args):
    msg = fails(here, capsys, *args)
    assert args[0] in msg and "--model.optim" in msg


def test_gradient_clip_by_value_is_refused(here, capsys):
    msg = fails(here, capsys, "--trainer.gradient_clip_algorithm", "value")
    assert "gradient_clip_algorithm=value" in msg and "--model.optim.grad_clip" in msg


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_2", "xla"])
def test_sharded_strategies_are_refused(here, capsys, strategy):
    msg = fails(here, capsys, "--trainer.strategy", strategy)
    assert f"strategy={strategy}" in msg and "--trainer.strategy ddp" in msg


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "transformer-engine", "transformer-engine-float16"])
def test_unsupported_precisions_are_refused(here, capsys, precision):
    msg = fails(here, capsys, "--trainer.precision", precision)
    assert f"precision={precision}" in msg and "bf16-mixed" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="16-mixed is supported on a CUDA GPU")
def test_fp16_mixed_needs_a_gpu(here, capsys):
    msg = fails(here, capsys, "--trainer.precision", "16-mixed")
    assert "CUDA" in msg and "bf16-mixed" in msg
    msg = fails(here, capsys, "--trainer.accelerator", "gpu")
    assert "accelerator=gpu" in msg and "cpu" in msg


def test_trainer_clip_and_accumulation_map_to_model_optim(here, capsys):
    with pytest.warns(UserWarning, match="applied as model.optim.grad_clip"):
        main(["fit", "--config", SMOKE, "--data.cache_dir", str(here / "cache"), *SHORT,
              "--trainer.gradient_clip_val", "0.5", "--trainer.gradient_clip_algorithm", "norm",
              "--trainer.accumulate_grad_batches", "2"])
    assert "Traceback" not in capsys.readouterr().err
    ck = torch.load(here / "lightning_logs" / "smoke" / "version_0" / "checkpoints" / "last.ckpt",
                    map_location="cpu", weights_only=True)
    assert ck["global_step"] == 2
    assert ck["hyper_parameters"]["optim"]["grad_clip"] == 0.5
    assert ck["hyper_parameters"]["optim"]["accumulate_grad_batches"] == 2


def test_barebones_is_refused(here, capsys):
    msg = fails(here, capsys, "--trainer.barebones", "true")
    assert "trainer.barebones=True" in msg and "smk-bench" in msg


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_only_fit_and_validate_are_offered(here, capsys, subcommand):
    msg = fails(here, capsys, subcommand=subcommand)
    assert repr(subcommand) in msg and "'fit', 'validate'" in msg


# -- 7. where the run is written ----------------------------------------------------------------
def test_default_root_dir_under_a_file(here, capsys):
    (here / "afile").write_text("x")
    msg = fails(here, capsys, "--trainer.default_root_dir", str(here / "afile" / "runs"))
    assert "--trainer.default_root_dir=" in msg and "is a file" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_default_root_dir_not_writable(here, capsys):
    locked = here / "locked"
    locked.mkdir(mode=0o500)
    msg = fails(here, capsys, "--trainer.default_root_dir", str(locked / "runs"))
    assert "not writable" in msg


def test_a_file_that_is_not_a_checkpoint(here, capsys):
    (here / "notes.ckpt").write_text("hello, this is text\n")
    msg = fails(here, capsys, "--ckpt_path", str(here / "notes.ckpt"), subcommand="validate")
    assert "is not a checkpoint" in msg and "pickled" not in msg


def test_a_full_disk_while_checkpointing_keeps_the_previous_file(here, capsys, monkeypatch):
    """The periodic last.ckpt at step 2 is written; at step 4 the disk is full: one line that
    says the previous last.ckpt is intact, that file unchanged and loadable, no temporary left."""
    import errno

    from smk_lightning.callbacks import checkpoint as ckpt_mod

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", SMOKE, "--data.cache_dir", str(here / "cache"), "--trainer.max_steps", "4",
              "--trainer.val_check_interval", "2", "--samples.every_n_steps", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("smk: error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "No space left on device" in lines[0] and "the previous last.ckpt is intact" in lines[0]
    ckpts = list(here.glob("lightning_logs/*/version_0/checkpoints/*"))
    assert [p.name for p in ckpts] == ["last.ckpt"], ckpts  # no temporary, no exception-time file
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert torch.load(ckpts[0], weights_only=True)["global_step"] == 2
