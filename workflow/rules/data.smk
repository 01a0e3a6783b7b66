# Sites -> validated manifests -> preprocessed cases -> patch indices. Each rule reads one site's data only.


rule make_synthetic_site:
    output:
        root=directory("results/raw/{site}"),
    log:
        "logs/make_synthetic_site/{site}.log",
    conda:
        "../../envs/data.yaml"
    params:
        site="{site}",
        spec=get_synthetic_spec,
        labels=get_site_labels,
        seed=config["seed"],
    script:
        "../../scripts/make_synthetic_site.py"


rule validate_site:
    input:
        raw=get_raw_site,
    output:
        manifest="results/data/{site}/manifest.json",
    log:
        "logs/validate_site/{site}.log",
    conda:
        "../../envs/data.yaml"
    params:
        site="{site}",
        source=get_site_source,
        root=get_site_root,
        labels=get_site_labels,
        split=get_site_split,
        seed=config["seed"],
    script:
        "../../scripts/validate_site.py"


rule plot_site_preview:
    input:
        manifest="results/data/{site}/manifest.json",
    output:
        png=report(
            "results/data/{site}/preview.png",
            caption="../report/preview.rst",
            category="Data",
            subcategory="{site}",
        ),
    log:
        "logs/plot_site_preview/{site}.log",
    conda:
        "../../envs/data.yaml"
    script:
        "../../scripts/plot_site_preview.py"


rule preprocess_case:
    input:
        manifest="results/data/{site}/manifest.json",
    output:
        npz="results/preprocessed/{site}/{case}.npz",
    log:
        "logs/preprocess_case/{site}/{case}.log",
    conda:
        "../../envs/data.yaml"
    params:
        case="{case}",
        labels=get_site_labels,
        spacing=config["preprocessing"]["spacing"],
        image_order=config["preprocessing"]["image_order"],
        clip=config["preprocessing"]["clip"],
        mean=config["preprocessing"]["mean"],
        std=config["preprocessing"]["std"],
    script:
        "../../scripts/preprocess_case.py"


rule index_patches:
    input:
        manifest="results/data/{site}/manifest.json",
        cases=get_site_npz,
    output:
        index="results/patches/{site}.parquet",
    log:
        "logs/index_patches/{site}.log",
    conda:
        "../../envs/data.yaml"
    params:
        patch_size=config["patches"]["size"],
        min_fraction=config["patches"]["min_fraction"],
        candidates_per_case=config["patches"]["candidates_per_case"],
        seed=config["seed"],
    script:
        "../../scripts/index_patches.py"
