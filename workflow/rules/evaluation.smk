# Inference on each site's test split, back in the original geometry, and Dice/HD95 per case and organ.
# Model ids: pretrain, central/{losses}, federated/{setting}, site_alone, adapted/{mode} (docs/architecture.md).


rule predict_site:
    input:
        unpack(get_prediction_inputs),
        model=get_model_file,
    output:
        predictions=directory("results/evaluation/{model}/{site}/predictions"),
    log:
        "logs/predict_site/{model}/{site}.log",
    benchmark:
        "results/benchmarks/predict_site/{model}/{site}.tsv"
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        case_dir=get_case_dir,
        patch_size=config["patches"]["size"],
        step=config["inference"]["step"],
        mirror=config["inference"]["mirror"],
        resample=config["inference"].get("resample", "probabilities"),
    script:
        "../../scripts/predict_site.py"


rule evaluate_site:
    input:
        predictions="results/evaluation/{model}/{site}/predictions",
        manifest="results/data/{site}/manifest.json",
    output:
        metrics="results/evaluation/{model}/{site}/metrics.csv",
    log:
        "logs/evaluate_site/{model}/{site}.log",
    conda:
        "../../envs/data.yaml"
    params:
        model="{model}",
        site="{site}",
        hd95=config.get("evaluation", {}).get("hd95", "max"),
    script:
        "../../scripts/evaluate_site.py"
