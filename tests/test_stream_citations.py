"""Per-sentence citations while the answer streams (`Attributor.stream(sentence_citations=True)`), on the real
embedded SmolLM2-135M-Instruct.

Attention is causal: a completed answer sentence's features never change as more tokens are generated, so its
citation, computed from the features captured so far between two decode steps, must equal the one the final
Attribution holds.
"""

from __future__ import annotations

import pytest
import torch

from at2_rag import Attribution, Citation, InvalidInputError
from at2_rag.capture._runner import LiveGeneration
from at2_rag.prompting.answer import answer_targets, decode_with_offsets

DOCS = [
    {
        "id": "eiffel",
        "text": "The Eiffel Tower is in Paris. It was built in 1889 for the World's Fair. It is 330 metres tall.",
    },
    {"id": "everest", "text": "Mount Everest is 8849 metres tall. It lies on the border of Nepal and China."},
    {"id": "bees", "text": "Honey bees live in colonies. A colony has one queen and thousands of workers."},
]
QUERY = "Tell me about the Eiffel Tower: where it is, when it was built and how tall it is."
MAX_NEW_TOKENS = 80
TOL = 1e-6
# A read flushes the deferred rows in smaller batches than one read at the end. BLAS rounds a matrix product of
# another shape differently (up to 1.5e-6 on a share here with MKL on AMD EPYC): still fp32 rounding, far below
# anything a read that changed the capture would cause.
FEATURE_TOL = 1e-5
# Measured `grounded` is a log-odds difference summed over a sentence's tokens; the streamed one feeds the
# documents-free pass sentence by sentence over a KV cache, the final one of a plain stream in one go: fp32 rounding
# of other matrix shapes (7e-6 seen), not a different measurement.
GROUNDED_TOL = 1e-4


def assert_citations_equal(streamed: Citation, final: Citation) -> None:
    """The same sentence, the same cited documents, every score within TOL."""
    assert (streamed.text, streamed.start, streamed.end) == (final.text, final.start, final.end)
    assert streamed.cited == final.cited
    assert streamed.supported == final.supported
    assert streamed.grounded == pytest.approx(final.grounded, abs=GROUNDED_TOL)
    assert streamed.context_grounded == pytest.approx(final.context_grounded, abs=GROUNDED_TOL)
    assert [d.id for d in streamed.documents] == [d.id for d in final.documents]
    for s, f in zip(streamed.documents, final.documents):
        assert s.score == pytest.approx(f.score, abs=TOL)
        assert [x.text for x in s.sentences] == [x.text for x in f.sentences]
        assert [x.score for x in s.sentences] == pytest.approx([x.score for x in f.sentences], abs=TOL)
    assert [c.key for c in streamed.context] == [c.key for c in final.context]
    assert [c.score for c in streamed.context] == pytest.approx([c.score for c in final.context], abs=TOL)


@pytest.fixture(scope="module")
def streamed(att) -> list:
    return list(att.stream(QUERY, DOCS, max_new_tokens=MAX_NEW_TOKENS, sentence_citations=True))


def test_each_sentence_citation_arrives_as_it_completes_and_equals_the_final_one(streamed):
    *items, final = streamed
    assert isinstance(final, Attribution)
    assert len(final.citations) >= 2, final.answer  # the question asks for several facts
    citations = [c for c in items if isinstance(c, Citation)]
    assert len(citations) == len(final.citations)  # one per answer sentence, in answer order
    for got, want in zip(citations, final.citations):
        assert_citations_equal(got, want)

    # every sentence but the last is complete before the text ends: its citation arrives while text still follows
    last_text = max(i for i, x in enumerate(items) if isinstance(x, str))
    positions = [i for i, x in enumerate(items) if isinstance(x, Citation)]
    assert all(p < last_text for p in positions[: len(final.citations) - 1]), positions
    # and never before the text that holds its sentence
    text = ""
    for item in items:
        if isinstance(item, str):
            text += item
        else:
            assert len(text) >= item.end and text[item.start : item.end] == item.text
    assert text == final.answer


