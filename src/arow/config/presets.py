"""Recipe presets: the built-in YAML recipes (``arow list``), a YAML file of your own, or a run's
``config.json`` replayed; read with a YAML loader that refuses a key given twice.

>>> "fmnist-arow" in preset_names()
True
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .schema import ConfigError, TrainConfig


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def preset_names() -> list[str]:
    """The built-in presets, sorted (``arow list``)."""
    files = resources.files("arow") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """The ``description`` of a built-in preset (``arow list`` shows :func:`preset_summary`)."""
    text = (resources.files("arow") / "presets" / f"{name}.yaml").read_text()
    return str((yaml.safe_load(text) or {}).get("description", ""))


def preset_summary(name: str, width: int = 100) -> str:
    """The first sentence (or clause) of a built-in preset's description on one line, cut at a word
    boundary with `` ...`` when longer than ``width`` characters (what ``arow list`` shows)."""
    desc = " ".join(preset_description(name).split())
    first = re.split(r"(?<!et al)\. (?=[A-Z])|: ", desc)[0]
    return first if len(first) <= width else first[:width - 3].rsplit(" ", 1)[0] + " ..."


def load_preset(name_or_path: str) -> dict[str, Any]:
    """The settings of a preset by name (``arow list``), of a YAML file by path, or of a run's
    ``config.json`` (which replays the run); unknown keys and wrong types are refused here."""
    path = Path(name_or_path)
    if path.suffix == ".json":  # a run's config.json replays the run
        return _run_config(path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        text = _read_text(path, "preset file")
    else:
        res = resources.files("arow") / "presets" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r}; choose one of: {', '.join(preset_names())}")
        text = res.read_text()
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {name_or_path}: not valid YAML ({e})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name_or_path}: expected a mapping of config keys")
    data.pop("description", None)
    TrainConfig.from_dict({k: v for k, v in data.items()})  # reject unknown keys early
    return data


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 (or unreadable) is one line naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") \
            from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read ({e.strerror or e})") from None


def _run_config(path: Path) -> dict[str, Any]:
    """The settings of a run's ``config.json`` (what the run derived, ``resolved``, left out)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(_read_text(path, "config file"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    data.pop("resolved", None)  # what the run derived, recorded for reading, not a setting
    TrainConfig.from_dict(data)
    return data
