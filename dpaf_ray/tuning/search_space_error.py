"""The error of a search that cannot run as asked, naming the search-space file, the YAML key and the fix.

It is raised by the checks of a search-space file (`search_space`), of the hardware it asks for
(`resources`) and of the plans its knobs give (`reference.check_space_fits`). It sits below all of
them, so each imports it downward (`resources` and `search_space` used to reach each other).
"""
from __future__ import annotations

from ..config import ConfigError


class SearchSpaceError(ConfigError):
    """A search that cannot run as the file (and the tune.py flags) ask; the CLI exits 2 with the message."""


def key_error(path: str, key: str, msg: str) -> SearchSpaceError:
    """The error for one key of the file at `path`: "PATH: `KEY`: what is wrong and the fix"."""
    return SearchSpaceError(f"{path}: `{key}`: {msg}")
