"""What `datatailor batches --cancel` does to a run's pending batches (outside a run)."""

from __future__ import annotations

from datatailor.llm.batch.client import BatchClient
from datatailor.llm.batch.journal import METADATA_KEY, BatchJournal, LocalBatch
from datatailor.llm.config import OpenAIModel


async def cancel_batches(journal: BatchJournal, batches: list[LocalBatch]) -> list[str]:
    """Cancel each batch on its server (a batch whose creation was not recorded is looked up by its tag first); a
    batch never created is dropped, so a resumed run does not create it. Returns one line per batch."""
    lines: list[str] = []
    clients: dict[tuple[str, str, str | None], BatchClient] = {}
    try:
        for batch in batches:
            key = (batch.base_url, batch.model, batch.api_key_env)
            if key not in clients:
                config = OpenAIModel(model=batch.model, base_url=batch.base_url, api_key_env=batch.api_key_env, max_retries=2)
                clients[key] = BatchClient(config)
            client = clients[key]
            batch_id = batch.batch_id
            if batch_id is None and batch.file_id is not None:
                found = await client.find(METADATA_KEY, batch.tag, batch.planned_at)
                if found is not None:
                    batch_id = found["id"]
                    journal.append({"event": "created", "tag": batch.tag, "batch_id": batch_id,
                                    "created_at": found.get("created_at"), "status": found.get("status")})
            if batch_id is None:
                journal.append({"event": "dropped", "tag": batch.tag, "why": "cancelled before it was created"})
                lines.append(f"{batch.tag}: never created; dropped")
                continue
            info = await client.cancel(batch_id)
            journal.append({"event": "cancel", "tag": batch.tag})
            lines.append(f"{batch.tag}: {batch_id} {info.get('status', 'cancelling')}")
    finally:
        for client in clients.values():
            await client.aclose()
    return lines
