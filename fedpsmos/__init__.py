"""fedpsmos: federated partially supervised multi-organ segmentation with site adaptation.

The package holds the logic of the workflow; the Snakemake rules and ``scripts/`` only wire files to it.
Stages follow the paper (Liu et al., "Multi-site Organ Segmentation with Federated Partial Supervision and
Site Adaptation"): data -> preprocessing -> patches -> training (pretrain, central, site alone) -> federated
rounds -> site adaptation -> inference -> evaluation -> paper tables and figures.
"""

__version__ = "0.1.0"
