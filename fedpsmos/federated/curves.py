"""Per-round curves of a federation and its final model file.

The round records (``round_{r}/record.json``) hold, per site, the mean local training loss of the round and
the validation Dice of the incoming global model and of the site's local model on the site's own validation
cases (site_round.py). This module turns them into one long CSV (``round, site, failed, weight, loss, organ,
val_dice, val_dice_local``; one row per site and organ, ``organ`` empty when a site reported no Dice) and a
PNG drawn by the paper's federated-curves figure (one line per site: loss above, validation Dice below), and
writes the federated model file: the last global weights with ``meta.kind = "federated"``
(docs/architecture.md, "Models").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedpsmos.atomic import atomic_path
from fedpsmos.federated.rounds import apply_meta
from fedpsmos.organs import ORGANS
from fedpsmos.training.checkpoint import load_checkpoint, save_checkpoint

# val_dice: the incoming global model's Dice on the site's validation cases; val_dice_local: the site's model
# after its local training (docs/federated.md, "Local validation and best-model selection").
CURVE_COLUMNS = ("round", "site", "failed", "weight", "loss", "organ", "val_dice", "val_dice_local")


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
            local = record.get("val_dice_local", {}).get(site) or {}
            if not dice and not local:
                rows.append({**base, "organ": "", "val_dice": math.nan, "val_dice_local": math.nan})
            for organ in [*dice, *(o for o in local if o not in dice)]:
                value, after = dice.get(organ), local.get(organ)
                rows.append(
                    {
                        **base,
                        "organ": organ,
                        "val_dice": math.nan if value is None else float(value),
                        "val_dice_local": math.nan if after is None else float(after),
                    }
                )
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def write_curves(frame: pd.DataFrame, out_csv: str | Path, out_png: str | Path, *, setting: str = "") -> None:
    """Write the curve CSV and its PNG: one line per site, local loss per round (validation Dice below).

    The PNG is the paper's federated-curves figure (:func:`fedpsmos.paper.figures.federated_curves_figure`)
    for this one setting, so both plots of the federation share one plotter.

    Parameters
    ----------
    frame:
        :func:`curve_frame` output.
    out_csv, out_png:
        Targets (written atomically).
    setting:
        Setting name, the panel title.
    """
    from fedpsmos.paper.figures import federated_curves_figure, per_site_rounds, save_figure

    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    save_figure(federated_curves_figure(per_site_rounds(frame, setting or "federation")), out_png)


def finalise_federation(
    *,
    last_global: str | Path,
    records: Sequence[str | Path],
    out_model: str | Path,
    out_curve_csv: str | Path,
    out_curve_png: str | Path,
    setting: str | None = None,
    preprocessing: Mapping[str, Any] | None = None,
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
    preprocessing:
        The resolved preprocessing settings recorded in the meta (default: the last global model's).
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
        **apply_meta(meta, preprocessing=preprocessing),
    }
    save_checkpoint(out_model, {"model": payload["model"], "meta": final_meta})
    write_curves(curve_frame(parsed), out_curve_csv, out_curve_png, setting=setting or "")
