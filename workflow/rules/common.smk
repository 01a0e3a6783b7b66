# Configuration validation, wildcard constraints and the small helpers the rules use.

import dataclasses

from fedpsmos.budgets import baseline_epochs, iteration_budgets
from fedpsmos.config import drop_unset, validate_config
from fedpsmos.data.sources import case_ids
from fedpsmos.organs import ORGANS, labelled_organs
from fedpsmos.preprocessing.fingerprint import needs_fingerprint

# An overlay deletes a key by setting it to null (e.g. `synthetic: null`).
drop_unset(config)
validate_config(config, source="config")

SITES = list(config["sites"])
FULL_SITES = [
    s
    for s in SITES
    if set(labelled_organs(config["sites"][s]["labels"])) == set(ORGANS)
]
LOSSES = config["losses"]
COMBINATIONS = LOSSES["combinations"]
CENTRAL_LOSSES = LOSSES["central"]
SETTINGS = config["federated"]["settings"]
DEFAULT_SETTING = config["federated"]["default"]
ROUNDS_PER_JOB = config["federated"]["rounds_per_job"]
MODES = config["adaptation"]["modes"]
EVALUATED = config.get("evaluation", {}).get(
    "models", ["pretrain", "central", "baseline", "federated", "site_alone", "adapted"]
)
BASELINES = config.get("baselines", {}).get("methods", [])


def _alternatives(names):
    return "|".join(sorted(names, key=len, reverse=True))


wildcard_constraints:
    site=_alternatives(SITES),
    losses=_alternatives(COMBINATIONS),
    setting=_alternatives(SETTINGS),
    mode="full|decoder|encoder",
    r=r"\d+",
    b=r"\d+",
    case=r"[A-Za-z0-9_.\-]+",
    method="panns|pipo",
    model=r"pretrain|site_alone|central/[a-z0-9_]+|baseline/(panns|pipo)|federated/[A-Za-z0-9_]+|adapted/(full|decoder|encoder)",


# ---------------------------------------------------------------- data


def is_synthetic(site):
    return config["sites"][site]["source"] == "synthetic"


def site_root(site):
    """The raw folder of a site: generated for synthetic sites, the user's folder otherwise."""
    if is_synthetic(site):
        return f"results/raw/{site}"
    return config["sites"][site]["path"]


def site_case_ids(site):
    spec = config["sites"][site].get("synthetic")
    return case_ids(
        config["sites"][site]["source"],
        site_root(site),
        site=site,
        spec=spec,
        files=config["sites"][site].get("files"),
    )


def get_raw_site(wildcards):
    """Synthetic sites depend on their generator rule; real folders are read where they are."""
    if is_synthetic(wildcards.site):
        return [f"results/raw/{wildcards.site}"]
    return []


def site_npz(site):
    return expand(
        "results/preprocessed/{site}/{case}.b2zip", site=site, case=site_case_ids(site)
    )


def get_fingerprint_input(wildcards=None):
    """The federated fingerprint, only when a preprocessing setting is `auto` (else no fingerprint job runs)."""
    if needs_fingerprint(config["preprocessing"]):
        return {"fingerprint": "results/data/fingerprint.json"}
    return {}


def get_site_npz(wildcards):
    return site_npz(wildcards.site)


def site_inputs(site):
    """Everything one site's training reads: its manifest, its preprocessed cases and its patch index."""
    return {
        "manifest": f"results/data/{site}/manifest.json",
        "cases": site_npz(site),
        "patches": f"results/patches/{site}.parquet",
    }


def site_descriptor(site):
    """How a training script finds one site's data (paths only)."""
    return {
        "site": site,
        "manifest": f"results/data/{site}/manifest.json",
        "npz_dir": f"results/preprocessed/{site}",
        "patches": f"results/patches/{site}.parquet",
    }


def sites_inputs(sites):
    files = []
    for site in sites:
        one = site_inputs(site)
        files += [one["manifest"], one["patches"], *one["cases"]]
    return files


# ---------------------------------------------------------------- models


def site_organs(site):
    return list(labelled_organs(config["sites"][site]["labels"]))


def get_site_data(wildcards):
    return site_inputs(wildcards.site)


