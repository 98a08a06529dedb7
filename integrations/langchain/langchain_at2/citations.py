"""A post-processor for RAG chains: score the documents, cite each answer sentence, flag unsupported answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, Field

from at2_rag import AT2Error, Attribution, Attributor
from at2_rag.errors import DocumentsNotLocatedError

from ._loading import get_attributor
from ._messages import to_chat_dicts
from .annotations import context_refs
from .documents import convert_documents, to_at2_document, to_langchain_document


class AT2Citations(RunnableSerializable[dict[str, Any], dict[str, Any]]):
    """Pipe after a chain that returns `{"answer": str, "context": [Document, ...], "question": str}`.

    Returns the same dict with:

    * the documents (same key, same order) copied with `metadata["at2_score"]`;
    * `citations`: per answer sentence `{"text", "start", "end", "document_ids", "scores", "supported",
      "grounded", "context_grounded", "context"}` (`grounded`: nats, the drop of the sentence's log-odds without
      any document, measured or estimated per `groundedness`, None when off; `context_grounded`: the same without
      the earlier turns, measured in a conversation, else None; `context`: the earlier turns / system prompt it
      draws on, best first, as key and score);
    * `context_scores`: `{"history:0": s, ..., "system": s, "query": s}` for the whole answer, on the
      documents' scale (the turns of the prompt, or of `chat_history`, and the question);
    * `cited_answer`: the answer with `[n]` marks (n = 1-based position in the documents);
    * `unsupported`: True when no answer sentence is grounded in the documents (`Attribution.supported`: a
      sentence's `grounded` reaching the threshold, 1 nat by default), or when nothing could be attributed;
    * `attribution`: the full `at2_rag.Attribution` (None if nothing could be attributed), and `at2_error`;
    * `groundedness`: how `grounded` was obtained ("measured", "estimated" or "off"; None without attribution);
    * `extra_forward_passes`: the passes paid beyond the one forward pass: the measured groundedness passes (1,
      or 2 with `chat_history`) and the ablation passes.

    Keys are configurable: `answer_key`, `question_keys` (first present wins), `documents_keys`. The answer may
    be a string or an `AIMessage`. If the input also has the prompt the chain's model saw (`prompt_key`,
    default "prompt": a string, a PromptValue or a list of messages), the documents are located inside that
    prompt and the attribution reads it; otherwise at2-rag renders its own RAG prompt from question and
    documents (`Attributor.attribute`), with the earlier turns from `history_key` (default "chat_history": a
    list of messages or role/content dicts) when the input has them.

    `ablations=k` pays k ablation passes to refine the scores (0, the default, is plain AT2; k is capped at
    2^number of documents).

    `groundedness="measured"` (the default) measures each sentence's dependence on the documents (not its truth)
    with one extra teacher-forced pass over the non-document part of the prompt and the answer; "estimated"
    predicts it at zero cost (less reliable on documents unlike the estimator's training data); "off" skips it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    attributor: Any = Field(default=None, exclude=True)
    model_name: str | None = None
    estimator: str | None = None
    answer_key: str = "answer"
    question_keys: tuple[str, ...] = ("question", "query", "input")
    documents_keys: tuple[str, ...] = ("context", "documents", "source_documents")
    prompt_key: str | None = "prompt"
    history_key: str | None = "chat_history"
    ablations: int = Field(default=0, ge=0, strict=True)
    """Ablation passes that refine the document scores (0 = plain AT2)."""
    groundedness: Literal["measured", "estimated", "off"] = "measured"
    """How each sentence's `grounded` is obtained: "measured" (one extra pass), "estimated" (zero cost) or "off"."""

    def get_attributor(self) -> Attributor:
        if self.attributor is not None:
            return self.attributor
        return get_attributor(self.model_name, estimator=self.estimator)

    def invoke(self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any) -> dict[str, Any]:
        return self._call_with_config(self._cite, input, config, run_type="parser")

    def _cite(self, input: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(input, Mapping):
            raise TypeError(f"AT2Citations expects a dict with the answer and documents, got {type(input).__name__}")
        answer = input.get(self.answer_key)
        if isinstance(answer, BaseMessage):
            answer = answer.text
        if not isinstance(answer, str):
            raise KeyError(f"AT2Citations: the input has no string {self.answer_key!r}; keys are {sorted(input)}")
        question = next((input[k] for k in self.question_keys if isinstance(input.get(k), str)), "")
        doc_key = next((k for k in self.documents_keys if k in input), None)
        if doc_key is None:
            raise KeyError(f"AT2Citations: the input has none of {self.documents_keys}; keys are {sorted(input)}")
        raw_docs: Sequence[Any] = input[doc_key] or []
        documents, ids = convert_documents(raw_docs)

        attribution: Attribution | None = None
        error: str | None = None
        if not documents:
            error = "no documents"
        elif not answer.strip():
            error = "empty answer"
        else:
            attributor = self.get_attributor()
            prompt = input.get(self.prompt_key) if self.prompt_key else None
            try:
                if prompt is not None:
                    attribution = attributor.attribute_rendered(
                        _prompt_arg(prompt),
                        documents,
                        answer,
                        question,
                        ablations=self.ablations,
                        groundedness=self.groundedness,
                    )
                else:
                    history = input.get(self.history_key) if self.history_key else None
                    attribution = attributor.attribute(
                        question,
                        documents,
                        answer,
                        _history_arg(history),
                        ablations=self.ablations,
                        groundedness=self.groundedness,
                    )
            except DocumentsNotLocatedError:
                error = "none of the documents occurs in the prompt"
            except (AT2Error, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"

        data = attribution.to_dict() if attribution else None
        scores = attribution.document_scores() if attribution else {}
        output = dict(input)
        output[doc_key] = [
            _scored(doc, doc_id, scores.get(doc_id), i) for i, (doc, doc_id) in enumerate(zip(raw_docs, ids))
        ]
        output["citations"] = [_citation(c) for c in data["citations"]] if data else []
        output["context_scores"] = attribution.context_scores() if attribution else {}
        output["cited_answer"] = attribution.cited_answer() if attribution else answer
        output["unsupported"] = not (data is not None and data["supported"])
        output["attribution"] = attribution
        output["at2_error"] = error
        output["groundedness"] = data["groundedness"] if data else None
        output["extra_forward_passes"] = data["extra_forward_passes"] if data else 0
        return output


def _citation(c: dict[str, Any]) -> dict[str, Any]:
    """A citation of `Attribution.to_dict()` in this post-processor's format (selected and renamed)."""
    return {
        "text": c["text"],
        "start": c["start"],
        "end": c["end"],
        "document_ids": list(c["cited"]),
        "scores": {d["id"]: d["score"] for d in c["documents"]},
        "supported": c["supported"],
        "grounded": c["grounded"],
        "context_grounded": c.get("context_grounded"),
        "context": context_refs(c["context"]),
    }


def _prompt_arg(prompt: Any) -> Any:
    if isinstance(prompt, PromptValue):
        prompt = prompt.to_messages()
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(m, BaseMessage) for m in prompt):
        return to_chat_dicts(prompt)
    raise TypeError(f"prompt must be a string, a PromptValue or a list of messages, got {type(prompt).__name__}")


def _history_arg(history: Any) -> list[Any] | None:
    if history is None:
        return None
    if isinstance(history, str) or not isinstance(history, Sequence):
        raise TypeError(f"chat history must be a list of messages, got {type(history).__name__}")
    return [to_chat_dicts([m])[0] if isinstance(m, BaseMessage) else m for m in history]


def _scored(doc: Any, doc_id: str, score: float | None, index: int) -> Document:
    if isinstance(doc, Document):
        metadata = {**doc.metadata, "at2_score": score, "at2_id": doc_id}
        return Document(page_content=doc.page_content, id=doc.id, metadata=metadata)
    return to_langchain_document(to_at2_document(doc, index), at2_score=score, at2_id=doc_id)


def with_citations(chain: Runnable[Any, Any], **kwargs: Any) -> Runnable[Any, dict[str, Any]]:
    """`chain | AT2Citations(**kwargs)`."""
    return chain | AT2Citations(**kwargs)
