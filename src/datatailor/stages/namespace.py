"""A method's per-record data: one typed namespace under `metadata["<method>"]`.

Each method keeps what it adds to a record in one pydantic model stored as a dict under its own key
(`metadata["codec"]`, `metadata["evol"]`, …), read and written through these helpers, never as loose
top-level keys that the next method could collide with:

    data = CodecData.of(record)                       # None when the record has none
    data = CodecData.get(record)                      # an empty one instead of None
    out = record.with_event(event, metadata=data.update(rubrics=r).stored(record))
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from datatailor.errors import RecordFailure
from datatailor.records import Record

N = TypeVar("N", bound="Namespace")


class Namespace(BaseModel):
    """Base class of a method's record namespace; subclasses set `key` and their fields."""

    model_config = ConfigDict(extra="forbid")

    key: ClassVar[str]

    @classmethod
    def of(cls: type[N], record: Record) -> N | None:
        raw = record.metadata.get(cls.key)
        if raw is None:
            return None
        if isinstance(raw, cls):
            return raw
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(root)"
            raise RecordFailure(
                f"metadata.{cls.key} is not valid {cls.__name__} data: {loc}: {first['msg']}", kind="bad_metadata"
            ) from None

    @classmethod
    def get(cls: type[N], record: Record) -> N:
        return cls.of(record) or cls()

    def update(self: N, **changes: Any) -> N:
        return self.model_validate({**self.model_dump(), **changes})

    def stored(self, record: Record) -> dict[str, Any]:
        """`record.metadata` with this namespace written in (for `metadata=` of Record.child/with_event)."""
        return {**record.metadata, self.key: self.model_dump(mode="json")}
