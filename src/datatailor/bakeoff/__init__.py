"""The bake-off: every method at the same budget on the same seeds, each target tuned and judged, one table.

`datatailor bakeoff CONFIG --out DIR`. The pieces: `config` (what a user writes), `split` (seed part and
evaluation part of each test set), `run` (the steps, each an ordinary resumable run), `stats` (bootstrap
intervals over test items) and `report` (the table).
"""

from datatailor._callable_package import make_callable  # noqa: E402

make_callable(__name__)  # dt.bakeoff(...) calls datatailor.api.bakeoff
