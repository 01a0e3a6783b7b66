# Federated rounds (FedAvg, McMahan et al. 2017) from M0. Round r: each site trains locally from global r-1 on
# its own data only and writes round_{r}/{site}.pt; aggregation reads only those weight files and writes
# round_{r}/global.pt. With federated.rounds_per_job = K > 1, one job runs K rounds (one worker process per
# site, FedAvg in the coordinating process) and still writes every round's files (docs/federated.md).


rule init_federation:
    input:
        model="results/models/pretrain/model.pt",
        settings="results/preprocessed/settings.json",
    output:
        global_model="results/federated/{setting}/round_0/global.pt",
    log:
        "logs/init_federation/{setting}.log",
    conda:
        "../../envs/training.yaml"
    params:
        patch_size=config["patches"]["size"],
    script:
        "../../scripts/init_federation.py"


if PLAN.per_round:

    rule train_site_round:
        input:
            unpack(get_site_data),
            global_model=get_previous_global,
            private=get_previous_private,
        output:
            site_model="results/federated/{setting}/round_{r}/{site}.pt",
            private="results/federated/{setting}/private/{site}/round_{r}.pt",
        log:
            "logs/train_site_round/{setting}/round_{r}/{site}.log",
        benchmark:
            "results/benchmarks/train_site_round/{setting}/round_{r}/{site}.tsv"
        conda:
            "../../envs/training.yaml"
        threads: 1
        resources:
            gpu=1,
        params:
            site="{site}",
            round="{r}",
            local_iterations=get_local_iterations,
            loss=PLAN.default_combination,
            training=config["training"],
            patch_size=config["patches"]["size"],
            seed=config["seed"],
            attempts=config["federated"]["retries"] + 1,
            on_site_failure=config["federated"]["on_site_failure"],
        script:
            "../../scripts/train_site_round.py"

    rule aggregate_round:
        input:
            sites=get_round_sites,
            previous_global=get_previous_global,
        output:
            global_model="results/federated/{setting}/round_{r}/global.pt",
            record="results/federated/{setting}/round_{r}/record.json",
        log:
            "logs/aggregate_round/{setting}/round_{r}.log",
        benchmark:
            "results/benchmarks/aggregate_round/{setting}/round_{r}.tsv"
        conda:
            "../../envs/training.yaml"
        params:
            round="{r}",
            policy=config["federated"]["on_site_failure"],
        script:
            "../../scripts/aggregate_round.py"

else:

    rule run_round_block:
        input:
            unpack(get_block_inputs),
        output:
            block="results/federated/{setting}/block_{b}.json",
        log:
            "logs/run_round_block/{setting}/block_{b}.log",
        benchmark:
            "results/benchmarks/run_round_block/{setting}/block_{b}.tsv"
        conda:
            "../../envs/training.yaml"
        threads: len(SITES)
        resources:
            gpu=len(SITES),
        params:
            global_model=get_block_first_global,
            cases=get_block_cases,
            rounds=get_block_rounds,
            sites=SITES,
            local_iterations=get_local_iterations,
            loss=PLAN.default_combination,
            training=config["training"],
            patch_size=config["patches"]["size"],
            seed=config["seed"],
            attempts=config["federated"]["retries"] + 1,
            on_site_failure=config["federated"]["on_site_failure"],
        script:
            "../../scripts/run_round_block.py"


rule finalise_federation:
    input:
        get_federation_end,
        settings="results/preprocessed/settings.json",
    output:
        model="results/models/federated/{setting}/model.pt",
        csv="results/models/federated/{setting}/rounds.csv",
        png=report(
            "results/models/federated/{setting}/rounds.png",
            caption="../report/fig_federated_curves.rst",
            category="Training curves",
        ),
    log:
        "logs/finalise_federation/{setting}.log",
    conda:
        "../../envs/training.yaml"
    params:
        global_model=get_last_global,
        records=get_round_records,
        setting="{setting}",
    script:
        "../../scripts/finalise_federation.py"


# Each site's local best model (docs/federated.md, "Local validation and best-model selection"): written from
# the site's own last private state, one job per site; evaluation of federated/{setting} at a site with
# validation cases uses it (get_model_file), adaptation starts from model.pt (the final global model).
rule select_federated_model:
    input:
        unpack(get_selection_inputs),
        settings="results/preprocessed/settings.json",
    output:
        model="results/models/federated/{setting}/selected/{site}.pt",
    log:
        "logs/select_federated_model/{setting}/{site}.log",
    conda:
        "../../envs/training.yaml"
    params:
        private=get_final_private,
        global_model=get_last_global,
        setting="{setting}",
        site="{site}",
    script:
        "../../scripts/select_federated_model.py"
