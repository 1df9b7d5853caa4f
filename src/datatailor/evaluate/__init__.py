"""Evaluation: pairwise judging, win-rate metrics, data quality, diversity, contamination, privacy."""

from datatailor._callable_package import make_callable  # noqa: E402

make_callable(__name__)  # dt.evaluate(...) calls datatailor.api.evaluate
