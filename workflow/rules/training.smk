# Centrally trained models: M0 on the fully labelled site, the central upper bound per loss combination,
# Table 3's baselines (PaNN, PIPO),
# and each site alone. Training rules declare a GPU so a cluster profile requests one for them only.


rule pretrain:
    input:
        data=PLAN.sites_inputs(PLAN.full_sites),
        settings="results/preprocessed/settings.json",
    output:
        model="results/models/pretrain/model.pt",
        curve_csv="results/models/pretrain/curve.csv",
        curve_png=report(
            "results/models/pretrain/curve.png",
            caption="../report/training_curve.rst",
            category="Training curves",
        ),
    log:
        "logs/pretrain/pretrain.log",
    benchmark:
        "results/benchmarks/pretrain/pretrain.tsv"
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        kind="pretrain",
        sites=[PLAN.site_descriptor(s) for s in PLAN.full_sites],
        loss=PLAN.default_combination,
        epochs=config["training"]["pretrain_epochs"],
        freeze_mode="full",
        organs=list(ORGANS),
        network=config["network"],
        training=config["training"],
        patch_size=config["patches"]["size"],
        seed=config["seed"],
    script:
        "../../scripts/train_model.py"


rule train_central:
    input:
        init="results/models/pretrain/model.pt",
        data=PLAN.sites_inputs(SITES),
        settings="results/preprocessed/settings.json",
    output:
        model="results/models/central/{losses}/model.pt",
        curve_csv="results/models/central/{losses}/curve.csv",
        curve_png=report(
            "results/models/central/{losses}/curve.png",
            caption="../report/training_curve.rst",
            category="Training curves",
        ),
    log:
        "logs/train_central/{losses}.log",
    benchmark:
        "results/benchmarks/train_central/{losses}.tsv"
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        kind="central",
        sites=[PLAN.site_descriptor(s) for s in SITES],
        loss=get_loss,
        epochs=config["training"]["central_epochs"],
        freeze_mode="full",
        organs=list(ORGANS),
        network=config["network"],
        training=config["training"],
        patch_size=config["patches"]["size"],
        seed=config["seed"],
    script:
        "../../scripts/train_model.py"


rule train_site_alone:
    input:
        unpack(get_site_data),
        settings="results/preprocessed/settings.json",
    output:
        model="results/models/site_alone/{site}/model.pt",
        curve_csv="results/models/site_alone/{site}/curve.csv",
        curve_png=report(
            "results/models/site_alone/{site}/curve.png",
            caption="../report/training_curve.rst",
            category="Training curves",
        ),
    log:
        "logs/train_site_alone/{site}.log",
    benchmark:
        "results/benchmarks/train_site_alone/{site}.tsv"
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        kind="site_alone",
        sites=get_site_descriptor,
        loss=get_site_alone_loss,
        epochs=config["training"]["site_alone_epochs"],
        freeze_mode="full",
        organs=get_site_organs,
        network=config["network"],
        training=config["training"],
        patch_size=config["patches"]["size"],
        seed=config["seed"],
    script:
        "../../scripts/train_model.py"


rule organ_prior:
    input:
        data=PLAN.sites_inputs(PLAN.full_sites[:1]),
    output:
        prior="results/models/baseline/panns/prior.json",
    log:
        "logs/organ_prior/panns.log",
    conda:
        "../../envs/training.yaml"
    params:
        site=PLAN.site_descriptor(PLAN.full_sites[0]),
        patch_size=config["patches"]["size"],
        patches=config.get("baselines", {}).get("panns", {}).get("prior_patches", 200),
        seed=config["seed"],
    script:
        "../../scripts/organ_prior.py"


rule train_baseline:
    input:
        unpack(get_baseline_inputs),
        data=PLAN.sites_inputs(SITES),
        settings="results/preprocessed/settings.json",
    output:
        model="results/models/baseline/{method}/model.pt",
        curve_csv="results/models/baseline/{method}/curve.csv",
        curve_png=report(
            "results/models/baseline/{method}/curve.png",
            caption="../report/training_curve.rst",
            category="Training curves",
        ),
    log:
        "logs/train_baseline/{method}.log",
    benchmark:
        "results/benchmarks/train_baseline/{method}.tsv"
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        kind="baseline",
        sites=[PLAN.site_descriptor(s) for s in SITES],
        loss=get_baseline_loss,
        epochs=get_baseline_epochs,
        freeze_mode="full",
        organs=list(ORGANS),
        network=get_baseline_network,
        training=config["training"],
        patch_size=config["patches"]["size"],
        seed=config["seed"],
    script:
        "../../scripts/train_model.py"
