"""``smk-bench``: the model-FLOPs count behind its MFU column, and one tiny run end to end
(no timings are asserted: speed is measured, not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smk_lightning.model import ModelConfig
from smk_lightning.tools.bench import main, train_flops_per_token

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"


@pytest.mark.parametrize("activation,tie,moe_every", [("swiglu", True, 1), ("gelu", False, 2)])
def test_train_flops_per_token_counts_active_parameters(activation, tie, moe_every):
    c = ModelConfig(d_model=32, n_layers=4, n_heads=4, num_experts=4, top_k=2, d_ff=48, vocab_size=100,
                    activation=activation, tie_embeddings=tie, moe_every=moe_every)
    d, V, T = c.d_model, c.vocab_size, 64
    n_in = 2 if activation == "swiglu" else 1
    moe_layers = c.n_layers // moe_every
    dense_layers = c.n_layers - moe_layers
    per_layer = 4 * d * d + 2 * d  # attention (qkv + proj) and two RMSNorm weights
    moe = d * c.num_experts + c.top_k * (n_in + 1) * d * c.d_ff  # router + the top_k experts a token uses
    dense = (n_in + 1) * d * (c.top_k * c.d_ff)  # dense FFN of width top_k·d_ff
    active = c.n_layers * per_layer + moe_layers * moe + dense_layers * dense + V * d + d  # head, final norm
    assert train_flops_per_token(c, T) == pytest.approx(6 * active + 12 * c.n_layers * d * T)


def test_bench_runs_and_reports_mfu(tmp_path, capsys):
    """Also: the caller's logging level and thread count are left as they were (a leaked
    WARNING level on lightning.pytorch hid the data summary from later tests)."""
    import logging

    import torch

    lightning_log = logging.getLogger("lightning.pytorch")
    level, threads = lightning_log.level, torch.get_num_threads()
    out = tmp_path / "bench.json"
    main(["--config", str(SMOKE), "--steps", "1", "--warmup", "1", "--rounds", "2", "--threads", "1",
          "--variants", "plain", "ghost_routed", "--peak-tflops", "1", "--count-ops", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res["ratios"]) == {"plain", "ghost_routed"} and res["ratios"]["plain"] == 1.0
    for name in ("plain", "ghost_routed"):
        r = res[name]
        flops = res["meta"]["train_flops_per_token"] * res["meta"]["batch_size"] * res["meta"]["seq_len"]
        assert r["mfu"] == pytest.approx(flops / r["step_s"] / 1e12)
        assert len(r["ratio_rounds"]) == 2 and r["ratio_iqr"][0] <= r["ratio_iqr"][1]
        assert min(r["ratio_rounds"]) <= r["ratio_iqr"][0] and r["ratio_iqr"][1] <= max(r["ratio_rounds"])
    assert res["plain"]["ratio_rounds"] == [1.0, 1.0]
    # --count-ops: the statistics add ops
    assert res["ghost_routed"]["ops_per_step"] > res["plain"]["ops_per_step"] > 0
    assert "MFU" in capsys.readouterr().out
    assert (lightning_log.level, torch.get_num_threads()) == (level, threads)


def _error_line(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["--config", str(SMOKE), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--rounds", "0"], "--rounds 0 must be >= 1"),
    (["--warmup", "-1"], "--warmup -1 must be >= 0"),
    (["--precision", "bogus"], "--precision=bogus is not supported"),
    (["--precision", "bf16-true"], "--precision=bf16-true is not supported"),
])
def test_bad_arguments_end_in_one_line(capsys, args, message):
    assert _error_line(capsys, *args).startswith(f"smk-bench: error: {message}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusals")
def test_cuda_without_a_gpu_is_refused(capsys):
    assert "no CUDA GPU is visible" in _error_line(capsys, "--device", "cuda")
    assert "--precision=16-mixed needs a CUDA GPU" in _error_line(capsys, "--precision", "16-mixed")


def test_precision_on_the_cpu(tmp_path):
    """A bf16 config runs in float32 on the CPU (what its GPU runs train in is not the CPU's
    bf16); an explicit --precision is taken as asked."""
    cfg = tmp_path / "bf16.yaml"
    cfg.write_text(SMOKE.read_text().replace("trainer:\n", "trainer:\n  precision: bf16-mixed\n", 1))
    out = tmp_path / "b.json"
    for extra, expected in (([], "32-true"), (["--precision", "bf16-mixed"], "bf16-mixed")):
        main(["--config", str(cfg), "--steps", "1", "--warmup", "0", "--rounds", "1", "--threads", "1",
              "--device", "cpu", "--variants", "plain", "--json", str(out), *extra])
        assert json.loads(out.read_text())["meta"]["precision"] == expected


def test_bench_compiled_variants_are_compared_to_compiled_plain(tmp_path):
    out = tmp_path / "bench.json"
    main(["--config", str(SMOKE), "--steps", "1", "--warmup", "1", "--rounds", "1", "--threads", "1",
          "--variants", "plain", "plain_compiled", "ghost_routed_compiled", "switch_probe25", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res["ratios"]) == {"plain", "plain_compiled", "ghost_routed_compiled", "switch_probe25"}
    assert set(res["ratios_compiled"]) == {"plain_compiled", "ghost_routed_compiled"}
    assert res["ratios_compiled"]["plain_compiled"] == 1.0
    ratio = res["ghost_routed_compiled"]["step_s"] / res["plain_compiled"]["step_s"]
    assert res["ratios_compiled"]["ghost_routed_compiled"] == pytest.approx(ratio)
