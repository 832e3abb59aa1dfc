"""Run configuration: :class:`TrainConfig` (every setting declared once, with its group, help and
range), the recipe presets, and :func:`resolve_config`, where flags, a preset and a resumed run
become one checked config."""
from .schema import ConfigError, TrainConfig, load_preset, preset_names, resolve_config

__all__ = ["TrainConfig", "ConfigError", "resolve_config", "load_preset", "preset_names"]
