"""Tests for ``python -m experiments`` (argument parsing and ``list``)."""

import subprocess
import sys

import pytest

from experiments import __main__ as cli
from experiments import tables


def test_list_prints_every_table_with_its_paper(capsys):
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0] for line in out] == list(tables.names())
  assert any(line.startswith("gated_attention:") and "2505.06708" in line for line in out)


def test_list_as_module_subprocess():
  proc = subprocess.run([sys.executable, "-m", "experiments", "list"], capture_output=True, text=True,
                        check=True, timeout=120)
  assert "gated_attention" in proc.stdout


def test_unknown_table_reports_known(capsys):
  assert cli.main(["reproduce", "nope"]) == 2
  assert "gated_attention" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["reproduce", "gated_attention", "--scale", "huge"], ["frobnicate"]])
def test_bad_arguments_exit(argv):
  with pytest.raises(SystemExit):
    cli.main(argv)


def test_reproduce_forwards_arguments(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(cli.common, "reproduce", lambda table, **kw: calls.append((table.name, kw)))
  assert cli.main(["reproduce", "gated_attention", "--scale", "small", "--seeds", "3", "--out", str(tmp_path)]) == 0
  assert calls == [("gated_attention", {"scale": "small", "seeds": 3, "out": str(tmp_path)})]
