# fedpsmos: federated partially supervised multi-organ segmentation with site adaptation.
# Stages in pipeline order; every rule wires files to one function of the `fedpsmos` package.
import sys

from snakemake.utils import min_version

min_version("9.0")

# Long chains of federated rounds recurse deeply while Snakemake builds the DAG.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/federated.smk"
include: "workflow/rules/adaptation.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/paper.smk"


rule all:
    default_target: True
    input:
        PLAN.final_output(),
