"""Every experiment file resolves to exactly the config recorded in ``tests/data/experiment_snapshot.yaml``.

The experiment files hold only what makes their row different; the recipes live once in
``configs/recipe/``. This test is the guard that moving a value between the two (or editing a recipe,
a task default or a model file) does not silently change what a paper row trains: each experiment is
composed from ``configs/train.yaml`` with ``experiment=<name>`` and the fixed overrides below, resolved,
and compared with the snapshot; a difference fails with a unified diff of the two YAML texts.

A change that is meant to alter the resolved configs (a new config key, a new experiment file, a
corrected recipe value) updates the snapshot after the diff has been reviewed:

    PYTHONPATH=. python tests/test_experiment_snapshot.py          # rewrite the snapshot
    git diff tests/data/experiment_snapshot.yaml                    # review what changed
"""
from __future__ import annotations

import difflib
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import CONFIG_DIR, compose_config  # noqa: E402

SNAPSHOT = Path(__file__).resolve().parent / "data" / "experiment_snapshot.yaml"
# Values the snapshot must not depend on: the data folder and Hydra's run directory (a ${hydra:...}
# interpolation outside a Hydra app).
FIXED_OVERRIDES = ("data.root=/snapshot/data", "paths.run_dir=/snapshot/run")


def experiment_names() -> list[str]:
    root = CONFIG_DIR / "experiment"
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolved_experiment(name: str) -> dict:
    """The resolved config of ``train.py experiment=<name>`` (``???`` kept for values the user must give)."""
    from omegaconf import OmegaConf

    cfg = compose_config([f"experiment={name}", *FIXED_OVERRIDES])
    OmegaConf.resolve(cfg)  # an interpolation of a ??? value becomes ??? itself
    return OmegaConf.to_container(cfg, throw_on_missing=False)


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=True, default_flow_style=False, width=120)


def write_snapshot(path: Path = SNAPSHOT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot = {name: resolved_experiment(name) for name in experiment_names()}
    header = ("# Resolved config of every experiment (tests/test_experiment_snapshot.py).\n"
              "# Regenerate with `PYTHONPATH=. python tests/test_experiment_snapshot.py`, then review the diff.\n")
    path.write_text(header + dump(snapshot))


@pytest.fixture(scope="module")
def snapshot() -> dict:
    if not SNAPSHOT.is_file():
        pytest.fail(f"{SNAPSHOT} is missing; write it with `PYTHONPATH=. python {Path(__file__).name}`.")
    return yaml.safe_load(SNAPSHOT.read_text())


def test_snapshot_lists_every_experiment(snapshot):
    names = experiment_names()
    assert sorted(snapshot) == names, (
        f"experiment files and snapshot differ: new {sorted(set(names) - set(snapshot))}, "
        f"gone {sorted(set(snapshot) - set(names))}; regenerate the snapshot (see the module docstring)")


@pytest.mark.parametrize("name", experiment_names())
def test_experiment_resolves_to_the_snapshot(name, snapshot):
    if name not in snapshot:
        pytest.fail(f"{name} is not in the snapshot; regenerate it (see the module docstring)")
    want, got = dump(snapshot[name]), dump(resolved_experiment(name))
    if want != got:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                            f"snapshot:{name}", f"now:{name}", n=2))
        pytest.fail(f"experiment={name} no longer resolves to its snapshot:\n{diff}", pytrace=False)


if __name__ == "__main__":
    write_snapshot()
    print(f"wrote {SNAPSHOT} ({len(experiment_names())} experiments)")
