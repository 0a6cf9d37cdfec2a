"""experiments.think_sweep: cells as JSON files, the table read from them alone."""
import json

import numpy as np
import pytest

from experiments import think, think_sweep
from rlsoft.config import build_config


def _cell(tmp_path, row, modulus, accuracy):
    record = dict(row=row, modulus=modulus, flags=[], seeds=list(range(len(accuracy))), wall_s=12.0,
                  final={"accuracy": accuracy, "hand_accuracy": [1.0] * len(accuracy)}, last_train={})
    (tmp_path / f"{row}-M{modulus}.json").write_text(json.dumps(record))


def test_table_reads_the_cell_files(tmp_path):
    _cell(tmp_path, "blind_super_clean", 10, [0.2, 0.3, 0.25, 0.35, 0.3])
    _cell(tmp_path, "no_think", 10, [0.1, 0.1, 0.1, 0.1, 0.1])
    text = think_sweep.main([f"--out={tmp_path}", "--table_only"])
    lines = text.splitlines()
    assert lines[0].startswith("# Thinking tokens")  # the title results/index.md shows
    assert "no_think" in lines[4] and "blind_super_clean" in lines[5]  # ROWS order within a modulus
    assert f"{np.mean([0.2, 0.3, 0.25, 0.35, 0.3]):.2f} [" in lines[5]
    assert (tmp_path / "table.md").read_text().strip() == text


def test_every_row_is_a_valid_command_line():
    for row in think_sweep.ROWS:
        for m in think_sweep.MODULI:
            build_config(think.ThinkExperimentConfig, think_sweep.cell_flags(row, m, 5))  # parse only


@pytest.mark.parametrize("flag", ["--moduli=7", "--rows=nope", "--seeds=0"])
def test_bad_flags_exit_2(flag, capsys):
    with pytest.raises(SystemExit) as e:
        think_sweep.main([flag, "--table_only"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
