"""Stage registry. Every module in this package registers its stages on import."""

from __future__ import annotations

import importlib
import pkgutil

from datatailor.stages.base import STAGES, BatchResult, BatchStage, FilterStage, MapStage, Stage, StageConfig, StageContext, register

_loaded = False


def load_all() -> dict[str, type[Stage]]:
    """Import every stage module once, so that all `@register` decorators have run."""
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True
    return STAGES


__all__ = ["STAGES", "BatchResult", "BatchStage", "FilterStage", "MapStage", "Stage", "StageConfig", "StageContext", "load_all", "register"]
