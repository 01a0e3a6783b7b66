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
        background=get_site_background,
        ignore=get_site_ignore,
        files=get_site_files,
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


rule site_fingerprint:
    input:
        manifest="results/data/{site}/manifest.json",
    output:
        fingerprint="results/data/{site}/fingerprint.json",
    log:
        "logs/site_fingerprint/{site}.log",
    conda:
        "../../envs/data.yaml"
    script:
        "../../scripts/site_fingerprint.py"


rule merge_fingerprints:
    input:
        sites=expand("results/data/{site}/fingerprint.json", site=SITES),
    output:
        fingerprint="results/data/fingerprint.json",
    log:
        "logs/merge_fingerprints.log",
    conda:
        "../../envs/data.yaml"
    script:
        "../../scripts/merge_fingerprints.py"


rule preprocessing_settings:
    input:
        unpack(get_fingerprint_input),
    output:
        settings="results/preprocessed/settings.json",
    log:
        "logs/preprocessing_settings.log",
    conda:
        "../../envs/data.yaml"
    params:
        preprocessing=config["preprocessing"],
    script:
        "../../scripts/preprocessing_settings.py"


rule preprocess_case:
    input:
        manifest="results/data/{site}/manifest.json",
        settings="results/preprocessed/settings.json",
    output:
        case="results/preprocessed/{site}/{case}.b2zip",
    log:
        "logs/preprocess_case/{site}/{case}.log",
    conda:
        "../../envs/data.yaml"
    params:
        case="{case}",
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
