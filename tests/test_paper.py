"""Paper names and tables from a hand-made metrics frame ('-' for missing models); figures: test_figures."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from fedpsmos.paper.models import model_name, parse_model_id
from fedpsmos.paper.table_format import write_table
from fedpsmos.paper.tables import make_tables, table2_losses, table3_margexc, table5_settings

ORGANS5 = ["liver", "spleen", "pancreas", "kidney_left", "kidney_right"]


def _metrics() -> pd.DataFrame:
    rows = []
    # central/dice_ce: site1 two cases on all organs, site2 liver, site3 spleen
    for case, dc in (("a", 0.8), ("b", 0.6)):
        for organ in ORGANS5:
            hd = math.nan if (case == "b" and organ == "pancreas") else 2.0 if case == "a" else 4.0
            rows.append(("central/dice_ce", "site1", case, organ, dc, hd))
    rows.append(("central/dice_ce", "site2", "c", "liver", 0.9, 1.0))
    rows.append(("central/dice_ce", "site3", "d", "spleen", 0.5, 3.0))
    rows.append(("federated/V2", "site1", "a", "liver", 0.7, 5.0))
    rows.append(("adapted/decoder", "site2", "c", "liver", 0.95, 1.0))
    rows.append(("adapted/full", "site2", "c", "liver", 0.85, 1.0))
    return pd.DataFrame(rows, columns=["model", "site", "case", "organ", "dice", "hd95"])


def test_model_names():
    assert model_name("pretrain") == "M0 (pretrained on site 1)"
    assert model_name("central/dice_ce_lovasz") == "central (non-FL, upper bound), Dice+CE+Lovasz"
    assert model_name("federated/V2", detail=False) == "federated (FL)"
    assert model_name("adapted/decoder") == "FL + adaptation (decoder)"
    assert model_name("adapted/full") == "FL + adaptation (all layers)"
    assert model_name("site_alone") == "site alone"
    assert model_name("baseline/panns") == "PaNN (central)"
    assert model_name("baseline/pipo") == "PIPO (central)"
    assert parse_model_id("central/x") == ("central", "x")
    with pytest.raises(ValueError, match="unknown model id"):
        parse_model_id("federated")
    with pytest.raises(ValueError, match="unknown model id"):
        parse_model_id("baseline")


def test_table3_rows_baselines_first():
    # Prepare: PaNN ran on site1 and site2; PIPO did not run
    metrics = pd.concat(
        [
            _metrics(),
            pd.DataFrame(
                [
                    ("baseline/panns", "site1", "a", "liver", 0.6, 2.0),
                    ("baseline/panns", "site2", "c", "liver", 0.4, 6.0),
                ],
                columns=["model", "site", "case", "organ", "dice", "hd95"],
            ),
        ],
        ignore_index=True,
    )
    # Execute
    table = table3_margexc(
        metrics,
        margexc="dice_ce",
        default_losses="dice_ce_lovasz",
        default_setting="V2",
        modes=["full", "decoder"],
        baselines=["panns", "pipo"],
    )
    # Assert: the paper's order, PaNN's own values, a '-' row (NaN) for PIPO
    full = table[table["data"].str.contains("fully")]
    assert list(full["model"])[:3] == [
        "PaNN (central)",
        "PIPO (central)",
        f"MargExc-style losses: {model_name('central/dice_ce')}",
    ]
    rows = table.set_index(["data", "model"])
    partial = [d for d in table["data"].unique() if "partially" in d][0]
    assert rows.loc[(partial, "PaNN (central)"), "liver DC"] == pytest.approx(0.4)
    assert full.set_index("model").loc["PaNN (central)", "liver DC"] == pytest.approx(0.6)
    assert full.set_index("model").loc["PIPO (central)"].drop("data").isna().all()


def test_table2_values_and_missing_rows():
    # Execute
    table = table2_losses(_metrics(), ["dice_ce", "dice_ce_lovasz"])
    # Assert: site1 block
    full = table[table["data"].str.contains("fully")].set_index("model")
    row = full.loc[model_name("central/dice_ce")]
    assert row["liver DC"] == pytest.approx(0.7) and row["liver HD95"] == pytest.approx(3.0)
    assert row["pancreas HD95"] == pytest.approx(2.0)  # the NaN case is skipped
    assert row["mean DC"] == pytest.approx(0.7)
    assert row["mean HD95"] == pytest.approx((3.0 * 4 + 2.0) / 5)
    assert full.loc[model_name("central/dice_ce_lovasz")].drop("data").isna().all()  # not run
    # partially labelled block: each organ from its own site, unlabelled organs missing
    partial = (
        table[table["data"].str.contains("partially")].set_index("model").loc[model_name("central/dice_ce")]
    )
    assert partial["liver DC"] == pytest.approx(0.9) and partial["spleen HD95"] == pytest.approx(3.0)
    assert math.isnan(partial["pancreas DC"])
    assert partial["mean DC"] == pytest.approx(0.7)


def test_table5_iterations_and_time(tmp_path):
    # Prepare: two benchmark files for V2 (one per job)
    for i, seconds in enumerate((1800.0, 5400.0)):
        (tmp_path / f"b{i}.tsv").write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:30:00\t100\n")
    settings = {"V1": {"local_iterations": 5, "rounds": 8}, "V2": {"local_iterations": 10, "rounds": 4}}
    # Execute
    table = table5_settings(
        _metrics(),
        settings=settings,
        default_losses="dice_ce",
        benchmarks={"V2": [tmp_path / "b0.tsv", tmp_path / "b1.tsv"]},
    )
    # Assert
    v2 = table.set_index("model").loc[model_name("federated/V2")]
    assert v2["total iterations"] == 40 and v2["training time (h)"] == pytest.approx(2.0)
    assert v2["mean DC"] == pytest.approx(0.7)
    assert math.isnan(table.set_index("model").loc[model_name("federated/V1"), "training time (h)"])


def test_make_tables_writes_every_format(tmp_path):
    # Prepare
    csv = tmp_path / "metrics.csv"
    _metrics().assign(missed=False, spurious=False, hd95_convention="max").to_csv(csv, index=False)
    # Execute
    paths = make_tables(
        [csv, tmp_path / "not_run.csv"],
        tmp_path / "paper",
        central_losses=["dice_ce", "dice_ce_lovasz"],
        margexc="dice_ce",
        default_losses="dice_ce_lovasz",
        settings={"V2": {"local_iterations": 10, "rounds": 4}},
        default_setting="V2",
        modes=["full", "decoder", "encoder"],
        benchmarks={},
    )
    # Assert
    assert sorted(p.name for p in paths) == sorted(
        f"table{i}.{s}" for i in range(2, 7) for s in ("csv", "md", "tex")
    )
    md = (tmp_path / "paper" / "table2.md").read_text()
    assert "combinations run: Dice+CE, Dice+CE+Lovasz" in md
    assert "| 0.700 ± 0.141 | 3.00 ± 1.41 |" in md and "| - | - |" in md
    tex = (tmp_path / "paper" / "table3.tex").read_text()
    assert "\\begin{tabular}" in tex and "FL + adaptation (decoder) (best mode)" in tex
    # Every underscore is escaped (model and loss names hold them).
    assert "_" in tex and re.search(r"(?<!\\)_", tex) is None
    csv3 = pd.read_csv(tmp_path / "paper" / "table4.csv", keep_default_na=False)
    assert (csv3.loc[csv3["model"] == "site alone", "liver DC"] == "-").all()


def test_write_table_escapes_latex(tmp_path):
    df = pd.DataFrame({"model": ["a_b & c"], "liver DC": [0.91234]})
    write_table(df, tmp_path / "t", "50% of x_y")
    tex = (tmp_path / "t.tex").read_text()
    assert "a\\_b \\& c" in tex and "50\\% of x\\_y" in tex and "0.912" in tex
