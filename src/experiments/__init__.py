"""This project's recipes, merged with every other `experiments` in the environment.

Metta keeps its recipes in an `experiments` package too: a regular package in September 2025, which Metta's editable
install serves through an import hook rather than a path entry, and a plain folder in current Metta. Python merges
neither with another copy, so this package extends its own path: installing this project never hides Metta's
recipes. Here this project's folder comes first, so that `experiments.recipes` is the merging package below; inside
it Metta's folders come first, so that Metta's recipe wins where both have a module of the same name.
"""

import importlib.machinery
import pkgutil
import sys


def other_portions(name: str, own: list[str]) -> list[str]:
    """The folders of package `name` outside `own`: on the parent's path, and (top level) behind import hooks."""
    found = pkgutil.extend_path(list(own), name)[len(own) :]
    if "." not in name:
        for finder in sys.meta_path:
            if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, None)
            found += [p for p in (spec and spec.submodule_search_locations) or () if p not in own + found]
    return found


__path__ = [*__path__, *other_portions(__name__, __path__)]
