"""Run configuration: :class:`TrainConfig` (every setting declared once, with its group, help and
range; :mod:`~arow.config.schema`), the recipe presets (:mod:`~arow.config.presets`), and the one
resolver (:mod:`~arow.config.plan`): :func:`resolve_config` puts flags, a preset and a resumed run
together, :func:`resolve` fills the defaults that depend on other settings and checks the result."""
from .plan import (derived_defaults, ensure_resolved, is_resolved, method_flag_help, method_flags, resolve,
                   resolve_config, saved_config)
from .presets import load_preset, preset_description, preset_names, preset_summary
from .schema import ConfigError, TrainConfig, opt

__all__ = ["TrainConfig", "ConfigError", "opt", "resolve_config", "resolve", "ensure_resolved", "is_resolved",
           "derived_defaults", "saved_config", "method_flags", "method_flag_help", "load_preset", "preset_names",
           "preset_summary", "preset_description"]
