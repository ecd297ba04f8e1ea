"""Reproducing the paper: its tables as data, sweeps, comparison of logged runs, figures, throughput.

Modules (the scripts in ``scripts/`` are thin wrappers around them; see docs/reproduce.md):

``tables``          the paper's tables (``tables.yaml``): ``load_tables()``, ``get_table(n).value(row, variant, metric)``
``sweep``           one Hydra multirun command per paper table (``scripts/sweep.py``)
``sweep_status``    SLURM job states of a submitted sweep (``scripts/sweep.py --status``)
``runs``            reading run directories: ``.hydra/config.yaml``, ``csv/metrics.csv``, wandb offline runs
``wandb_offline``   a reader for wandb's offline ``run-*.wandb`` files (no wandb server needed)
``compare``         grouping seeds, comparing with the paper, markdown and PNG (``scripts/compare.py``)
``figures``         Fig. 5 (sigma(lambda) per layer/head) and Fig. 4 (o_self / o_mem maps) (``scripts/figures.py``)
``throughput``      the throughput table (``python -m tasks.paper.throughput``; ``scripts/benchmark.py``)

Importing this package imports nothing heavy (no torch, no Lightning).
"""
