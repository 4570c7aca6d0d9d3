"""Reading YAML configuration files: values only, errors that name the file."""

from __future__ import annotations

from pathlib import Path

import yaml

from tilscore.errors import UsageError


def read_yaml_mapping(path: str | Path) -> dict:
    """The top-level mapping of YAML file `path` (an empty file gives {})."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise UsageError(f"config not found: {path}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save "
                         "the config as UTF-8") from exc
    except OSError as exc:  # a folder, no permission, ...
        raise UsageError(f"{path}: cannot read the config ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of keys to values")
    return raw
