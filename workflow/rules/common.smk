# Configuration validation, wildcard constraints and the rules' input and params helpers. The planning itself
# (paths, blocks of rounds, evaluated models, Table 5's benchmark files) is fedpsmos.planning.Plan, tested in
# tests/test_planning.py; each helper here reads one thing of it for a job's wildcards.

from fedpsmos.config import drop_unset, validate_config
from fedpsmos.organs import ORGANS
from fedpsmos.planning import Plan, one_of

# An overlay deletes a key by setting it to null (e.g. `synthetic: null`).
drop_unset(config)
validate_config(config, source="config")

PLAN = Plan(config)
SITES = PLAN.sites


wildcard_constraints:
    site=one_of(SITES),
    losses=one_of(PLAN.combinations),
    setting=one_of(PLAN.settings),
    mode="full|decoder|encoder",
    r=r"\d+",
    b=r"\d+",
    case=r"[A-Za-z0-9_.\-]+",
    method="panns|pipo",
    model=r"pretrain|site_alone|central/[a-z0-9_]+|baseline/(panns|pipo)|federated/[A-Za-z0-9_]+|adapted/(full|decoder|encoder)",


# ---------------------------------------------------------------- data


def get_synthetic_spec(wildcards):
    return config["sites"][wildcards.site]["synthetic"]


def get_site_source(wildcards):
    return config["sites"][wildcards.site]["source"]


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


def get_site_root(wildcards):
    return PLAN.site_root(wildcards.site)


def get_raw_site(wildcards):
    return PLAN.raw_inputs(wildcards.site)


def get_site_split(wildcards):
    return PLAN.site_split(wildcards.site)


def get_fingerprint_input(wildcards):
    return PLAN.fingerprint_input()


def get_site_npz(wildcards):
    return PLAN.case_files(wildcards.site)


# ---------------------------------------------------------------- models


def get_site_data(wildcards):
    return PLAN.site_inputs(wildcards.site)


def get_prediction_inputs(wildcards):
    return PLAN.prediction_inputs(wildcards.site)


def get_case_dir(wildcards):
    return PLAN.site_descriptor(wildcards.site)["npz_dir"]


def get_site_descriptor(wildcards):
    return [PLAN.site_descriptor(wildcards.site)]


def get_site_organs(wildcards):
    return PLAN.site_organs(wildcards.site)


def get_loss(wildcards):
    return PLAN.combinations[wildcards.losses]


def get_site_alone_loss(wildcards):
    return PLAN.site_alone_loss()


def get_model_file(wildcards):
    return PLAN.model_file(wildcards.model, wildcards.site)


def get_baseline_inputs(wildcards):
    return PLAN.baseline_inputs(wildcards.method)


def get_baseline_loss(wildcards):
    return PLAN.baseline_loss(wildcards.method)


def get_baseline_epochs(wildcards):
    return PLAN.baseline_epochs(wildcards.method)


def get_baseline_network(wildcards):
    return PLAN.baseline_network(wildcards.method)


def get_adaptation_freeze(wildcards):
    return wildcards.mode


# ---------------------------------------------------------------- federated rounds


def get_local_iterations(wildcards):
    return PLAN.settings[wildcards.setting]["local_iterations"]


def get_previous_global(wildcards):
    return PLAN.federation(wildcards.setting).global_model(int(wildcards.r) - 1)


def get_previous_private(wildcards):
    return PLAN.federation(wildcards.setting).previous_private(
        wildcards.site, int(wildcards.r)
    )


def get_round_sites(wildcards):
    return PLAN.federation(wildcards.setting).site_models(int(wildcards.r))


def get_block_inputs(wildcards):
    return PLAN.block_inputs(wildcards.setting, int(wildcards.b))


def get_block_rounds(wildcards):
    return PLAN.blocks(wildcards.setting).round_range(int(wildcards.b))


def get_block_first_global(wildcards):
    return PLAN.blocks(wildcards.setting).first_global(int(wildcards.b))


def get_block_cases(wildcards):
    return PLAN.all_case_files()


def get_federation_end(wildcards):
    return PLAN.federation(wildcards.setting).end()


def get_selection_inputs(wildcards):
    return PLAN.federation(wildcards.setting).selection_inputs(wildcards.site)


def get_final_private(wildcards):
    return PLAN.federation(wildcards.setting).final_private(wildcards.site)


def get_last_global(wildcards):
    return PLAN.federation(wildcards.setting).last_global()


def get_round_records(wildcards):
    return PLAN.federation(wildcards.setting).records()