def get_site_descriptor(wildcards):
    return [site_descriptor(wildcards.site)]


def get_site_organs(wildcards):
    return site_organs(wildcards.site)


def get_loss(wildcards):
    return COMBINATIONS[wildcards.losses]


def site_split(site):
    """A site's split settings: config `split`, overridden key by key by `sites.{site}.split`."""
    return {**config["split"], **config["sites"][site].get("split", {})}


def get_site_split(wildcards):
    return site_split(wildcards.site)


def site_validates(site):
    """Whether a site holds out validation cases (then federated evaluation uses its selected model)."""
    return int(site_split(site).get("validation_cases", 0)) > 0


def get_model_file(wildcards):
    """The model checkpoint behind a model id; site-alone and adapted models are one per site, and a
    federated model is, with local validation on, the model the site selected (docs/federated.md).
    """
    model = wildcards.model
    if model == "site_alone":
        return f"results/models/site_alone/{wildcards.site}/model.pt"
    if model.startswith("adapted/"):
        return f"results/models/{model}/{wildcards.site}/model.pt"
    if model.startswith("federated/") and site_validates(wildcards.site):
        return f"results/models/{model}/selected/{wildcards.site}.pt"
    return f"results/models/{model}/model.pt"


def get_baseline_inputs(wildcards):
    """PaNN starts from M0 and reads the organ-size prior; PIPO (another network) trains from scratch."""
    if wildcards.method == "panns":
        return {
            "init": "results/models/pretrain/model.pt",
            "prior": "results/models/baseline/panns/prior.json",
        }
    return {}


def get_baseline_loss(wildcards):
    """The marginal side of `baselines.losses`, plus PaNN's prior-aware term (its prior is an input)."""
    spec = {"marginal": dict(COMBINATIONS[config["baselines"]["losses"]]["marginal"])}
    if wildcards.method == "panns":
        spec["prior_aware"] = {
            "weight": float(config["baselines"].get("panns", {}).get("weight", 1.0))
        }
    return spec


def get_baseline_epochs(wildcards):
    """The central model's budget (fedpsmos.budgets.baseline_epochs): PaNN from M0, PIPO from scratch."""
    return baseline_epochs(config["training"], wildcards.method)


def get_baseline_network(wildcards):
    return {
        **config["network"],
        "architecture": "pipo" if wildcards.method == "pipo" else "plain",
    }


# ---------------------------------------------------------------- federated rounds


def n_rounds(setting):
    return SETTINGS[setting]["rounds"]


