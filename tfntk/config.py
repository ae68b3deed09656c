"""Gin set-up: which modules define configurables, parsing with clear errors, saving the config.

Only plain `import gin` is used: `gin.tf` imports `tf.estimator`, which TensorFlow 2.16 and
newer no longer ship.
"""

from __future__ import annotations

import difflib
import inspect
import re
import tokenize
from typing import Sequence

import gin

from tfntk import storage


class ConfigError(ValueError):
    """A gin file or binding is missing, unknown or malformed."""


def register_configurables() -> None:
    """Imports every module that defines a gin configurable, so bindings can be checked."""
    # pylint: disable=import-outside-toplevel,unused-import
    from tfntk.experiments import curvature, kernel_dynamics, linearized, main_job, motion, sections  # noqa: F401
    from tfntk.reporting import motion_figures  # noqa: F401
    from tfntk.training import loop  # noqa: F401


def parse(gin_files: Sequence[str], gin_params: Sequence[str]) -> None:
    """Parses gin files then bindings; raises ConfigError with gin's message on any problem.

    Unknown configurables and parameters, malformed values and missing files are all reported
    here, before any training.
    """
    register_configurables()
    for path in gin_files:
        if not storage.exists(path):
            raise ConfigError(f"Gin file not found: {path}; pass an existing file to --gin_file (presets are in gin/).")
    errors = (ValueError, KeyError, SyntaxError, TypeError, IOError, tokenize.TokenError)
    try:
        gin.parse_config_files_and_bindings(list(gin_files), [], finalize_config=False)
    except errors as error:
        message = " ".join(str(error).split())
        raise ConfigError(
            f"Invalid gin configuration in {', '.join(gin_files)}: {message}; {_fix_hint(message)}"
        ) from error
    for binding in gin_params:
        try:
            gin.parse_config(binding)
        except errors as error:
            message = " ".join(str(error).split())
            raise ConfigError(
                f"Invalid gin configuration in --gin_param {binding!r}: {message}; {_fix_hint(message)}"
            ) from error


UNKNOWN_PARAMETER = re.compile(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'")


def _fix_hint(message: str) -> str:
    """Returns what to do about a rejected binding, with close parameter names from gin's registry."""
    unknown = UNKNOWN_PARAMETER.search(message)
    if unknown is None:
        return "write bindings as 'Configurable.parameter = value'."
    configurable, parameter = unknown.groups()
    try:
        # NOTE: gin's registry is internal API (gin-config 0.5); without it the hint is generic.
        wrapped = gin.config._REGISTRY.get_match(configurable).wrapped  # pylint: disable=protected-access
        names = list(inspect.signature(wrapped).parameters)
    except (AttributeError, KeyError, TypeError, ValueError):
        return f"check the parameter names of {configurable}."
    close = difflib.get_close_matches(parameter, names, n=3)
    if close:
        return f"did you mean {', '.join(f'{configurable}.{name}' for name in close)}?"
    return f"{configurable} takes {', '.join(names)}."


def save_operative_config(path: str) -> None:
    """Writes gin's operative config (every parameter actually used, with its value)."""
    storage.write_text_atomic(path, gin.operative_config_str())
