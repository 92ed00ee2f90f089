"""Presets are the recipes the project measured: each is its study row, and quotes that row's
committed numbers."""

import csv
import json
from pathlib import Path

import pytest

from gankit import cli
from gankit.config import Config, validate
from gankit.presets import PRESETS, preset

ROOT = Path(__file__).resolve().parents[1]
# What a study row sets about where a run is kept and what it measures, not what it trains.
BOOKKEEPING = {"data_root", "progress", "tensorboard", "seed", "client_cpus", "out_dir", "name",
               "eval_every", "eval_samples", "sample_every", "checkpoint_every"}


def shown_tolerance(value) -> float:
    """Half a unit of the last decimal a number is shown with (0.952 -> 0.0005)."""
    if isinstance(value, int):
        return 0.0
    decimals = len(repr(float(value)).split(".")[1].rstrip("0")) or 1
    return 0.5 * 10 ** -decimals


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_configuration(name):
    validate(Config().updated(preset(name)), 10)


studied = sorted(name for name, p in PRESETS.items() if p.study_config)


@pytest.mark.parametrize("name", studied)
def test_a_preset_is_the_study_row_it_quotes(name):
    p = PRESETS[name]
    path = ROOT / "experiments" / "configs" / f"{p.study_config}.json"
    if not path.is_file():
        pytest.skip("the experiments folder is not here (an installed wheel)")
    spec = json.loads(path.read_text())
    row = {**spec["base"], **spec["rows"][p.evidence[0].row]}
    resolved = Config().updated(preset(name)).flat()
    # A preset that names no dataset trains on the user's; its result says which data it measured.
    ignored = BOOKKEEPING | ({"dataset"} if "dataset" not in p.options else set())
    differ = {k: (v, resolved[k]) for k, v in row.items() if k not in ignored and resolved[k] != v}
    assert not differ, f"{name} differs from row {p.evidence[0].row} (row, preset): {differ}"


@pytest.mark.parametrize("name", studied)
def test_a_preset_quotes_its_committed_numbers(name):
    for evidence in PRESETS[name].evidence:
        table = ROOT / "experiments" / "results" / evidence.study / "table.csv"
        if not table.is_file():
            pytest.skip("the experiments folder is not here (an installed wheel)")
        rows = {r["row"]: r for r in csv.DictReader(table.open())}
        assert evidence.row in rows, f"{evidence.row} is not in {table}"
        for column, shown in evidence.values.items():
            measured = float(rows[evidence.row][column])
            assert abs(measured - shown) <= shown_tolerance(shown) + 1e-12, (evidence.row, column, measured, shown)


def test_gankit_presets_describes_each_with_its_result_and_command(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, p in PRESETS.items():
        assert f"{name}: {p.purpose}" in out
        if p.command:
            assert f"run: {p.command}" in out and f"--preset {name}" in p.command
    assert "downstream accuracy 95.2% and 95.7%" in out


def test_an_unknown_preset_names_the_known_ones(capsys):
    code = cli.main(["train", "--preset", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown preset 'nope'" in err and "dp-mnist" in err and "gankit presets" in err
