"""Tables: penalised HD95 means, missed counts, SD over cases, paired Wilcoxon tests, M0 row, captions."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import stats

from fedpsmos.evaluation.evaluate import evaluate_site
from fedpsmos.paper.models import model_name
from fedpsmos.paper.paired_tests import paired_wilcoxon
from fedpsmos.paper.results import checked_convention, read_metrics, results_row
from fedpsmos.paper.table_format import to_latex, to_markdown
from fedpsmos.paper.tables import (
    caption_note,
    make_tables,
    table4_federated,
    table5_settings,
    table6_adaptation,
)

ORGANS5 = ["liver", "spleen", "pancreas", "kidney_left", "kidney_right"]
FL = "federated/V2"
# Per-case liver Dice on site1 (7 cases), federated and site-alone; differences all distinct and non-zero.
FL_LIVER = [0.90, 0.85, 0.80, 0.88, 0.70, 0.92, 0.75]
SA_LIVER = [0.80, 0.86, 0.60, 0.78, 0.71, 0.70, 0.55]


def _row(model, site, case, organ, dc, hd, missed=False, spurious=False):
    return (model, site, case, organ, dc, hd, missed, spurious, "max")


def _metrics() -> pd.DataFrame:
    rows = []
    for i, (fl, sa) in enumerate(zip(FL_LIVER, SA_LIVER, strict=True)):
        for organ in ORGANS5:
            rows.append(_row(FL, "site1", f"c{i}", organ, fl if organ == "liver" else 0.8, 2.0))
            rows.append(_row("site_alone", "site1", f"c{i}", organ, sa if organ == "liver" else 0.8, 3.0))
            # M0 misses the spleen of case c0: Dice 0, HD95 = the image diagonal (here 400 mm), flagged
            missed = organ == "spleen" and i == 0
            rows.append(
                _row(
                    "pretrain",
                    "site1",
                    f"c{i}",
                    organ,
                    0.0 if missed else 0.5,
                    400.0 if missed else 6.0,
                    missed,
                )
            )
    # site2 labels the liver only: three cases, M0 identical to FL (all ties)
    for case, dc in (("d0", 0.9), ("d1", 0.7), ("d2", 0.2)):
        rows.append(_row(FL, "site2", case, "liver", dc, 5.0))
        rows.append(_row("pretrain", "site2", case, "liver", dc, 5.0))
        rows.append(_row("adapted/decoder", "site2", case, "liver", dc + 0.05, 4.0))
    # a spurious spleen on site2 (reference empty) and an organ absent from both masks (HD95 NaN)
    rows.append(_row(FL, "site2", "d0", "spleen", 0.0, 300.0, spurious=True))
    rows.append(_row(FL, "site2", "d1", "spleen", 1.0, math.nan))
    frame = pd.DataFrame(
        rows,
        columns=["model", "site", "case", "organ", "dice", "hd95", "missed", "spurious", "hd95_convention"],
    )
    # Shuffle so pairing has to go by (site, case), not by row order
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


def test_penalised_hd95_mean_and_missed_count():
    # Execute
    row = results_row(_metrics(), "pretrain", ["site1"])
    # Assert: the missed spleen is in both means, with Dice 0 and the penalty
    assert row["spleen DC"] == pytest.approx((0.0 + 6 * 0.5) / 7)
    assert row["spleen HD95"] == pytest.approx((400.0 + 6 * 6.0) / 7)
    assert row["missed"] == 1 and row["spurious"] == 0 and row["cases"] == 7
    assert row["mean HD95"] == pytest.approx(((400.0 + 36.0) / 7 + 4 * 6.0) / 5)
    # site2: the spurious spleen counts (penalty in the mean), the organ absent from both is left out of HD95
    fl2 = results_row(_metrics(), FL, ["site2"])
    assert fl2["spurious"] == 1 and fl2["missed"] == 0
    assert fl2["spleen HD95"] == pytest.approx(300.0)
    assert fl2["spleen DC"] == pytest.approx(0.5)


def test_sd_over_cases():
    # Execute
    row = results_row(_metrics(), FL, ["site2"])
    # Assert: liver Dice 0.9, 0.7, 0.2 -> mean 0.6, sample SD sqrt((0.09 + 0.01 + 0.16) / 2)
    assert row["liver DC"] == pytest.approx(0.6)
    assert row["liver DC_sd"] == pytest.approx(math.sqrt(0.26 / 2))
    assert row["liver HD95_sd"] == pytest.approx(0.0)
    fl1 = results_row(_metrics(), FL, ["site1"])
    assert fl1["liver DC_sd"] == pytest.approx(float(np.std(FL_LIVER, ddof=1)))
    # a single case with an HD95 (the other is absent from both masks) has no SD
    assert math.isnan(results_row(_metrics(), FL, ["site2"])["spleen HD95_sd"])


def test_paired_wilcoxon_edge_cases():
    assert paired_wilcoxon([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]) == 1.0  # all ties: no evidence of a difference
    assert math.isnan(paired_wilcoxon([], []))
    assert paired_wilcoxon(FL_LIVER, SA_LIVER) == pytest.approx(stats.wilcoxon(FL_LIVER, SA_LIVER).pvalue)
    with pytest.raises(ValueError, match="differ in length"):
        paired_wilcoxon([1.0], [1.0, 2.0])


def test_table4_has_m0_row_and_wilcoxon_vs_fl():
    # Execute
    table = table4_federated(_metrics(), default_losses="dice_ce", default_setting="V2")
    # Assert: four rows per block, M0 first, in the paper's order
    full = table[table["data"].str.contains("fully")]
    assert list(full["model"]) == [
        model_name("pretrain"),
        model_name("central/dice_ce"),
        model_name("site_alone"),
        model_name(FL),
    ]
    full = full.set_index("model")
    site_alone = full.loc[model_name("site_alone")]
    assert site_alone["p vs"] == model_name(FL)
    assert site_alone["liver DC p"] == pytest.approx(stats.wilcoxon(SA_LIVER, FL_LIVER).pvalue)
    assert site_alone["liver DC n"] == 7
    assert site_alone["spleen DC p"] == 1.0  # 0.8 everywhere: all ties
    m0 = full.loc[model_name("pretrain")]
    assert m0["missed"] == 1 and m0["spleen HD95"] == pytest.approx((400.0 + 36.0) / 7)
    expected = stats.wilcoxon([0.0] + [0.5] * 6, [0.8] * 7).pvalue
    assert m0["spleen DC p"] == pytest.approx(expected)
    assert pd.isna(full.loc[model_name(FL), "p vs"]) and math.isnan(full.loc[model_name(FL), "liver DC p"])
    assert full.loc[model_name("central/dice_ce")].drop(["data", "p vs"]).isna().all()  # not run
    # partially labelled block: M0 = FL on site2's liver (all ties, 3 pairs)
    partial = table[table["data"].str.contains("partially")].set_index("model")
    assert partial.loc[model_name("pretrain"), "liver DC p"] == 1.0
    assert partial.loc[model_name("pretrain"), "liver DC n"] == 3


def test_table6_adaptation_vs_fl():
    # Execute
    table = table6_adaptation(_metrics(), default_setting="V2", modes=["full", "decoder"])
    # Assert: decoder vs FL on site2's liver: three pairs, every difference +0.05
    partial = table[table["data"].str.contains("partially")].set_index("model")
    decoder = partial.loc[model_name("adapted/decoder")]
    adapted, federated = [0.95, 0.75, 0.25], [0.9, 0.7, 0.2]
    assert decoder["liver DC p"] == pytest.approx(stats.wilcoxon(adapted, federated).pvalue)
    assert decoder["liver DC n"] == 3 and decoder["p vs"] == model_name(FL)
    assert decoder["liver DC"] == pytest.approx(0.65)
    assert math.isnan(partial.loc[model_name("adapted/full"), "liver DC p"])  # not run


def test_markdown_and_latex_show_sd_and_pvalues():
    table = table4_federated(_metrics(), default_losses="dice_ce", default_setting="V2")
    # Execute
    md = to_markdown(table, "cap")
    tex = to_latex(table, "cap", "tab:t4")
    # Assert: mean ± SD cells, the _sd and n columns folded away, p-values with n and low power under n < 6
    sd = float(np.std(FL_LIVER, ddof=1))
    assert f"| {np.mean(FL_LIVER):.3f} ± {sd:.3f} |" in md
    assert "_sd" not in md and "DC n" not in md
    p = stats.wilcoxon(SA_LIVER, FL_LIVER).pvalue
    assert f"{p:.2f} (n=7) |" in md
    assert "1.00 (n=3, low power)" in md
    assert "$\\pm$" in tex and "±" not in tex and "n=3, low power" in tex


def test_table5_counts_missed():
    table = table5_settings(
        _metrics(), settings={"V2": {"local_iterations": 10, "rounds": 4}}, default_losses="x", benchmarks={}
    )
    v2 = table.set_index("model").loc[model_name(FL)]
    assert v2["missed"] == 0 and v2["spurious"] == 1


def test_make_tables_captions_and_csv_columns(tmp_path):
    # Prepare
    csv = tmp_path / "metrics.csv"
    _metrics().to_csv(csv, index=False)
    # Execute
    make_tables(
        [csv],
        tmp_path / "paper",
        central_losses=["dice_ce"],
        margexc="dice_ce",
        default_losses="dice_ce",
        settings={"V2": {"local_iterations": 10, "rounds": 4}},
        default_setting="V2",
        modes=["full", "decoder"],
        hd95_convention="max",
    )
    # Assert: every caption states the convention and the penalty
    for n in range(2, 7):
        md = (tmp_path / "paper" / f"table{n}.md").read_text()
        assert caption_note("max") in md and "image diagonal" in md and "larger of the two directed" in md
    t4 = pd.read_csv(tmp_path / "paper" / "table4.csv", keep_default_na=False)
    assert {"missed", "spurious", "liver DC_sd", "liver HD95_sd", "liver DC p", "liver DC n", "p vs"} <= set(
        t4.columns
    )
    m0 = t4[(t4["model"] == model_name("pretrain")) & t4["data"].str.contains("fully")].iloc[0]
    assert int(m0["missed"]) == 1
    assert "Wilcoxon" in (tmp_path / "paper" / "table6.md").read_text()
    assert "p vs" not in pd.read_csv(tmp_path / "paper" / "table2.csv").columns


def test_convention_and_stale_metrics_are_rejected(tmp_path):
    # A CSV written before the penalty (no flag columns) must not reach a table
    old = tmp_path / "old.csv"
    _metrics().drop(columns=["missed", "spurious", "hd95_convention"]).to_csv(old, index=False)
    with pytest.raises(ValueError, match="re-run rule evaluate_site"):
        read_metrics([old], require_flags=True)
    assert read_metrics([old])["missed"].isna().all()  # figures (Dice only) still read it
    # Metrics of one convention cannot be captioned as the other
    with pytest.raises(ValueError, match="'max' but evaluation.hd95 is 'pooled'"):
        checked_convention(_metrics(), "pooled")
    assert checked_convention(_metrics(), "max") == "max"
    assert "medpy" in caption_note("pooled")


def _write(array, path, spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_missed_organ_penalty_end_to_end(tmp_path):
    # Prepare: a liver-only site with two test cases; the model finds the liver in c1 (exact) and misses it
    # in c2. Images are (4, 5, 6) voxels of (2.0, 1.0, 1.0) mm (z, y, x): diagonal sqrt(8^2 + 5^2 + 6^2).
    ref = np.zeros((4, 5, 6), np.uint8)
    ref[1:3, 1:3, 1:4] = 1
    (tmp_path / "pred").mkdir()
    for case, pred in (("c1", ref), ("c2", np.zeros_like(ref))):
        _write(ref, tmp_path / f"{case}_lab.nii.gz")
        _write(pred, tmp_path / "pred" / f"{case}.nii.gz")
    manifest = {
        "cases": [{"case": c, "label": f"{c}_lab.nii.gz"} for c in ("c1", "c2")],
        "test": ["c1", "c2"],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    evaluate_site(
        predictions_dir=tmp_path / "pred",
        manifest_path=tmp_path / "manifest.json",
        labels={"liver": [1]},
        model=FL,
        site="site2",
        out_csv=tmp_path / "metrics.csv",
    )
    # Execute
    row = results_row(read_metrics([tmp_path / "metrics.csv"], require_flags=True), FL, ["site2"])
    # Assert: the miss is averaged in (it was NaN and dropped before, giving a perfect 0.0 mean)
    diagonal = math.sqrt(8.0**2 + 5.0**2 + 6.0**2)
    assert row["liver HD95"] == pytest.approx((0.0 + diagonal) / 2)
    assert row["liver DC"] == pytest.approx(0.5)
    assert row["missed"] == 1
