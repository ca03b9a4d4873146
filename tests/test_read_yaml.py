"""mmpt.io.read_yaml: the one place user YAML files are parsed, with flag-naming errors."""

from __future__ import annotations

import pytest

from mmpt.io import read_yaml
from mmpt.schedule_cli import load_schedule


def test_reads_a_mapping_and_an_empty_file(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  lr: 1.0e-3\n")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "a.yaml", "-c") == {"model": {"lr": 1e-3}}
    assert read_yaml(tmp_path / "empty.yaml", "-c") is None


def test_missing_file_and_bad_yaml_name_the_flag_and_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^--suite .*nope\.yaml: no such file"):
        read_yaml(tmp_path / "nope.yaml", "--suite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: [1, 2\n")
    with pytest.raises(ValueError, match=r"(?s)^--prompt .*bad\.yaml: not valid YAML \(.*line \d+"):
        read_yaml(bad, "--prompt")


def test_schedule_plot_reports_broken_yaml_instead_of_a_parser_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args: {lr_schedule: [\n")
    with pytest.raises(ValueError, match="-c .*bad.yaml: not valid YAML"):
        load_schedule([str(bad)])