def test_default_stream_is_unchanged_and_ends_with_the_same_attribution(att, streamed):
    items = list(att.stream(QUERY, DOCS, max_new_tokens=MAX_NEW_TOKENS))
    *chunks, final = items
    assert all(isinstance(c, str) for c in chunks) and isinstance(final, Attribution)
    with_citations = streamed[-1]
    assert final.answer == with_citations.answer  # the same greedy answer: reading features mid-way changes nothing
    assert len(final.citations) == len(with_citations.citations)
    for a, b in zip(final.citations, with_citations.citations):
        assert_citations_equal(a, b)
    for a, b in zip(final.documents, with_citations.documents):
        assert a.score == pytest.approx(b.score, abs=TOL)


def test_reading_features_mid_generation_leaves_the_final_features_unchanged(att):
    prompt = att.render(QUERY, DOCS)
    plain = att._runner.generate(prompt, 40)

    from transformers.generation.streamers import BaseStreamer

    class Reader(BaseStreamer):
        """Reads the capture after every 3rd generated token, in the generation thread."""

        def __init__(self) -> None:
            self.state = None
            self.steps = 0
            self.reads: list[torch.Tensor] = []

        def put(self, value) -> None:
            self.steps += 1
            if self.steps > 1 and self.steps % 3 == 0:
                self.reads.append(self.state.features()[0].clone())

        def end(self) -> None:
            pass

    reader = Reader()
    read = att._runner.generate(prompt, 40, streamer=reader, on_state=lambda s: setattr(reader, "state", s))
    assert len(reader.reads) >= 5
    assert read.answer.token_ids == plain.answer.token_ids
    assert read.token_features.shape == plain.token_features.shape
    torch.testing.assert_close(read.token_features, plain.token_features, rtol=0, atol=FEATURE_TOL)
    # each mid-way read already held the final values of the rows generated by then
    for early in reader.reads:
        torch.testing.assert_close(early, plain.token_features[: early.shape[0]], rtol=0, atol=FEATURE_TOL)


def test_citation_for_equals_the_attributions_citation(att):
    answer = "The tower is in Paris. It was built in 1889. Bees live in colonies."
    run = att.run(att.prepare({"query": QUERY, "documents": DOCS, "answer": answer}))
    result = att.score(run, att.gather_evidence(run))
    evidence = att.measure_groundedness(run)
    assert len(result.citations) == 3
    for k, want in enumerate(result.citations):
        assert_citations_equal(att.scorer.citation_for(run, k, "measured", evidence), want)
    estimated = att.score(run, att.gather_evidence(run, "estimated"), "estimated")
    for k, want in enumerate(estimated.citations):
        assert_citations_equal(att.scorer.citation_for(run, k), want)
    with pytest.raises(IndexError):
        att.scorer.citation_for(run, 3)


def test_live_generation_offsets_equal_decode_with_offsets(smollm):
    _, tokenizer = smollm
    text = "Café – 27 days. Naïve 東京 🙂 ok.\nNext line."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    live = LiveGeneration(prompt=None, tokenizer=tokenizer)  # type: ignore[arg-type]
    for i, token in enumerate(ids):
        live.extend([token])
        want = decode_with_offsets(tokenizer, ids[: i + 1])
        got = live.answer
        assert (got.text, got.char_spans, got.token_ids) == (want.text, want.char_spans, want.token_ids), i
    whole = decode_with_offsets(tokenizer, ids)
    assert [s for s, _ in answer_targets(live.answer)] == [s for s, _ in answer_targets(whole)]


def test_sentence_citations_with_ablations_is_refused_before_generating(att):
    with pytest.raises(InvalidInputError, match="ablations"):
        next(iter(att.stream(QUERY, DOCS, max_new_tokens=8, ablations=2, sentence_citations=True)))
