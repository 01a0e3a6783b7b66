"""Training (docs/design.md "Training"): patch sampling and augmentation, the plateau lr rule, checkpoints,
the trainer and its curves. Modules, one concept each:

- ``site_data``: :class:`SiteData` (a site's training cases and patch index, from its manifest).
- ``sampler``: :class:`PatchSampler` (a site in proportion to its training cases, then a patch-index row
  uniformly).
- ``augmentation``: nnU-Net-style augmentation drawn from the sampler's generator.
- ``loader``: batches made by background worker processes (:class:`BatchLoader`), the trainer's feed.
- ``schedule``: :class:`PlateauDecay`, the paper's lr x0.8 on a 10-epoch loss plateau.
- ``checkpoint``: weights-only checkpoints with tensor integrity records (``save_checkpoint``,
  ``load_checkpoint``, ``CheckpointError``).
- ``trainer``: :class:`TrainSettings`, :class:`Trainer` (iterations, the plateau step, a resumable state).
- ``epochs``: :func:`train_model` (resumable epochs, best-epoch selection, the written model and curve).
- ``curves``: the per-epoch CSV and PNG.
- ``run``: :func:`train_from_params`, the training rules' entry point.

Import from the submodules; this package does not import torch-heavy code eagerly.
"""
