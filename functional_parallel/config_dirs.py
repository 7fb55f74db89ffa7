"""Where named config files (strategies, meshes) are found: Hydra's search path, then the project's `conf/`.

A researcher adds a strategy or a mesh as one YAML file, in `conf/<group>/` or in a config dir of
their own put on Hydra's search path (`hydra.searchpath=[file:///my/conf]`); no code names them.
"""
from __future__ import annotations

from pathlib import Path

import yaml

PROJECT_CONF = Path(__file__).resolve().parent.parent / "conf"


def config_dirs(group: str) -> list[Path]:
    """`<dir>/<group>` for each file config dir on the running Hydra app's search path, then the project's."""
    dirs = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            dirs = [Path(source.path) / group for source in HydraConfig.get().runtime.config_sources
                    if source.schema == "file"]
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    return [d for d in dict.fromkeys([*dirs, PROJECT_CONF / group]) if d.is_dir()]


def names(group: str) -> list[str]:
    """Every config name of `group` (sorted)."""
    return sorted({p.stem for d in config_dirs(group) for p in d.glob("*.yaml")})


def find(group: str, name: str) -> Path:
    """The YAML file `name` of `group`, or a ValueError listing the names there are."""
    for directory in config_dirs(group):
        path = directory / f"{name}.yaml"
        if path.exists():
            return path
    raise ValueError(f"unknown {group} {name!r}; expected one of {names(group)}")


def load(group: str, name: str):
    """The parsed YAML of `name` in `group`."""
    return yaml.safe_load(find(group, name).read_text())
