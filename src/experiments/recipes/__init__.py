"""Recipes: Metta's first, then this project's (see `experiments`)."""

from experiments import other_portions

__path__ = [*other_portions(__name__, __path__), *__path__]
