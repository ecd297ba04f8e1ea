"""Training glue shared by every task (see the module docstrings):

``errors`` user-facing errors; ``seeding`` deterministic randomness; ``data`` resumable samplers and
loader; ``optim`` parameter groups, lr scaling, schedules; ``module`` the base LightningModule;
``ema`` EMA with cache copying; ``callbacks`` last.ckpt owner and GRC logging; ``requeue`` SLURM
stop-and-requeue; ``models`` timm model factory; ``runner`` train/evaluate; ``cli`` command-line guards;
``rundir`` run directory names and keeping earlier runs; ``fingerprint`` the recipe and the refusal to
resume across recipes; ``perf`` throughput, ETA and GPU memory.

Importing this package only registers three OmegaConf resolvers, kept light on purpose:
``${ct_or:a,b}`` = a, or b when a is empty; ``${ct_job_dir:override_dirname,job_num}`` = the sweep
job's directory name: the override string with ``/`` replaced by ``_`` (``experiment=paper/...`` must
not nest directories), or ``job<num>`` when it is empty or too long for a file name (255 bytes);
``${ct_run_dir:run_name,model_name,seed,overrides}`` = a single run's directory name (``rundir``).
``${ct_tasks_per_node:gpus_per_node,trainer.devices}`` = SLURM tasks per node (:func:`tasks_per_node`).
"""
from omegaconf import OmegaConf

MAX_DIRNAME = 200


def job_dirname(overrides: str | None, job_num) -> str:
    """Deterministic, file-system-safe name of one sweep job's directory."""
    name = (overrides or "").replace("/", "_")
    if not name or len(name.encode()) > MAX_DIRNAME:
        return f"job{job_num}"
    return name


def tasks_per_node(gpus_per_node, devices) -> int:
    """One process per GPU when the job asks for GPUs, else one per ``trainer.devices`` (CPU DDP), else 1."""
    if gpus_per_node not in (None, "", "null") and int(gpus_per_node) > 0:
        return int(gpus_per_node)
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return max(len(devices), 1)
    try:
        return max(int(devices), 1)
    except (TypeError, ValueError):  # "auto" / -1 on a CPU job: one process
        return 1


if not OmegaConf.has_resolver("ct_or"):
    OmegaConf.register_new_resolver("ct_or", lambda a, b: a if a not in (None, "") else b)
if not OmegaConf.has_resolver("ct_job_dir"):
    OmegaConf.register_new_resolver("ct_job_dir", job_dirname)
if not OmegaConf.has_resolver("ct_tasks_per_node"):
    OmegaConf.register_new_resolver("ct_tasks_per_node", tasks_per_node)

from .rundir import register_resolver as _register_run_dir  # noqa: E402

_register_run_dir()