def n_blocks(setting):
    return -(-n_rounds(setting) // ROUNDS_PER_JOB)


def block_rounds(setting, block):
    first = block * ROUNDS_PER_JOB + 1
    return first, min(first + ROUNDS_PER_JOB - 1, n_rounds(setting))


def get_previous_global(wildcards):
    return (
        f"results/federated/{wildcards.setting}/round_{int(wildcards.r) - 1}/global.pt"
    )


def get_previous_private(wildcards):
    r = int(wildcards.r)
    if r == 1:
        return []
    return f"results/federated/{wildcards.setting}/private/{wildcards.site}/round_{r - 1}.pt"


def get_round_sites(wildcards):
    return expand(
        "results/federated/{setting}/round_{r}/{site}.pt",
        setting=wildcards.setting,
        r=wildcards.r,
        site=SITES,
    )


def get_previous_block(wildcards):
    b = int(wildcards.b)
    if b == 0:
        return f"results/federated/{wildcards.setting}/round_0/global.pt"
    return f"results/federated/{wildcards.setting}/block_{b - 1}.json"


def get_block_rounds(wildcards):
    first, last = block_rounds(wildcards.setting, int(wildcards.b))
    return {"first_round": first, "last_round": last}


def get_federation_end(wildcards):
    """What must exist before the federated model is final: every round (per-round rules) or every block."""
    setting = wildcards.setting
    if ROUNDS_PER_JOB == 1:
        return get_round_records(wildcards) + [get_last_global(wildcards)]
    return expand(
        "results/federated/{setting}/block_{b}.json",
        setting=setting,
        b=range(n_blocks(setting)),
    )


def get_selection_inputs(wildcards):
    """What a site's model selection waits for: its last private state (per-round rules, where that file is
    a rule output) or the last block, plus the last global model (the fallback without validation).
    """
    setting = wildcards.setting
    if ROUNDS_PER_JOB == 1:
        return {
            "private": get_final_private(wildcards),
            "global_model": get_last_global(wildcards),
        }
    return {"block": f"results/federated/{setting}/block_{n_blocks(setting) - 1}.json"}


def get_final_private(wildcards):
    """The site's private state after the last round (holds its running best model)."""
    return f"results/federated/{wildcards.setting}/private/{wildcards.site}/round_{n_rounds(wildcards.setting)}.pt"


def get_federated_settings(wildcards):
    return {"setting": wildcards.setting, **SETTINGS[wildcards.setting]}


# ---------------------------------------------------------------- evaluation and paper


def evaluated_pairs():
    """(model id, site) pairs that are predicted and evaluated."""
    pairs = []
    for family in EVALUATED:
        if family == "pretrain":
            pairs += [("pretrain", s) for s in SITES]
        elif family == "central":
            pairs += [(f"central/{c}", s) for c in CENTRAL_LOSSES for s in SITES]
        elif family == "baseline":
            pairs += [(f"baseline/{m}", s) for m in BASELINES for s in SITES]
        elif family == "federated":
            pairs += [(f"federated/{g}", s) for g in SETTINGS for s in SITES]
        elif family == "site_alone":
            pairs += [("site_alone", s) for s in SITES]
        elif family == "adapted":
            pairs += [(f"adapted/{m}", s) for m in MODES for s in SITES]
    return pairs


def get_all_metrics(wildcards=None):
    return [f"results/{model}/{site}/metrics.csv" for model, site in evaluated_pairs()]


def get_all_predictions(wildcards=None):
    return [f"results/{model}/{site}/predictions" for model, site in evaluated_pairs()]


def trained_model_dirs():
    dirs = ["results/models/pretrain"]
    if "central" in EVALUATED:
        dirs += [f"results/models/central/{c}" for c in CENTRAL_LOSSES]
    if "baseline" in EVALUATED:
        dirs += [f"results/models/baseline/{m}" for m in BASELINES]
    if "site_alone" in EVALUATED:
        dirs += [f"results/models/site_alone/{s}" for s in SITES]
    if "adapted" in EVALUATED:
        dirs += [f"results/models/adapted/{m}/{s}" for m in MODES for s in SITES]
    return dirs


def get_training_curves(wildcards=None):
    return [f"{d}/curve.csv" for d in trained_model_dirs()]


def get_federated_curves(wildcards=None):
    if "federated" not in EVALUATED and "adapted" not in EVALUATED:
        return []
    return expand("results/models/federated/{setting}/rounds.csv", setting=SETTINGS)


def get_federated_benchmarks(wildcards=None):
    """Snakemake benchmark files of every federated job, for Table 5's training time."""
    files = {}
    for setting in SETTINGS:
        if ROUNDS_PER_JOB == 1:
            files[setting] = expand(
                "results/benchmarks/train_site_round/{setting}/round_{r}/{site}.tsv",
                setting=setting,
                r=range(1, n_rounds(setting) + 1),
                site=SITES,
            ) + expand(
                "results/benchmarks/aggregate_round/{setting}/round_{r}.tsv",
                setting=setting,
                r=range(1, n_rounds(setting) + 1),
            )
        else:
            files[setting] = expand(
                "results/benchmarks/run_round_block/{setting}/block_{b}.tsv",
                setting=setting,
                b=range(n_blocks(setting)),
            )
    return files


PAPER_TABLES = expand(
    "results/paper/table{n}.{ext}", n=[2, 3, 4, 5, 6], ext=["csv", "md", "tex"]
)
PAPER_FIGURES = [
    "results/paper/fig_dice_per_organ.png",
    "results/paper/fig_qualitative.png",
    "results/paper/fig_federated_curves.png",
    "results/paper/fig_training_curves.png",
]


def get_final_output():
    return [
        *PAPER_TABLES,
        *PAPER_FIGURES,
        *expand("results/data/{site}/preview.png", site=SITES),
    ]


def get_synthetic_spec(wildcards):
    return config["sites"][wildcards.site]["synthetic"]


def get_site_labels(wildcards):
    return config["sites"][wildcards.site]["labels"]


def get_site_background(wildcards):
    """`sites.{site}.background`: values (or dataset.json names) mapped to background, or `rest`; None."""
    return config["sites"][wildcards.site].get("background")


def get_site_ignore(wildcards):
    """`sites.{site}.ignore`: values (or dataset.json names) of unknown class; None."""
    return config["sites"][wildcards.site].get("ignore")


def get_site_files(wildcards):
    """`sites.{site}.files`: the {images, labels} path templates of a `files` source; None."""
    return config["sites"][wildcards.site].get("files")


def get_site_source(wildcards):
    return config["sites"][wildcards.site]["source"]


def get_site_root(wildcards):
    return site_root(wildcards.site)


def get_site_alone_loss(wildcards):
    """Site-alone baselines use the conventional form of the default combination (their labels are complete
    for the organs they output)."""
    return {"marginal": COMBINATIONS[LOSSES["default"]]["marginal"]}


def get_adaptation_freeze(wildcards):
    return wildcards.mode


def get_local_iterations(wildcards):
    return SETTINGS[wildcards.setting]["local_iterations"]


def get_block_inputs(wildcards):
    """A block job's inputs: the previous block's state and every site's manifest and patch index.

    A site's patch index is built from all of its preprocessed cases, so it orders the block after them;
    the case paths themselves go through params (get_block_cases): as inputs of every block job they were
    350 x 693 DAG edges in the paper config.
    """
    return {
        "previous": get_previous_block(wildcards),
        "manifests": [site_descriptor(s)["manifest"] for s in SITES],
        "patches": [site_descriptor(s)["patches"] for s in SITES],
    }


def get_block_cases(wildcards):
    """Every site's preprocessed case paths, for a block job's workers (each reads only its own site's)."""
    return [c for s in SITES for c in site_npz(s)]


def get_block_first_global(wildcards):
    """The global model a block starts from (written by the previous block, or by init_federation)."""
    first, _ = block_rounds(wildcards.setting, int(wildcards.b))
    return f"results/federated/{wildcards.setting}/round_{first - 1}/global.pt"


def get_last_global(wildcards):
    return f"results/federated/{wildcards.setting}/round_{n_rounds(wildcards.setting)}/global.pt"


def get_round_records(wildcards):
    return expand(
        "results/federated/{setting}/round_{r}/record.json",
        setting=wildcards.setting,
        r=range(1, n_rounds(wildcards.setting) + 1),
    )


def get_qualitative_models(wildcards=None):
    """Candidate columns of the qualitative figure: M0, site alone, the default federated setting, every
    adaptation mode (the figure keeps the best by mean Dice) and the central model of the default losses.
    """
    central = LOSSES["default"] if LOSSES["default"] in CENTRAL_LOSSES else None
    if central is None and CENTRAL_LOSSES:
        central = CENTRAL_LOSSES[0]
    candidates = {
        "pretrain": ["pretrain"],
        "site_alone": ["site_alone"],
        "federated": [f"federated/{DEFAULT_SETTING}"],
        "adapted": [f"adapted/{m}" for m in MODES],
        "central": [f"central/{central}"] if central else [],
    }
    return [
        m
        for family, models in candidates.items()
        if family in EVALUATED
        for m in models
    ]


def get_budgets():
    """Each model family's training iterations (Table 5's iteration columns)."""
    return dataclasses.asdict(iteration_budgets(config))


def get_table5_benchmarks(wildcards=None):
    """Benchmark files of the jobs behind Table 5's rows: every federated setting and the central model."""
    files = get_federated_benchmarks() if "federated" in EVALUATED else {}
    default = LOSSES["default"]
    if "central" in EVALUATED and default in CENTRAL_LOSSES:
        files[f"central/{default}"] = [
            f"results/benchmarks/train_central/{default}.tsv"
        ]
    return files


def get_table5_benchmark_list(wildcards=None):
    return [f for files in get_table5_benchmarks().values() for f in files]
