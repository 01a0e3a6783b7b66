"""Per-round curves of a federation and its final model file.

The round records (``round_{r}/record.json``) hold, per site, the mean local training loss of the round and
the validation Dice of the incoming global model on the site's own fixed patch subset (site_round.py). This
module turns them into one long CSV (``round, site, loss, organ, val_dice``; one row per site and organ,
``organ`` empty when a site reported no Dice) and a two-panel PNG, and writes the federated model file: the
last global weights with ``meta.kind = "federated"`` (docs/architecture.md, "Models").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedpsmos.atomic import atomic_path
from fedpsmos.organs import ORGANS
from fedpsmos.training.checkpoint import load_checkpoint, save_checkpoint

CURVE_COLUMNS = ("round", "site", "failed", "weight", "loss", "organ", "val_dice")


def read_records(records: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read round records, sorted by round; a duplicate round or an unreadable file raises naming the file.

    Parameters
    ----------
    records:
        ``round_{r}/record.json`` paths.
    """
    out: dict[int, dict[str, Any]] = {}
    for path in records:
        try:
            record = json.loads(Path(path).read_text())
            r = int(record["round"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a round record ({exc})") from None
        if r in out:
            raise ValueError(f"{path}: round {r} appears twice among the records")
        out[r] = record
    return [out[r] for r in sorted(out)]


def curve_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per (round, site, organ) of the sites' loss and validation Dice.

    Parameters
    ----------
    records:
        Parsed round records (see :func:`read_records`).
    """
    rows = []
    for record in records:
        sites = sorted(set(record.get("losses", {})) | set(record.get("val_dice", {})))
        for site in sites:
            loss = record.get("losses", {}).get(site)
            base = {
                "round": int(record["round"]),
                "site": site,
                "failed": site in record.get("failed", []),
                "weight": record.get("weights", {}).get(site, 0.0),
                "loss": math.nan if loss is None else float(loss),
            }
            dice = record.get("val_dice", {}).get(site) or {}
            if not dice:
                rows.append({**base, "organ": "", "val_dice": math.nan})
            for organ, value in dice.items():
                rows.append({**base, "organ": organ, "val_dice": float(value)})
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def write_curves(frame: pd.DataFrame, out_csv: str | Path, out_png: str | Path) -> None:
    """Write the curve CSV and a PNG: local loss per site (left), mean validation Dice per site (right).

    Parameters
    ----------
    frame:
        :func:`curve_frame` output.
    out_csv, out_png:
        Targets (written atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    per_site = frame.groupby(["site", "round"], as_index=False).agg(
        loss=("loss", "first"), dice=("val_dice", "mean")
    )
    for site, rows in per_site.groupby("site"):
        ax_loss.plot(rows["round"], rows["loss"], marker=".", label=str(site))
        ax_dice.plot(rows["round"], rows["dice"], marker=".", label=str(site))
    ax_loss.set(xlabel="round", ylabel="mean local training loss", title="local loss")
    ax_dice.set(
        xlabel="round", ylabel="Dice (incoming global model)", title="site validation Dice", ylim=(0, 1)
    )
    ax_loss.legend(fontsize="small")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def finalise_federation(
    *,
    last_global: str | Path,
    records: Sequence[str | Path],
    out_model: str | Path,
    out_curve_csv: str | Path,
    out_curve_png: str | Path,
    setting: str | None = None,
) -> None:
    """Write the federated model (last global weights, ``kind="federated"``) and the per-round curves.

    Parameters
    ----------
    last_global:
        ``round_{R}/global.pt`` of the last round ``R``.
    records:
        Every round's ``record.json`` (rounds 1..R).
    out_model:
        ``results/models/federated/{setting}/model.pt``.
    out_curve_csv, out_curve_png:
        The curves next to it.
    setting:
        Setting name recorded in the meta (e.g. ``V2``).
    """
    payload = load_checkpoint(last_global)
    meta = payload.get("meta", {})
    parsed = read_records(records)
    last = int(meta.get("round", -1))
    rounds = [int(r["round"]) for r in parsed]
    if rounds != list(range(1, last + 1)):
        raise ValueError(
            f"{last_global}: global model of round {last}, but the records cover rounds {rounds}"
        )
    final_meta = {
        "kind": "federated",
        "setting": setting,
        "network": meta.get("network"),
        "organs": list(meta.get("organs") or ORGANS),
        "rounds": last,
        "sites": sorted({s for r in parsed for s in r.get("n_cases", {})}),
    }
    save_checkpoint(out_model, {"model": payload["model"], "meta": final_meta})
    write_curves(curve_frame(parsed), out_curve_csv, out_curve_png)
