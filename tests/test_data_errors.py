"""Data mistakes explain themselves through ``smk``: a file of the wrong format or a missing text
field ends with one ``smk: error:`` line naming the file and the flag to pass, exit status 2,
no traceback and no run directory."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from smk_lightning.cli import main
from smk_lightning.data import generate_documents

SMOKE = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")


def _docs(n=400):
    return [d["text"] for d in itertools.islice(generate_documents(13, 10**9), n)]


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain.txt").write_text("\n".join(" ".join(t.split()) for t in _docs()) + "\n")
    with open(tmp_path / "rows.jsonl", "w") as fh:
        for i, t in enumerate(_docs()):
            fh.write(json.dumps({"text": t, "id": i}) + "\n")
    return tmp_path


def fails(here: Path, capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", SMOKE, "--data.cache_dir", str(here / "cache"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("smk: error: ")]
    assert len(lines) == 1, err
    assert not (here / "lightning_logs").exists(), "a run directory was written"
    return lines[0]


def test_json_format_on_a_text_file(here, capsys):
    msg = fails(here, capsys, "--data.data_files", "plain.txt", "--data.data_format", "json")
    assert "'plain.txt'" in msg and "not JSON" in msg and "--data.data_format text" in msg


def test_missing_text_field_names_the_fields_there_are(here, capsys):
    msg = fails(here, capsys, "--data.data_files", "rows.jsonl", "--data.text_field", "body")
    assert "no field 'body'" in msg and "'text', 'id'" in msg and "--data.text_field text" in msg


def test_text_field_holding_no_text(here, capsys):
    msg = fails(here, capsys, "--data.data_files", "rows.jsonl", "--data.text_field", "id")
    assert "'id' holds int values, not text" in msg


def test_parquet_format_on_a_jsonl_file(here, capsys):
    msg = fails(here, capsys, "--data.data_files", "rows.jsonl", "--data.data_format", "parquet")
    assert "'rows.jsonl'" in msg and "Parquet" in msg and "--data.data_format" in msg


def test_mixed_formats(here, capsys):
    msg = fails(here, capsys, "--data.data_files", "plain.txt,rows.jsonl")
    assert "mix formats" in msg and "rows.jsonl is json" in msg and "plain.txt is text" in msg


def test_smk_command_prints_one_line(here):
    """The installed ``smk`` entry point (as a user runs it): exit 2, one line, no traceback."""
    cmd = [sys.executable, "-c", "from smk_lightning.cli import main; main()", "fit", "--config", SMOKE,
           "--data.cache_dir", "cache", "--data.data_files", "plain.txt", "--data.data_format", "json"]
    res = subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("smk: error: ")]) == 1, res.stderr


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "plain.txt.gz", "plain.txt.xz"])
def test_compressed_file_that_does_not_decompress(here, capsys, name):
    (here / name).write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)  # a gzip header, then garbage
    msg = fails(here, capsys, "--data.data_files", name)
    assert name in msg and "does not decompress" in msg


def test_compressed_parquet_is_refused(here, capsys):
    (here / "rows.parquet.gz").write_bytes(b"PAR1")
    msg = fails(here, capsys, "--data.data_files", "rows.parquet.gz")
    assert "rows.parquet.gz" in msg and "compressed Parquet" in msg
