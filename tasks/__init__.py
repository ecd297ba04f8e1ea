"""Benchmarks built on the ``cached_transformers`` library: one package per benchmark family.

``tasks.common`` holds the training glue every task shares (optimizer groups, schedules, callbacks,
checkpoint/resume, loggers, run directories); ``tasks.classification`` is ImageNet. A task package
exposes ``build_task(cfg) -> (LightningModule, LightningDataModule)``, named by ``task.builder`` in
its config; ``train.py`` and ``eval.py`` need nothing else from it. The library never imports a task
and a task never reaches into another task.
"""
