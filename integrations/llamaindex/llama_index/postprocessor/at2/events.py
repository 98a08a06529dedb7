"""Instrumentation events this package dispatches around every attribution (LlamaIndex's `BaseEvent`s).

Attach a handler to the root dispatcher to see them, like any LlamaIndex event:

```python
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler

class Printer(BaseEventHandler):
    def handle(self, event, **kwargs):
        if isinstance(event, AT2AttributionEndEvent):
            print(event.scores)

get_dispatcher().add_event_handler(Printer())
```
"""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.base import BaseEvent

dispatcher = get_dispatcher(__name__)


class AT2AttributionStartEvent(BaseEvent):
    """An attribution begins: `source` is what runs it ("query_engine", "postprocessor", "instrumentation"),
    `query` the question, `document_ids` the at2 ids of the nodes being scored."""

    source: str
    query: str
    document_ids: list[str] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "AT2AttributionStartEvent"


class AT2AttributionEndEvent(BaseEvent):
    """An attribution ended: `attribution` is `Attribution.to_dict()` (None when it failed: `error` says why),
    `scores` the at2 document id -> AT2 score for the whole answer."""

    source: str
    query: str
    scores: dict[str, float] = Field(default_factory=dict)
    attribution: dict[str, Any] | None = None
    error: str | None = None

    @classmethod
    def class_name(cls) -> str:
        return "AT2AttributionEndEvent"


AT2_EVENTS = (AT2AttributionStartEvent, AT2AttributionEndEvent)
