"""`datatailor view`: a local, read-only web app over run directories and bake-off folders.

The parts, each its own module:

    folders.py   what a folder is (a run, a bake-off) and what its files say: status, stages, usage, recipe
    index.py     the on-disk index of a run's records (SQLite + FTS5 in a cache folder), built by streaming the
                 run's files in a background thread and extended as a live run's checkpoints grow
    query.py     the records table's filters, search and pages, read from the index and the run's files
    evidence.py  each method's evidence in a record (CodecLM, REFED, CoachLM, TeaMs-RL, a pairwise judge),
                 ready for a page, with word diffs
    compare.py   two runs side by side: the same id in both, and their distributions
    bakeoff.py   a bake-off folder: its table, and each cell's judged items
    app.py       the Starlette routes and Jinja2 pages (templates/, static/: no CDN, no build step)
    server.py    binding (127.0.0.1 unless told otherwise, loudly) and serving with uvicorn

Only `flags.jsonl` (the review flags, see `datatailor.stages.flags`) is ever written into a run directory.
The web parts need the `view` extra (`pip install 'datatailor[view]'`).
"""
