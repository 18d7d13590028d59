"""smk_lightning: MoE language models whose router learns from exact per-token,
per-expert statistics, on PyTorch Lightning."""

__version__ = "0.1.0"
