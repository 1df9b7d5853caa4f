"""Provider batch APIs (OpenAI's Batch API and servers that copy it): any role at the batch price, resumable.

A role with `batch: true` gets a `BatchedBackend` (backend.py): the same `complete(request)` as every backend, but
each call waits for the batch that answers it. The run's `BatchHub` (hub.py) collects the calls that stages make,
submits them as batches, polls them and resolves each call by its custom_id; `BatchJournal` (journal.py) keeps
every batch's files, ids and owners in the run directory's `batches/` so that a killed run resumes without
submitting anything twice; `BatchClient` (client.py) speaks the files and batches endpoints; results.py reads the
output and error files. The user's guide is docs/batch.md.
"""

from datatailor.llm.batch.backend import BatchedBackend, custom_id, worst_case
from datatailor.llm.batch.hub import BatchHub
from datatailor.llm.batch.journal import BatchJournal, LocalBatch

__all__ = ["BatchHub", "BatchJournal", "BatchedBackend", "LocalBatch", "custom_id", "worst_case"]
