"""The exception tree shared by every freedeploy package.

::

    FreedeployError                 exit code 1   anything freedeploy raises on purpose
    ├── ConfigError                 exit code 2   options that are wrong or contradict each other
    ├── DataError                   exit code 3   a data set that is missing, empty or malformed
    ├── ModelError                  exit code 4   an unknown model, bad exit positions, a broken run dir
    ├── BundleError                 exit code 5   a bundle that is missing, corrupt or from the future
    ├── BackendUnavailableError     exit code 6   a backend whose package or device is absent
    ├── ExportError                 exit code 7   an export or engine build that failed
    │   └── ValidationError         exit code 8   exported files that disagree with torch
    ├── CalibrationError            exit code 9   thresholds that cannot be certified as asked
    └── InputError                  exit code 10  inputs handed to the runtime that it cannot use

Messages say what was expected, what was found and what to do. The CLI prints them as one line
and exits with the code above; ``--debug`` shows the traceback.
"""

from __future__ import annotations

__all__ = [
    "FreedeployError",
    "ConfigError",
    "DataError",
    "ModelError",
    "BundleError",
    "BackendUnavailableError",
    "ExportError",
    "ValidationError",
    "CalibrationError",
    "InputError",
]


class FreedeployError(Exception):
    """Root of every error freedeploy raises on purpose."""

    exit_code = 1


class ConfigError(FreedeployError):
    exit_code = 2


class DataError(FreedeployError):
    exit_code = 3


class ModelError(FreedeployError):
    exit_code = 4


class BundleError(FreedeployError):
    exit_code = 5


class BackendUnavailableError(FreedeployError):
    exit_code = 6


class ExportError(FreedeployError):
    exit_code = 7


class ValidationError(ExportError):
    exit_code = 8


class CalibrationError(FreedeployError):
    exit_code = 9


class InputError(FreedeployError):
    exit_code = 10
