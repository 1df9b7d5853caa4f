"""datatailor: tailor instruction-tuning data to a target task and a target model.

The Python API (see `datatailor.api` and the README):

    import datatailor as dt
    run = dt.run(dt.load_recipe("examples/quickstart.yaml"), "runs/quickstart")
    run.records, run.failures, run.usage, run.to_pandas(), run.to_dataset()
    dt.evaluate(...), dt.compare(...), dt.train(...), dt.bakeoff(...)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Record", "Recipe", "RunOutput", "UserError", "bakeoff", "compare", "evaluate", "load_recipe", "load_run", "recipe_from_dict",
    "run", "run_async", "train", "__version__",
]

if TYPE_CHECKING:
    from datatailor.api import RunOutput, bakeoff, compare, evaluate, load_run, recipe_from_dict, run, run_async, train
    from datatailor.errors import UserError
    from datatailor.recipe import Recipe, load_recipe
    from datatailor.records import Record

_PACKAGES = ("evaluate", "train", "bakeoff")
_LAZY = {
    "RunOutput": "datatailor.api", "compare": "datatailor.api", "load_run": "datatailor.api",
    "recipe_from_dict": "datatailor.api", "run": "datatailor.api", "run_async": "datatailor.api",
    "UserError": "datatailor.errors", "Recipe": "datatailor.recipe", "load_recipe": "datatailor.recipe",
    "Record": "datatailor.records",
}


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import datatailor` (and the CLI's start-up) stays light.
    import importlib

    if name in _PACKAGES:  # subpackages that are also API functions (see datatailor._callable_package)
        return importlib.import_module(f"datatailor.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datatailor' has no attribute {name!r}")
