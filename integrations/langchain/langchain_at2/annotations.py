"""AT2 results as `response_metadata` and as LangChain v1 standard `Citation` annotations.

Everything here is built from the core's one serialization, `Attribution.to_dict()` (schema
`at2-rag/attribution`, versioned): `response_metadata["at2"]` *is* that dict plus three LangChain conveniences
(`mode`, `scores`, `context_scores`), so `Attribution.model_validate(message.response_metadata["at2"])` gives the
attribution back; the `Citation` annotations and the trace summary select and rename its fields.

`ChatAT2` keeps `AIMessage.content` a plain string, with `response_metadata["model_provider"] = "at2"`. A content
translator registered for that provider makes `message.content_blocks` return the text block with one `Citation`
annotation per (answer sentence, supporting document); with `output_version="v1"` LangChain stores those blocks as
the content.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.block_translators import register_translator
from langchain_core.messages.content import Citation, create_citation

from at2_rag import Attribution
from at2_rag.attribution.result import context_key

PROVIDER = "at2"
#: the keys `attribution_metadata` adds to `Attribution.to_dict()`
LANGCHAIN_KEYS = ("mode", "scores", "context_scores")
#: what goes into a trace's run metadata (LangSmith): small, the rest is in the run's outputs / the custom event
TRACE_KEYS = (
    "schema",
    "schema_version",
    "scores",
    "context_scores",
    "supported",
    "groundedness",
    "extra_forward_passes",
)


def attribution_metadata(attribution: Attribution, *, mode: str) -> dict[str, Any]:
    """`response_metadata["at2"]`: `attribution.to_dict()` (every field of the versioned schema: `documents` in
    prompt order with their sentences, `citations` per answer sentence with `cited`, `supported`, `grounded`,
    `context_grounded`, `context`, `unlocated_documents`, `context_sources`, `groundedness` ("measured",
    "estimated" or "off": how `grounded` was obtained), `extra_forward_passes`, ...) plus

    * `mode`: "template" (at2-rag's prompt template placed the documents) or "prompt" (they were located in the
      messages as given);
    * `scores`: doc id -> score for the whole answer;
    * `context_scores`: `{"history:0": s, ..., "system": s, "query": s}`, on the documents' scale.
    """
    data = attribution.to_dict()
    return {
        **data,
        "mode": mode,
        "scores": attribution.document_scores(),
        "context_scores": attribution.context_scores(),
    }


def attribution_from_metadata(source: BaseMessage | Mapping[str, Any]) -> Attribution:
    """The `at2_rag.Attribution` back from a message's `response_metadata["at2"]` (or that dict itself)."""
    at2 = source.response_metadata.get(PROVIDER) if isinstance(source, BaseMessage) else source
    if not isinstance(at2, Mapping):
        raise ValueError("the message carries no AT2 attribution (response_metadata['at2'] is missing)")
    return Attribution.model_validate({k: v for k, v in at2.items() if k not in LANGCHAIN_KEYS})


def trace_summary(at2: Mapping[str, Any]) -> dict[str, Any]:
    """The part of `attribution_metadata` put into a model run's trace metadata (see `AT2CallbackHandler`)."""
    return {k: at2[k] for k in TRACE_KEYS if k in at2}


def context_refs(context: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A citation's `context` (context sources of `to_dict()`) as `{"key", "score"}` pairs, best first."""
    return [{"key": context_key(c["kind"], c.get("index")), "score": c["score"]} for c in context]


def trim_attribution(attribution: Attribution, cut: int) -> Attribution:
    """The attribution of `answer[:cut]` (after a stop sequence): later sentences dropped, the last one clipped."""
    if cut >= len(attribution.answer):
        return attribution
    citations = []
    for c in attribution.citations:
        if c.start >= cut:
            break
        if c.end > cut:
            c = c.model_copy(update={"end": cut, "text": attribution.answer[c.start : cut]})
        citations.append(c)
    return attribution.model_copy(update={"answer": attribution.answer[:cut], "citations": citations})


def citation_annotations(at2: Mapping[str, Any]) -> list[Citation]:
    """One standard `Citation` (`create_citation`) per (answer sentence, cited document), best document first.

    `start_index`/`end_index` index the whole answer text (in a stream: the concatenated chunks); `cited_text` is
    the document's best-supporting sentence for it. `extras`: `document_id`, `document_index`, `score` (the
    document's score for the sentence), the sentence's `grounded` (nats: how much it depends on the documents),
    `supported`, `context_grounded` (nats: how much it depends on the earlier turns; measured in a conversation,
    else None) and `context` (earlier turns it draws on: key and score), and the result's `groundedness` mode."""
    docs = {d["id"]: d for d in at2.get("documents", [])}
    out: list[Citation] = []
    for ci, c in enumerate(at2.get("citations", [])):
        per_doc = {d["id"]: d for d in c.get("documents", [])}
        for doc_id in c.get("cited", []):
            doc = docs.get(doc_id, {})
            cited = per_doc.get(doc_id, {})
            sentences = cited.get("sentences") or []
            cited_text = sentences[0]["text"] if sentences else (doc.get("text") or "")[:200]
            out.append(
                create_citation(
                    id=f"at2-{ci}-{doc.get('index', doc_id)}",
                    url=doc.get("url") or None,
                    title=doc.get("title") or None,
                    start_index=c["start"],
                    end_index=c["end"],
                    cited_text=cited_text or None,
                    document_id=doc_id,
                    document_index=doc.get("index"),
                    score=cited.get("score"),
                    grounded=c.get("grounded"),
                    supported=c.get("supported"),
                    context_grounded=c.get("context_grounded"),
                    groundedness=at2.get("groundedness"),
                    context=context_refs(c.get("context", [])),
                )
            )
    return out


def _translate(message: AIMessage | AIMessageChunk) -> list[Any]:
    if not isinstance(message.content, str):
        raise NotImplementedError  # let LangChain's best-effort parsing handle list content
    at2 = message.response_metadata.get(PROVIDER)
    annotations = citation_annotations(at2) if at2 else []
    if not message.content and not annotations:
        return []
    block: dict[str, Any] = {"type": "text", "text": message.content}  # a TextContentBlock
    if annotations:
        block["annotations"] = annotations
    return [block]


_registered = False


def register() -> None:
    """Register the `at2` content translator (done on import of `langchain_at2`)."""
    global _registered
    if not _registered:
        register_translator(PROVIDER, _translate, _translate)
        _registered = True


register()
