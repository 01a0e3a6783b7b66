# The paper's tables (2-6) and figures from every evaluated model's metrics (each one is an input, so
# `snakemake paper` builds whatever is missing first).


rule make_tables:
    input:
        metrics=PLAN.all_metrics(),
        benchmarks=PLAN.table5_benchmark_list(),
    output:
        tables=[
            report(
                f"results/paper/table{n}.{ext}",
                caption=f"../report/table{n}.rst",
                category="Tables",
                labels={"table": f"Table {n}", "format": ext.upper()},
            )
            for n in [2, 3, 4, 5, 6]
            for ext in ["csv", "md", "tex"]
        ],
    log:
        "logs/make_tables/make_tables.log",
    conda:
        "../../envs/plotting.yaml"
    params:
        central_losses=PLAN.central_losses,
        margexc=config["losses"]["margexc"],
        default_losses=PLAN.default_losses,
        settings=PLAN.settings,
        default_setting=PLAN.default_setting,
        modes=PLAN.modes,
        benchmarks=PLAN.table5_benchmarks(),
        hd95=config.get("evaluation", {}).get("hd95", "max"),
        budgets=PLAN.budgets(),
        baselines=PLAN.baselines,
    script:
        "../../scripts/make_tables.py"


rule make_figures:
    input:
        metrics=PLAN.all_metrics(),
        predictions=PLAN.all_predictions(),
        manifests=expand("results/data/{site}/manifest.json", site=SITES),
        curves=PLAN.training_curves(),
        federated_curves=PLAN.federated_curves(),
    output:
        dice=report(
            "results/paper/fig_dice_per_organ.png",
            caption="../report/fig_dice_per_organ.rst",
            category="Figures",
            labels={"figure": "Dice per organ and model"},
        ),
        qualitative=report(
            "results/paper/fig_qualitative.png",
            caption="../report/fig_qualitative.rst",
            category="Figures",
            labels={"figure": "Qualitative results"},
        ),
        federated=report(
            "results/paper/fig_federated_curves.png",
            caption="../report/fig_federated_curves.rst",
            category="Figures",
            labels={"figure": "Federated training curves"},
        ),
        training=report(
            "results/paper/fig_training_curves.png",
            caption="../report/fig_training_curves.rst",
            category="Figures",
            labels={"figure": "Training curves"},
        ),
    log:
        "logs/make_figures/make_figures.log",
    conda:
        "../../envs/plotting.yaml"
    params:
        qualitative_models=PLAN.qualitative_models(),
    script:
        "../../scripts/make_figures.py"


rule paper:
    input:
        PLAN.paper_outputs(),
