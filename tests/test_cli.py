"""The CLI: help, `data stats` against the real data, and clean non-zero exits on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from instructedit.cli import main
from instructedit.tasks.loaders import load_records
from instructedit.tasks.splits import TASK_SOURCES

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def task_table(output: str) -> dict[str, dict[str, int]]:
    """Parse the 'Records per task and split' table of `data stats`."""
    lines = output.splitlines()
    start = lines.index("Records per task and split")
    header = re.split(r"\s{2,}", lines[start + 1].strip())
    assert header[:5] == ["task", "train", "val", "test", "total"], header
    assert set(lines[start + 2]) <= {"-", " "}
    rows = {}
    for line in lines[start + 3 :]:
        if not line.strip():
            break
        task, *numbers = line.split()
        rows[task] = dict(zip(["train", "val", "test", "total"], map(int, numbers[:4])))
    return rows


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: instructedit")
    for command in ("data", "train", "evaluate", "calibrate", "experiment", "analyze", "instructions", "edit", "quickstart", "serve", "memory", "config"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.MULTILINE), f"subcommand {command!r} missing from:\n{out}"


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_data_stats_counts_every_record(shared_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stats", "--data-dir", str(shared_data_dir)]) == 0
    out = capsys.readouterr().out
    assert str(shared_data_dir) in out
    table = task_table(out)
    assert set(table) == {"counterfact", "wikirecent", "convsent", "zsre"}
    for task, source in TASK_SOURCES.items():
        loaded = sum(len(load_records(shared_data_dir / rel, fmt=source.fmt, task=task).records) for rel in source.files)
        row = table[task]
        assert row["train"] + row["val"] + row["test"] == row["total"] == loaded, (task, row, loaded)
        assert min(row["train"], row["val"], row["test"]) > 0, (task, row)


def test_data_stats_missing_dir_fails_clearly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "no-data-here"
    assert main(["data", "stats", "--data-dir", str(missing)]) == 2
    assert re.search(re.escape(str(missing)) + r".*does not exist", caplog.text)
    assert "--data-dir" in caplog.text


def test_train_missing_config_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "absent.yaml"
    output = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(output)]) == 2
    assert str(config) in caplog.text and "does not exist" in caplog.text
    assert not output.exists()  # nothing is written before the config is known to be good


@pytest.mark.parametrize(("override", "named"), [("training.bogus=1", "training.bogus"), ("bogus.lr=1", "bogus")])
def test_train_unknown_override_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture, override: str, named: str) -> None:
    output = tmp_path / "run"
    assert main(["train", "--config", str(TINY_CONFIG), "--set", override, "--output", str(output)]) == 2
    assert f"'{named}'" in caplog.text and "unknown config key" in caplog.text
    assert str(TINY_CONFIG) in caplog.text
    assert not output.exists()


def test_config_show_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--config", str(TINY_CONFIG), "--set", "training.lr=1e-5", "--set", "data.tasks=[zsre]"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["training"]["lr"] == 1e-5
    assert shown["data"]["tasks"] == ["zsre"]
    assert shown["editor"]["rank"] == 16  # from the file


def test_config_show_invalid_value_exits_2(caplog: pytest.LogCaptureFixture) -> None:
    assert main(["config", "--set", "model.dtype=float64"]) == 2
    assert "model.dtype" in caplog.text
