"""AT2 results as plain `response_metadata` and as LangChain v1 standard `Citation` annotations.

`ChatAT2` keeps `AIMessage.content` a plain string and stores the attribution in
`response_metadata["at2"]`, with `response_metadata["model_provider"] = "at2"`. A content translator registered
for that provider makes `message.content_blocks` return the text block with one `Citation` annotation per
(answer sentence, supporting document); with `output_version="v1"` LangChain stores those blocks as the content.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from at2_rag import Attribution
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.block_translators import register_translator
from langchain_core.messages.content import Citation, TextContentBlock

PROVIDER = "at2"


def attribution_metadata(
    attribution: Attribution,
    *,
    mode: str,
    unlocated: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The JSON-friendly summary stored in `response_metadata["at2"]`.

    Keys: `scores` (doc id -> score for the whole answer), `documents` (ranked: id, index, title, url, score),
    `citations` (per answer sentence: text, start, end, cited ids, supported, and every document's score with
    its best-supporting sentence), `supported`, `support_threshold`, `estimator_trained`, `mode`
    ("template": the documents were rendered by at2-rag's prompt template; "prompt": they were found in the
    messages as given), `unlocated_documents`, `extra_forward_passes` (ablation passes paid to refine the
    scores: 0 for plain AT2, k with `ablations=k`).

    Conversations: `context_scores` (`{"history:0": s, ..., "system": s, "query": s}`, on the documents'
    scale) and `context_sources` (per earlier turn, system prompt and question: key, kind, index, role, text,
    score, as in `Attribution.to_dict()`); each citation also has `grounded` (nats: the estimated drop of the
    sentence's log-odds without any document; `supported` is `grounded` reaching the estimator's threshold) and
    `context` (the earlier turns / system prompt it draws on, best first: key and score).
    """
    docs = {d.id: d for d in attribution.documents}
    return {
        "scores": attribution.document_scores(),
        "documents": [
            {"id": d.id, "index": d.index, "title": d.title, "url": d.url, "score": d.score}
            for d in attribution.top_documents(len(attribution.documents))
        ],
        "citations": [
            {
                "text": c.text,
                "start": c.start,
                "end": c.end,
                "cited": list(c.cited),
                "supported": c.supported,
                "grounded": c.grounded,
                "context": [{"key": src.key, "score": src.score} for src in c.context],
                "documents": [
                    {
                        "id": cd.id,
                        "score": cd.score,
                        "cited_text": cd.sentences[0].text if cd.sentences else docs[cd.id].text[:200],
                    }
                    for cd in c.documents
                ],
            }
            for c in attribution.citations
        ],
        "supported": attribution.supported,
        "support_threshold": attribution.support_threshold,
        "estimator_trained": attribution.estimator_trained,
        "mode": mode,
        "unlocated_documents": list(unlocated),
        "extra_forward_passes": attribution.extra_forward_passes,
        "context_scores": attribution.context_scores(),
        "context_sources": context_sources(attribution),
    }


def context_sources(attribution: Attribution) -> list[dict[str, Any]]:
    """The context sources as `Attribution.to_dict()` writes them, each with its `key` (`history:0`, ...)."""
    return [{"key": c.key, **c.model_dump(mode="json")} for c in attribution.context_sources]


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


def citation_annotations(at2: dict[str, Any]) -> list[Citation]:
    """One standard `Citation` per (answer sentence, cited document), best document first.

    `start_index`/`end_index` index the whole answer text (in a stream: the concatenated chunks). `extras`:
    `document_id`, `document_index`, `score` (the document's score for the sentence), and the sentence's
    `grounded` and `context` (earlier turns it draws on: key and score)."""
    docs = {d["id"]: d for d in at2.get("documents", [])}
    out: list[Citation] = []
    for ci, c in enumerate(at2.get("citations", [])):
        per_doc = {d["id"]: d for d in c.get("documents", [])}
        for doc_id in c.get("cited", []):
            doc = docs.get(doc_id, {})
            cited = per_doc.get(doc_id, {})
            annotation: Citation = {
                "type": "citation",
                "id": f"at2-{ci}-{doc.get('index', doc_id)}",
                "start_index": c["start"],
                "end_index": c["end"],
            }
            if doc.get("title"):
                annotation["title"] = doc["title"]
            if doc.get("url"):
                annotation["url"] = doc["url"]
            if cited.get("cited_text"):
                annotation["cited_text"] = cited["cited_text"]
            annotation["extras"] = {
                "document_id": doc_id,
                "document_index": doc.get("index"),
                "score": cited.get("score"),
            }
            if "grounded" in c:  # absent from metadata written by earlier versions
                annotation["extras"]["grounded"] = c["grounded"]
            if "context" in c:
                annotation["extras"]["context"] = [dict(src) for src in c["context"]]
            out.append(annotation)
    return out


def _translate(message: AIMessage | AIMessageChunk) -> list[Any]:
    if not isinstance(message.content, str):
        raise NotImplementedError  # let LangChain's best-effort parsing handle list content
    at2 = message.response_metadata.get(PROVIDER)
    annotations = citation_annotations(at2) if at2 else []
    if not message.content and not annotations:
        return []
    block: TextContentBlock = {"type": "text", "text": message.content}
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
