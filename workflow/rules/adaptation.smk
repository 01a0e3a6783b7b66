# Site adaptation of the final federated model: all layers (full), decoder only, encoder only.
# Each (mode, site) is its own target: rerunning one touches nothing else.


rule adapt_model:
    input:
        unpack(get_site_data),
        init=f"results/models/federated/{PLAN.default_setting}/model.pt",
        settings="results/preprocessed/settings.json",
    output:
        model="results/models/adapted/{mode}/{site}/model.pt",
        curve_csv="results/models/adapted/{mode}/{site}/curve.csv",
        curve_png=report(
            "results/models/adapted/{mode}/{site}/curve.png",
            caption="../report/training_curve.rst",
            category="Training curves",
        ),
    log:
        "logs/adapt_model/{mode}/{site}.log",
    benchmark:
        "results/benchmarks/adapt_model/{mode}/{site}.tsv"
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        kind="adapted",
        sites=get_site_descriptor,
        loss=PLAN.default_combination,
        epochs=config["adaptation"]["epochs"],
        freeze_mode=get_adaptation_freeze,
        organs=list(ORGANS),
        network=config["network"],
        training=config["training"],
        patch_size=config["patches"]["size"],
        seed=config["seed"],
    script:
        "../../scripts/train_model.py"
