"""Reading a config's text and YAML, with every way it can be refused as one ConfigError.

A config travels between sites (a recipe shared by another clinic, pasted from a forum), so it is
read as untrusted text: `yaml.safe_load` builds no objects, and aliases are bounded. PyYAML keeps
an alias as a second reference to one object, so nine anchors of nine aliases each (the "billion
laughs") load in microseconds but stand for 9^9 values; validating or printing them then hangs
and fills memory. `read_yaml` counts the values the tree stands for, each alias expanded, without
expanding anything (one visit per distinct object), and refuses more than `MAX_YAML_VALUES` or a
value that contains itself (`a: &a [*a]`). A real config holds a few hundred values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from embryo_ml.errors import ConfigError

MAX_YAML_VALUES = 100_000


def read_config_text(path: Path) -> str:
    """A config file's text; ConfigError (naming the file) when it is not UTF-8 or unreadable."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at "
                          f"offset {error.start}); save the config as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config ({error.strerror or error})") from None


def read_yaml(text: str, path: Path | None = None) -> Any:
    """`yaml.safe_load`, with every way it refuses text as one ConfigError: syntax errors, the
    ValueError/RecursionError PyYAML raises for an impossible date (`2024-13-01`), a bad `!!int`
    tag or thousands of nested brackets, and aliases that stand for too many values."""
    source = path or "--set"
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        reason = f"{error.__class__.__name__}{where}"
    except (ValueError, TypeError, RecursionError) as error:
        reason = f"{error.__class__.__name__}: {error}"
    else:
        _check_expanded_size(tree, source)
        return tree
    raise ConfigError(f"{source}: not valid YAML ({reason})")


def expanded_size(tree: Any, limit: int = MAX_YAML_VALUES) -> int:
    """How many values `tree` stands for with every alias copied out (a mapping's keys and
    values, a list's items, the containers themselves), counted once per distinct object; stops
    counting past `limit`. ValueError when a container contains itself."""
    sizes: dict[int, int] = {}
    open_now: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_now:
            raise ValueError("a value that contains itself")
        open_now.add(key)
        total = 1
        for child in (node if isinstance(node, list) else (*node.keys(), *node.values())):
            total += size(child)
            if total > limit:
                break
        open_now.discard(key)
        sizes[key] = total
        return total

    return size(tree)


def _check_expanded_size(tree: Any, source: object) -> None:
    try:
        count = expanded_size(tree)
    except ValueError as error:
        raise ConfigError(f"{source}: not valid as a config ({error}, made with a YAML alias); "
                          "write the values out") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid as a config (nested too deeply)") from None
    if count > MAX_YAML_VALUES:
        raise ConfigError(f"{source}: its YAML aliases (*name) stand for more than "
                          f"{MAX_YAML_VALUES:,} values, far more than any config holds (an alias "
                          "bomb?); write the values out")
