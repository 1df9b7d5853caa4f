"""`dt.evaluate`, `dt.train` and `dt.bakeoff` are API functions and also subpackages (`datatailor.train.rl`, …).

One name cannot be two objects, so each of those subpackages is made callable: `dt.train(...)` calls
`datatailor.api.train`, while `import datatailor.train.rl as rl` and `from datatailor.train import sft` work as for
any package. `inspect.signature(dt.train)` and `help` follow `__wrapped__` to the API function.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class CallablePackage(types.ModuleType):
    @property
    def __wrapped__(self) -> Any:
        from datatailor import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Make the (sub)package `module_name` call the API function of its last name."""
    sys.modules[module_name].__class__ = CallablePackage
