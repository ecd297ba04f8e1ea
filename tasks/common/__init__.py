"""Training glue shared by every task (see the module docstrings):

``errors`` user-facing errors; ``seeding`` deterministic randomness; ``data`` resumable samplers and
loader; ``optim`` parameter groups, lr scaling, schedules; ``module`` the base LightningModule;
``ema`` EMA with cache copying; ``callbacks`` last.ckpt owner and GRC logging; ``models`` timm model
factory; ``runner`` train/evaluate; ``cli`` command-line guards.

Importing this package only registers the OmegaConf resolver ``ct_or`` (``${ct_or:a,b}`` = a, or b
when a is empty), used by the Hydra sweep directory; it is kept light on purpose.
"""
from omegaconf import OmegaConf

if not OmegaConf.has_resolver("ct_or"):
    OmegaConf.register_new_resolver("ct_or", lambda a, b: a if a not in (None, "") else b)
