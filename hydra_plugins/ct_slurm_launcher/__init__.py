"""The project's SLURM launcher (``launcher.SlurmLauncher``), used by ``configs/hydra/launcher/slurm_*.yaml``.

It lives in the ``hydra_plugins`` namespace because Hydra only instantiates launchers from there.
"""
