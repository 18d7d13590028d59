"""Commands around training runs: ``smk-bench`` (bench), ``smk-sweep`` (sweep), ``smk-report``
(report) and ``smk-build-corpus`` (corpus_build)."""
