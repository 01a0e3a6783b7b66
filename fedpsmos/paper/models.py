"""Model ids of the workflow and the names the paper's tables and figures give them.

Model ids (docs/architecture.md, "Evaluation"): ``pretrain``, ``central/{losses}``, ``baseline/{method}``
(Table 3's PaNN and PIPO), ``federated/{setting}``, ``site_alone``, ``adapted/{mode}``. Paper names: M0
(pretrained on site 1), the centrally trained non-FL upper bound M_nonFL, the central PaNN and PIPO baselines,
the federated model M_FL, a model per site trained alone, and the federated model adapted to each site
with all layers, the decoder or the encoder trained (paper Section 2.3, Table 6).
"""

from __future__ import annotations

KINDS = ("pretrain", "central", "baseline", "federated", "site_alone", "adapted")
BASELINE_NAMES = {"panns": "PaNN (central)", "pipo": "PIPO (central)"}
ADAPTATION_NAMES = {
    "full": "FL + adaptation (all layers)",
    "decoder": "FL + adaptation (decoder)",
    "encoder": "FL + adaptation (encoder)",
}
LOSS_NAMES = {"dice": "Dice", "ce": "CE", "focal": "Focal", "topk": "TopK", "lovasz": "Lovasz"}


def parse_model_id(model_id: str) -> tuple[str, str | None]:
    """Split a model id into its kind and variant (loss combination, setting or adaptation mode).

    Parameters
    ----------
    model_id:
        e.g. ``central/dice_ce_lovasz``, ``federated/V2``, ``adapted/decoder``, ``site_alone``.
    """
    kind, _, variant = str(model_id).partition("/")
    needs_variant = kind in ("central", "baseline", "federated", "adapted")
    if kind not in KINDS or needs_variant != bool(variant) or "/" in variant:
        raise ValueError(
            f"unknown model id {model_id!r} (expected one of pretrain, central/<losses>, "
            "baseline/<method>, federated/<setting>, site_alone, adapted/<mode>)"
        )
    return kind, variant or None


def loss_label(combination: str) -> str:
    """Readable name of a loss combination: ``dice_ce_lovasz`` -> ``Dice+CE+Lovasz`` (unknown parts kept).

    Parameters
    ----------
    combination:
        A name from config ``losses.combinations``.
    """
    return "+".join(LOSS_NAMES.get(part, part) for part in combination.split("_"))


def model_name(model_id: str, *, detail: bool = True) -> str:
    """The paper's name of a model, used in every table and figure.

    Parameters
    ----------
    model_id:
        A workflow model id (module docstring).
    detail:
        Append the loss combination (central) or the setting (federated) that tells variants apart.
    """
    kind, variant = parse_model_id(model_id)
    if kind == "pretrain":
        return "M0 (pretrained on site 1)"
    if kind == "site_alone":
        return "site alone"
    if kind == "central":
        base = "central (non-FL, upper bound)"
        return f"{base}, {loss_label(variant or '')}" if detail else base
    if kind == "baseline":
        return BASELINE_NAMES.get(variant or "", f"{variant} (central)")
    if kind == "federated":
        return f"federated (FL), {variant}" if detail else "federated (FL)"
    return ADAPTATION_NAMES.get(variant or "", f"FL + adaptation ({variant})")


def model_order(model_id: str) -> tuple[int, str]:
    """Sort key putting models in the paper's order: M0, central, baselines, site alone, federated, adapted.

    Parameters
    ----------
    model_id:
        A workflow model id.
    """
    kind, variant = parse_model_id(model_id)
    rank = {"pretrain": 0, "central": 1, "baseline": 2, "site_alone": 3, "federated": 4, "adapted": 5}[kind]
    modes = list(ADAPTATION_NAMES)
    if kind == "adapted" and variant in modes:
        return rank, str(modes.index(variant))
    return rank, variant or ""
