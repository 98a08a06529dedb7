"""Build realistic, reproducible RAG examples offline from the installed Python HTML documentation.

Why: training and evaluating an AT2 attributor needs prompts that look like real retrieval-augmented
generation (a question plus a handful of retrieved passages, only one or two of which hold the answer), and
we want them without network access, without an LLM and byte-for-byte reproducible from a seed.

Source text is Debian's ``python3-doc`` package (``apt-get install python3-doc``), parsed with the stdlib
``html.parser``. Pages are chunked into 60-150 word passages; questions are made from single sentences with
templates; distractors are the passages from *other* pages that a small BM25 retriever ranks highest for the
question. Train and held-out examples are drawn from disjoint sets of pages, so nothing leaks between them.

Run as ``python scripts/build_dataset.py --out DIR --train 700 --heldout 120 --seed 0`` (``make data``). It is
a data-preparation script, not part of the installed package: at2-rag reads its output (JSONL examples), never
the code.

Each output line is ``{"id", "query", "documents": [{"id", "title", "text", "url"}], "relevant_ids",
"answer_hint"}``; ``relevant_ids[0]`` is the passage the question was made from and ``answer_hint`` is the
sentence of that passage that answers it.
"""

from __future__ import annotations

import argparse
import builtins
import html
import json
import logging
import math
import os
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tqdm import tqdm

from at2_rag.storage.files import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["DocsNotFoundError", "Passage", "build_examples", "find_doc_root", "load_passages", "main", "write_jsonl"]

# Where Debian/Ubuntu put the python3-doc HTML tree (the first is a symlink to the versioned one).
DOC_ROOT_CANDIDATES: tuple[str, ...] = (
    "/usr/share/doc/python3-doc/html",
    "/usr/share/doc/python3*-doc/html",
    "/usr/share/doc/python3*/html",
)
DOC_ROOT_ENV = "AT2_PYTHON_DOCS"

# Prose sections worth reading; whatsnew/changelog repeat library text (answer leakage into distractors),
# distutils is a deprecated duplicate, and index/search pages are navigation only.
DEFAULT_SECTIONS: tuple[str, ...] = (
    "library",
    "reference",
    "tutorial",
    "howto",
    "faq",
    "using",
    "extending",
    "c-api",
    "installing",
    "distributing",
    "glossary.html",
)

MIN_PASSAGE_WORDS = 60
TARGET_PASSAGE_WORDS = 85
MAX_PASSAGE_WORDS = 150
MIN_KEEP_WORDS = 45  # a trailing scrap shorter than this is merged or dropped
MIN_EXAMPLE_WORDS = 250
MAX_EXAMPLE_WORDS = 450
# Code-heavy passages tokenize at ~0.22 tokens/char (measured with the SmolLM2 BPE), so words alone let some
# prompts reach ~1000 tokens; this cap keeps document text near 600 tokens and whole prompts around 400-750.
MAX_EXAMPLE_CHARS = 2700
MIN_DOC_CHARS = 280  # room reserved per still-empty document slot
MIN_DOCS = 4
MAX_DOCS = 6
NEIGHBOUR_PROB = 0.3
HELDOUT_PAGE_FRACTION = 0.12
BM25_CANDIDATES = 60


class DocsNotFoundError(FileNotFoundError):
    """Raised when the Python HTML documentation is not installed where we look for it."""


# --------------------------------------------------------------------------------------------------------
# HTML parsing
# --------------------------------------------------------------------------------------------------------

_VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)
# Elements whose whole content is code, navigation, changelog or footnotes: never passage text.
_SKIP_TAGS = frozenset({"pre", "table", "script", "style", "nav", "button", "svg", "form"})
_SKIP_CLASSES = frozenset(
    {
        "highlight",
        "doctest",
        "versionadded",
        "versionchanged",
        "deprecated",
        "deprecated-removed",
        "footnote",
        "footnote-list",
        "seealso",
        "toctree-wrapper",
        "topic",
        "sidebar",
        "contents",
        "field-list",
        "line-block",
        "headerlink",
        "footnote-reference",
        "section-number",
        "admonition-title",
        "availability",
        "audit-hook",
        "rubric",
        "topic-title",
        "sidebar-title",
        "topless",
        "sig-paren",
    }
)
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_CALLABLE_KINDS = frozenset({"function", "method", "classmethod", "staticmethod", "coroutinefunction",
                             "coroutinemethod", "abstractmethod", "decorator", "decoratormethod", "macro"})


@dataclass
class _Block:
    """One prose paragraph with the context needed to title it and to ask about it."""

    anchor: str
    heading: str
    subject: str | None  # the documented object/term the paragraph belongs to, e.g. "json.dumps()"
    text: str
    lead: str = ""  # "json.dumps(): " when the paragraph opens an object's description


@dataclass
class _Frame:
    """An open element and what closing it must undo."""

    tag: str
    skip: bool = False
    body: bool = False
    section: str | None = None
    dl_kind: str | None = None  # "py"/"c"/"term" for definition lists we take subjects from


class _DocPageParser(HTMLParser):
    """Collects prose paragraphs from the main body of one Sphinx page, ignoring navigation and code."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.blocks: list[_Block] = []
        self._stack: list[_Frame] = []
        self._skip = 0
        self._body = 0
        self._in_title = False
        self._heading: list[str] | None = None
        self._para: list[str] | None = None
        self._dt: list[str] | None = None
        self._current_heading = ""
        self._sections: list[str] = []
        # one entry per open definition list: [kind, label of the object/term it documents, class attribute]
        self._dls: list[list[str | None]] = []
        self._pending_lead: str | None = None

    # -- helpers --------------------------------------------------------------------------------------
    @staticmethod
    def _label_for(kind: str | None, dl_class: str, ident: str | None, dt_text: str) -> str | None:
        """Turn a definition's id/term into the name a reader would use: json.dumps(), PyObject_Str()."""
        if kind == "term":
            term = _clean(dt_text)
            return term if term and len(term.split()) <= 6 and ">>>" not in term and term != "..." else None
        if not ident:
            return None
        name = ident[2:] if ident.startswith("c.") else ident
        if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            return None
        parts = name.split(".")
        name = ".".join(p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1])  # Spec.Spec.flags
        objtype = dl_class.split()[-1] if dl_class.split() else ""
        return name + "()" if objtype in _CALLABLE_KINDS and not (kind == "c" and objtype == "macro") else name

    def _text_sink(self) -> list[str] | None:
        """The buffer that text should go to right now (heading, glossary term or paragraph), if any."""
        if self._skip:
            return None
        for buf in (self._heading, self._dt, self._para):
            if buf is not None:
                return buf
        return None

    # -- HTMLParser hooks ------------------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
            return
        if tag in _VOID_TAGS:
            return
        a = {k: (v or "") for k, v in attrs}
        classes = set(a.get("class", "").split())
        frame = _Frame(tag)
        if tag == "div" and "body" in classes and a.get("role") == "main":
            frame.body = True
            self._body += 1
        skip = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES) or any(c.startswith("highlight") for c in classes)
        if skip:
            frame.skip = True
            self._skip += 1
        if not self._body:
            self._stack.append(frame)
            return
        if tag == "section" and a.get("id"):
            frame.section = a["id"]
            self._sections.append(a["id"])
        elif tag in _HEADINGS and not self._skip:
            self._heading = []
        elif tag == "dl" and not self._skip:
            dl_class = a.get("class", "")
            first = dl_class.split()[0] if dl_class.split() else ""
            kind = first if first in {"py", "c"} else "term" if first in {"glossary", "simple"} else "other"
            frame.dl_kind = kind
            self._dls.append([kind, None, dl_class])
        elif tag == "dt" and self._dls and not self._skip:
            kind, _, dl_class = self._dls[-1]
            if kind in {"py", "c"}:
                if self._dls[-1][1] is None:  # overloads repeat <dt>; the first names the object
                    self._dls[-1][1] = self._label_for(kind, dl_class or "", a.get("id"), "")
            elif kind == "term":
                self._dt = []
        elif tag == "dd" and self._dls and not self._skip:
            label = self._dls[-1][1]
            self._pending_lead = label if label else None
        elif tag == "p" and not self._skip and self._heading is None and self._dt is None:
            self._para = []
        self._stack.append(frame)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
            return
        if tag in _VOID_TAGS or not any(f.tag == tag for f in self._stack):
            return
        while self._stack:
            frame = self._stack.pop()
            self._close(frame)
            if frame.tag == tag:
                break

    def _close(self, frame: _Frame) -> None:
        if frame.skip:
            self._skip -= 1
        if frame.body:
            self._body -= 1
        if frame.section is not None and self._sections:
            self._sections.pop()
        if frame.dl_kind is not None and self._dls:
            self._dls.pop()
            self._pending_lead = None
        if frame.skip:
            return
        tag = frame.tag
        if tag in _HEADINGS and self._heading is not None:
            self._current_heading = _strip_section_number(_clean("".join(self._heading)))
            self._heading = None
        elif tag == "dt" and self._dt is not None:
            if self._dls:
                kind, _, dl_class = self._dls[-1]
                self._dls[-1][1] = self._label_for(kind, dl_class or "", None, "".join(self._dt))
            self._dt = None
        elif tag == "p" and self._para is not None:
            text = _clean("".join(self._para))
            self._para = None
            if text:
                subject = self._dls[-1][1] if self._dls else None
                lead = self._pending_lead or ""
                self._pending_lead = None
                anchor = self._sections[-1] if self._sections else ""
                self.blocks.append(_Block(anchor, self._current_heading, subject, text, lead))

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
            return
        sink = self._text_sink()
        if sink is not None and self._body:
            sink.append(data)


_WS = re.compile(r"\s+")


def _clean(text: str) -> str:
    """Normalise whitespace and drop the pilcrow permalink glyph."""
    text = text.replace("\u00b6", " ").replace("\u00a0", " ").replace("\u200b", "")
    text = _WS.sub(" ", text).strip()
    # "word ." left behind by removed footnote markers
    return re.sub(r"\s+([.,;:)])(?=\s|$|[)\"'])", r"\1", text)


def _strip_section_number(text: str) -> str:
    return re.sub(r"^\d+(\.\d+)*\.?\s+", "", text)


def _page_title(raw: str) -> str:
    title = _clean(html.unescape(raw))
    title = re.sub(r"\s+[\u2014-]\s+Python [\d.]+\w* documentation$", "", title)
    return _strip_section_number(title)


# --------------------------------------------------------------------------------------------------------
# Sentences and passages
# --------------------------------------------------------------------------------------------------------

_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "Mr.", "Dr.", "No.", "resp.", "incl.")
# documentation sentences may start with a lowercase identifier ("fullname must be ..."), so any
# non-space may open the next sentence; abbreviations are glued back below.
_SENT_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Za-z0-9\"'(\[`_*])")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences without breaking on e.g./i.e./etc. (good enough for documentation)."""
    parts = _SENT_BOUNDARY.split(text)
    out: list[str] = []
    for part in parts:
        if out and out[-1].endswith(_ABBREVIATIONS):
            out[-1] = out[-1] + " " + part
        else:
            out.append(part)
    return [s.strip() for s in out if s.strip()]


def _is_codey(text: str) -> bool:
    """A 'paragraph' that is really code or a symbol list carries no answerable prose."""
    if ">>>" in text:
        return True
    words = text.split()
    if not words:
        return True
    alpha = sum(1 for w in words if re.fullmatch(r"[A-Za-z][a-z'\-]*[,.;:]?", w))
    return alpha / len(words) < 0.5


def _tidy_paragraph(text: str) -> str:
    """Drop a trailing 'For example:'-style lead-in whose code block we removed; keep whole sentences."""
    sents = split_sentences(text)
    while sents and sents[-1].endswith(":"):
        last = sents.pop()
        if len(last.split()) >= 12:  # a real sentence introducing a list: keep it as a statement
            sents.append(last[:-1].rstrip() + ".")
            break
    return " ".join(sents)


@dataclass
class Passage:
    """A retrievable chunk of one documentation page."""

    id: str  # "library/json.html#p12"
    page: str  # "library/json.html"
    title: str  # "json — JSON encoder and decoder: Basic Usage"
    text: str
    url: str
    anchor: str
    page_title: str
    index: int
    # sentence -> subject (documented object) it talks about, used only for question generation
    sentences: list[tuple[str, str | None]] = field(default_factory=list, repr=False)

    @property
    def n_words(self) -> int:
        return len(self.text.split())


def _block_units(block: _Block) -> list[tuple[str, str | None]]:
    """Sentences of a block, the first carrying the object's name as a lead-in so the text stands alone."""
    sents = split_sentences(block.text)
    if block.lead and sents:
        sents[0] = f"{block.lead}: {sents[0]}"
    return [(s, block.subject) for s in sents]


def _chunk_section(units: list[tuple[str, str | None]], para_breaks: set[int]) -> list[list[tuple[str, str | None]]]:
    """Greedy paragraph-first chunking into 60-150 word groups of whole sentences."""
    chunks: list[list[tuple[str, str | None]]] = []
    cur: list[tuple[str, str | None]] = []
    cur_words = 0
    for i, unit in enumerate(units):
        w = len(unit[0].split())
        at_para = i in para_breaks
        # prefer to cut at paragraph boundaries once the chunk is big enough; cut anywhere if it would overflow
        if cur and (
            cur_words + w > MAX_PASSAGE_WORDS
            or (at_para and cur_words >= MIN_PASSAGE_WORDS and cur_words + w > TARGET_PASSAGE_WORDS)
        ):
            chunks.append(cur)
            cur, cur_words = [], 0
        if w > MAX_PASSAGE_WORDS:  # a run-on "sentence" (usually a list); not a usable passage
            continue
        cur.append(unit)
        cur_words += w
    if cur:
        chunks.append(cur)
    # merge short scraps into the previous chunk when they fit, else drop them
    merged: list[list[tuple[str, str | None]]] = []
    for chunk in chunks:
        words = sum(len(s.split()) for s, _ in chunk)
        if words < MIN_KEEP_WORDS:
            if merged and sum(len(s.split()) for s, _ in merged[-1]) + words <= MAX_PASSAGE_WORDS:
                merged[-1] = merged[-1] + chunk
            continue
        merged.append(chunk)
    return merged


def _parse_page(path: Path, rel: str, doc_root: Path) -> list[Passage]:
    """Parse one HTML page into passages (empty for pages with no usable prose)."""
    parser = _DocPageParser()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    page_title = _page_title(parser.title)
    # group paragraphs by section anchor, keeping document order
    sections: dict[str, list[_Block]] = {}
    for block in parser.blocks:
        if _is_codey(block.text):
            continue
        text = _tidy_paragraph(block.text)
        if len(text.split()) < 4:
            continue
        if text.startswith(("Source code:", "Availability:", "Changed in version", "New in version")):
            continue
        sections.setdefault(block.anchor, []).append(
            _Block(block.anchor, block.heading, block.subject, text, block.lead)
        )
    passages: list[Passage] = []
    for anchor, blocks in sections.items():
        units: list[tuple[str, str | None]] = []
        breaks: set[int] = set()
        for block in blocks:
            breaks.add(len(units))
            units.extend(_block_units(block))
        heading = blocks[0].heading
        title = page_title if not heading or heading == page_title else f"{page_title}: {heading}"
        for chunk in _chunk_section(units, breaks):
            text = " ".join(s for s, _ in chunk)
            n = len(text.split())
            if n < MIN_KEEP_WORDS or n > MAX_PASSAGE_WORDS:
                continue
            idx = len(passages)
            url = f"file://{doc_root.as_posix()}/{rel}" + (f"#{anchor}" if anchor else "")
            passages.append(Passage(f"{rel}#p{idx}", rel, title, text, url, anchor, page_title, idx, chunk))
    return passages


def find_doc_root(doc_root: Path | str | None = None) -> Path:
    """Locate the python3-doc HTML tree, or explain how to install it."""
    if doc_root is None and os.environ.get(DOC_ROOT_ENV):
        doc_root = os.environ[DOC_ROOT_ENV]
    candidates: list[Path] = []
    if doc_root is not None:
        candidates.append(Path(doc_root))
    else:
        for pattern in DOC_ROOT_CANDIDATES:
            if "*" in pattern:
                candidates.extend(sorted(Path("/").glob(pattern.lstrip("/"))))
            else:
                candidates.append(Path(pattern))
    for cand in candidates:
        if (cand / "library").is_dir() and (cand / "library" / "json.html").exists():
            return cand
    where = ", ".join(str(c) for c in candidates) or "(none)"
    raise DocsNotFoundError(
        f"Python HTML documentation not found (looked in: {where}). Install it with "
        f"`sudo apt-get install -y python3-doc` (or `make data`, which installs it), or point "
        f"{DOC_ROOT_ENV}/--doc-root at a Sphinx-built Python docs 'html' folder."
    )


def _list_pages(doc_root: Path, sections: Sequence[str]) -> list[str]:
    """Relative paths of the pages to read, sorted so every run sees the same order."""
    rels: set[str] = set()
    for sec in sections:
        p = doc_root / sec
        if p.is_file() and p.suffix == ".html":
            rels.add(sec)
        elif p.is_dir():
            rels.update(q.relative_to(doc_root).as_posix() for q in p.rglob("*.html"))
    return sorted(r for r in rels if not Path(r).name.startswith(("genindex", "search", "index.html")))


def load_passages(doc_root: Path | str | None = None, sections: Sequence[str] = DEFAULT_SECTIONS) -> list[Passage]:
    """Parse and chunk the documentation (deterministic order: sorted pages, document order within)."""
    root = find_doc_root(doc_root)
    pages = _list_pages(root, sections)
    if not pages:
        raise DocsNotFoundError(f"No HTML pages under {root} for sections {list(sections)}.")
    passages: list[Passage] = []
    for rel in tqdm(pages, desc="parsing docs", unit="page", disable=None):
        passages.extend(_parse_page(root / rel, rel, root))
    logger.info("parsed %d pages from %s into %d passages", len(pages), root, len(passages))
    return passages


# --------------------------------------------------------------------------------------------------------
# BM25 retrieval (tiny, stdlib only)
# --------------------------------------------------------------------------------------------------------

_STOPWORDS = frozenset(
    """a about above after again against all also an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having
    he her here hers how i if in into is it its itself just me more most my no nor not now of off on once only
    or other our out over own same she should so some such than that the their them then there these they this
    those through to too under until up very was we were what when where which while who whom why will with
    would you your according documentation""".split()
)
_TOKEN = re.compile(r"[a-z0-9_]+")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens without stopwords; dotted names split so `json.dumps` matches `dumps`."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS and len(t) > 1]


class BM25:
    """Okapi BM25 over a fixed list of texts; enough to pick retriever-like distractors."""

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.lengths: list[int] = []
        for i, text in enumerate(texts):
            toks = tokenize(text)
            self.lengths.append(len(toks))
            for term, tf in sorted(Counter(toks).items()):
                self.postings[term].append((i, tf))
        n = max(len(texts), 1)
        self.avgdl = (sum(self.lengths) / n) or 1.0
        self.idf = {t: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for t, p in self.postings.items()}

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Top-k (index, score), ties broken by index so results are deterministic."""
        scores: dict[int, float] = defaultdict(float)
        for term in dict.fromkeys(tokenize(query)):
            idf = self.idf.get(term)
            if idf is None:
                continue
            for i, tf in self.postings[term]:
                norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avgdl)
                scores[i] += idf * tf * (self.k1 + 1) / norm
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


# --------------------------------------------------------------------------------------------------------
# Question generation (templates, no LLM)
# --------------------------------------------------------------------------------------------------------

# imperative verbs that open Python API descriptions ("Return a list of ...") -> they describe the subject
_IMPERATIVES = frozenset(
    """return raise serialize deserialize create convert decode encode read write open close set get remove
    delete add insert compute calculate construct call load parse format generate test check wait send receive
    start stop change copy move rename register unregister apply split join replace search compile execute
    run evaluate print display release acquire lock unlock flush reset clear update append extend pop sort
    reverse count find match map filter reduce wrap unwrap pack unpack encrypt decrypt compress decompress
    install initialize initialise finalize shut cancel schedule submit block yield iterate list walk scan
    truncate resize seek tell make build render quote unquote escape unescape normalize round determine
    retrieve fetch store save dump restore configure enable disable emit log handle process translate
    transform validate verify increment decrement allocate free attach detach bind connect accept listen
    shutdown terminate kill signal notify""".split()
)
# third-person verbs for declarative sentences ("The json module exposes ...") -> base form
_DECL_VERBS: dict[str, str] = {
    v + "s": v
    for v in """expose provide contain support define implement allow accept take create use require specify
    determine control convert produce generate represent describe handle store read write include offer make
    return raise hold indicate behave perform keep add remove replace check give let enable cause prevent
    mean refer correspond default depend consist belong apply affect return""".split()
}
_DECL_VERBS.update({"does": "do", "has": "have", "applies": "apply", "specifies": "specify",
                    "identifies": "identify", "modifies": "modify", "copies": "copy", "matches": "match",
                    "searches": "search", "passes": "pass", "accesses": "access", "reaches": "reach"})
# imperatives whose object makes a poor "What does X <verb>?" (tell the driver, run the loop): ask "do"
_DO_ONLY = frozenset({"tell", "notify", "signal", "make", "handle", "process", "run", "apply", "call", "emit",
                      "yield", "block", "wait", "start", "stop", "execute", "evaluate", "test", "check"})
_WEAK_VERBS = frozenset({"have", "do", "behave", "mean", "keep", "make", "give", "let", "take", "use"})
_PREPOSITIONS = ("for", "to", "from", "on", "with", "into", "in", "until", "of", "about")
_PRONOUN_SUBJECTS = frozenset({"it", "they", "this", "these", "that", "those", "there", "which", "he", "she",
                               "we", "you", "one", "its", "such", "both", "either", "neither", "here"})
_GENERIC_HEADS = {"this module": "module", "the module": "module", "this function": "object",
                  "the function": "object", "this method": "object", "the method": "object",
                  "this class": "object", "the class": "object", "this attribute": "object",
                  "this exception": "object", "this package": "module", "it": "object"}
_SUBORDINATORS = frozenset({"if", "when", "whenever", "while", "because", "although", "though", "unless",
                            "since", "as", "once", "after", "before", "where", "whether", "to", "for", "in",
                            "on", "with", "by", "from", "at", "of", "during", "instead", "like", "unlike"})
_BAD_SUBJECT_WORDS = frozenset({"to", "it", "they", "you", "we", "i", "here", "there", "so", "now", "then",
                                "not", "also", "only", "just", "thus", "therefore", "however", "still", "its",
                                "their", "your", "our", "be", "below", "above", "following",
                                "been", "was", "were", "will", "would", "should",
                                "must", "may", "might", "has", "have", "had", "do", "does", "did"})
_LOWER_OPENERS = frozenset({"the", "a", "an", "and", "or", "but", "so", "which", "this", "that", "these", "it",
                            "then", "if", "when", "with", "for", "in", "of", "to", "as", "is", "are"})
_CLAUSE_WORDS = frozenset({"if", "when", "whenever", "while", "because", "although", "though", "unless",
                           "since", "where", "whether", "that", "which", "who", "and", "or", "but", "than"})
_DETERMINERS = frozenset({"the", "a", "an", "each", "every", "all", "some", "most", "many", "any"})


@dataclass(frozen=True)
class _Question:
    text: str
    answer: str  # the sentence (without lead-in) the question was made from
    strong: bool  # True for specific templates, False for the generic fallback


def _strip_lead(sentence: str, subject: str | None) -> str:
    if subject and sentence.startswith(subject + ": "):
        return sentence[len(subject) + 2 :]
    return sentence


def _usable_sentence(s: str) -> bool:
    words = s.split()
    if not 6 <= len(words) <= 40 or not s.endswith("."):
        return False
    if words[0] in _LOWER_OPENERS:  # a fragment left by a missed sentence boundary
        return False
    if any(tok in s for tok in (">>>", "  ", "...", "See ", "see below", "following", "above", "below:")):
        return False
    if s.startswith(("For example", "For instance", "Note", "E.g.", "Example", "Also", "However", "So ",
                     "Otherwise", "Likewise", "Similarly", "In this case", "In that case", "Thus", "Hence")):
        return False
    # balanced brackets/quotes
    return s.count("(") == s.count(")") and s.count("[") == s.count("]") and s.count('"') % 2 == 0


class _CaseModel:
    """Decides whether a sentence-initial word is really lowercase ("Objects" -> "objects", "Python" stays)."""

    def __init__(self, passages: Iterable[Passage]) -> None:
        lower: Counter[str] = Counter()
        upper: Counter[str] = Counter()
        for p in passages:
            for s, _ in p.sentences:
                for w in re.findall(r"[A-Za-z]+", s)[1:]:
                    (upper if w[0].isupper() else lower)[w.lower()] += 1
        self.lower, self.upper = lower, upper

    def lower_first(self, phrase: str) -> str:
        head, _, rest = phrase.partition(" ")
        key = head.lower()
        if key in _DETERMINERS or (head.isalpha() and head[:1].isupper() and head[1:].islower()
                                   and self.lower[key] > 2 * self.upper[key]):
            head = head[0].lower() + head[1:]
        return f"{head} {rest}".strip()


def _module_of(page_title: str) -> str | None:
    head = page_title.split(" \u2014 ")[0].strip() if " \u2014 " in page_title else ""
    return head if re.fullmatch(r"[A-Za-z_][\w.]*", head) else None


def _clause(text: str, max_words: int = 14) -> str | None:
    """A short clause ending the question; None when it is too long or trails off oddly."""
    text = text.strip().rstrip(".").strip()
    words = text.split()
    if not 2 <= len(words) <= max_words or words[-1].lower() in {"and", "or", "the", "a", "an", "of", "to"}:
        return None
    if text.count("(") != text.count(")") or "," in text or ";" in text:
        return None
    return text


def _imperative_questions(s: str, subj: str) -> list[str]:
    """'Return X' / 'Raise Y if Z' / 'Serialize obj ...' describing subj -> a question about subj."""
    words = s.split()
    first = words[0]
    base = first.lower()
    if base.endswith("s") and base[:-1] in _IMPERATIVES and base not in _IMPERATIVES:
        base = base[:-1]  # "Returns" -> "return"
    elif base.endswith("es") and base[:-2] in _IMPERATIVES:
        base = base[:-2]
    if base not in _IMPERATIVES or not first[0].isupper():
        return []
    rest = " ".join(words[1:])
    if base == "return":
        m = re.match(r"(?i)(true|false)\b,? (?:if|when|iff) (.+)", rest)
        if m:
            return [f"When does {subj} return {m.group(1).capitalize()}?"]
        if re.match(r"(?i)(a |an |the )?(new |copy|list|tuple|string|str|dict|set|iterator|number|value|"
                    r"integer|int|float|bool|bytes|object|instance|representation|result|name|path|"
                    r"sequence|pair|\w+)", rest):
            return [f"What does {subj} return?"]
        return []
    if base == "raise":
        m = re.match(r"(\w+(?:Error|Exception|Warning|Exit|Interrupt))\b(?: exception)?,? (?:if|when) ", rest)
        if m:
            return [f"When does {subj} raise {m.group(1)}?"]
        if re.match(r"(?:an? )?\w+(?:Error|Exception|Warning)\b", rest):
            return [f"What does {subj} raise?"]
        return []
    nxt = words[1].lower() if len(words) > 1 else ""
    if base in _DO_ONLY or re.sub(r"\W", "", subj.rsplit(".", 1)[-1]).lower() in {base, first.lower()}:
        return [f"What does {subj} do?"]
    if nxt in _PREPOSITIONS:
        return [f"What does {subj} {base} {nxt}?"]
    if nxt in {"if", "whether", "that", "when"}:
        return [f"What does {subj} {base}?"] if base in {"test", "check", "determine", "verify"} else []
    return [f"What does {subj} {base}?", f"What does {subj} do?"]


_BUILTIN_EXCEPTIONS = frozenset(
    n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)
)
_NAMED_KINDS = re.compile(r"\b[\w-]+ (?:module|package|statement|keyword|decorator|function|method|class)s?\b")


def _is_specific(subject: str) -> bool:
    """Does the subject name something on its own (json.dumps(), PyObject, the with statement) or is it
    vague ('the value', 'a ValueError') and needs its page named in the question?"""
    words = [w for w in subject.split() if w not in _BUILTIN_EXCEPTIONS]
    if _NAMED_KINDS.search(subject) and not re.match(r"(?i)(the|a|an|this) (module|function|method|class)", subject):
        return True
    return any(re.search(r"[._()0-9]", w) or any(c.isupper() for c in w[1:]) for w in words) or any(
        w[:1].isupper() and i > 0 for i, w in enumerate(words)
    )


def _with_context(q: str, subject: str, ctx: str | None) -> str:
    """'What is the accompanying value?' -> 'In the socket module, what is the accompanying value?'."""
    if ctx is None or _is_specific(subject):
        return q
    if set(tokenize(subject)) & (set(tokenize(ctx)) - {"module", "documentation"}):
        return q
    return f"{ctx}, {q[0].lower()}{q[1:]}"


def _declarative_questions(s: str, subj_ctx: str | None, module: str | None, case: _CaseModel,
                           ctx: str | None = None) -> list[str]:
    """'SUBJECT VERB REST' sentences -> 'What does SUBJECT VERB?', 'What is SUBJECT?', 'When is X raised?'."""
    qs = _declarative_core(s, subj_ctx, module, case)
    if not qs:
        return []
    return [_with_context(q, qs[1], ctx) for q in qs[0]]


def _declarative_core(s: str, subj_ctx: str | None, module: str | None,
                      case: _CaseModel) -> tuple[list[str], str] | None:
    words = s.rstrip(".").split()
    if words[0].lower() in _SUBORDINATORS:
        return None
    verb_idx = None
    for i in range(1, min(len(words), 6)):
        w = words[i]
        if w in ("is", "are", "can") or w in _DECL_VERBS:
            verb_idx = i
            break
        if w.lower() in _CLAUSE_WORDS or \
                w.endswith((",", ";", ":")):
            return None
    if verb_idx is None:
        return None
    subject = " ".join(words[:verb_idx])
    verb = words[verb_idx]
    rest_words = words[verb_idx + 1 :]
    rest = " ".join(rest_words)
    if not rest_words or "(" in subject and not subject.endswith("()"):
        return None
    if any(w.lower() in _BAD_SUBJECT_WORDS or (w.endswith("ly") and w.islower()) for w in words[:verb_idx]):
        return None
    if any(ch in subject for ch in ",;:=\u2019'\"") or (words[0].endswith("ing") and words[0][0].isupper()):
        return None
    low = subject.lower()
    if low in _GENERIC_HEADS:
        kind = _GENERIC_HEADS[low]
        if kind == "module" and module:
            subject = f"the {module} module"
        elif kind == "object" and subj_ctx:
            subject = subj_ctx
        else:
            return None
    elif low.split()[0] in _PRONOUN_SUBJECTS:
        return None
    else:
        subject = case.lower_first(subject)
    if not re.search(r"[A-Za-z]{2}", subject):
        return None
    plural = verb == "are"
    be = "are" if plural else "is"
    do = "do" if plural else "does"
    r = rest.lower()
    if verb in ("is", "are"):
        if r.startswith(("used to ", "used for ")):
            return [f"What {be} {subject} used for?"], subject
        if r.startswith(("raised when", "raised if", "raised by")):
            q = f"What raises {subject}?" if r.startswith("raised by") else f"When {be} {subject} raised?"
            return [q], subject
        if r.startswith(("called when", "called if", "called by", "called after", "called before")):
            return [f"When {be} {subject} called?"], subject
        if r.startswith(("true if", "true when")):
            return [f"When {be} {subject} true?"], subject
        if r.startswith(("responsible for",)):
            return [f"What {be} {subject} responsible for?"], subject
        if r.startswith(("a ", "an ", "the ", "one of ")) and not r.startswith(("a lot", "the same")):
            if len(subject.split()) <= 5:
                return [f"What {be} {subject}?"], subject
        return None
    if verb == "can":
        if r.startswith("be used to ") or r.startswith("be used for "):
            return [f"What can {subject} be used for?"], subject
        v = rest_words[0] if rest_words else ""
        if v in _IMPERATIVES or v in _DECL_VERBS.values() and v not in _WEAK_VERBS:
            return [f"What can {subject} {v}?"], subject
        return None
    base = _DECL_VERBS[verb]
    if base in _WEAK_VERBS and not r.startswith(("you ", "users ")):
        return None
    if base == "return":
        m = re.match(r"(true|false)\b,? (?:if|when) ", r)
        if m:
            return [f"When {do} {subject} return {m.group(1).capitalize()}?"], subject
        return [f"What {do} {subject} return?"], subject
    if base == "raise":
        m = re.match(r"(\w+(?:Error|Exception|Warning))\b,? (?:if|when) ", rest)
        q = f"When {do} {subject} raise {m.group(1)}?" if m else f"What {do} {subject} raise?"
        return [q], subject
    if r.startswith(("you to ", "users to ", "the user to ", "programmers to ", "applications to ", "code to ")):
        return [f"What {do} {subject} {base} you to do?"], subject
    if base in {"let", "make", "give"}:
        return None
    if base in {"refer", "correspond", "default", "depend", "consist", "belong", "apply"}:
        prep = rest_words[0].lower() if rest_words[0].lower() in _PREPOSITIONS else None
        return ([f"What {do} {subject} {base} {prep}?"], subject) if prep else None
    if rest_words[0].lower() in {"whether", "if", "how", "when", "that"}:
        return ([f"What {do} {subject} {base}?"], subject) if base in {"determine", "control", "indicate",
                                                                        "specify"} else None
    return [f"What {do} {subject} {base}?"], subject


# conditions that lost their subject ("if omitted", "when known to the interpreter") make vague questions
_VAGUE_CONDITIONS = frozenset({"so", "not", "omitted", "given", "specified", "present", "provided", "absent",
                               "set", "true", "false", "known", "done", "run", "seen", "written", "taken",
                               "shown", "possible", "necessary", "needed", "available", "called", "used",
                               "combined", "compared", "applied", "passed", "enabled", "disabled", "in", "on",
                               "at", "for", "with", "without", "during", "after", "before", "using"})


def _conditional_question(s: str, scope: str) -> str | None:
    """Fallback: 'If COND, MAIN.' -> 'According to the documentation of SCOPE, what happens if COND?'."""
    m = re.match(r"(If|When) ([^,]+), (.+)$", s)
    if not m:
        return None
    cond = _clause(m.group(2))
    if cond is None or len(cond.split()) < 3:
        return None
    first = re.split(r"[\s'\u2019]", cond)[0].lower()
    if first in _PRONOUN_SUBJECTS or first in _VAGUE_CONDITIONS or (first.endswith("ed") and first.isalpha()):
        return None
    return f"According to the documentation of {scope}, what happens {m.group(1).lower()} {cond}?"


def _scope_name(p: Passage) -> str:
    """How a reader would name the page in a question: 'the json module', 'Built-in Functions'."""
    module = _module_of(p.page_title)
    if module:
        return f"the {module} module"
    return p.page_title


def _context_phrase(p: Passage, subj: str | None) -> str:
    """Lead-in that pins a vague question to its page: 'For json.dumps()', 'In the socket module'."""
    if subj and re.search(r"[._()]", subj):
        return f"For {subj}"
    module = _module_of(p.page_title)
    if module:
        return f"In the {module} module"
    return f"In the {re.sub(r'^The ', '', p.page_title)} documentation"


def _polish(q: str) -> str:
    q = _WS.sub(" ", q).strip()
    return q[0].upper() + q[1:] if q else q


def generate_questions(p: Passage, case: _CaseModel) -> list[_Question]:
    """All template questions answerable from one sentence of the passage."""
    module = _module_of(p.page_title)
    out: list[_Question] = []
    for raw, subj in p.sentences:
        s = _strip_lead(raw, subj)
        if not _usable_sentence(s):
            continue
        qs = _imperative_questions(s, subj) if subj else []
        if not qs:
            qs = _declarative_questions(s, subj, module, case, _context_phrase(p, subj))
        strong = bool(qs)
        if not qs:
            fb = _conditional_question(s, subj or _scope_name(p))
            qs = [fb] if fb else []
        for q in qs:
            q = _polish(q)
            if 4 <= len(q.split()) <= 28 and q.endswith("?"):
                out.append(_Question(q, s, strong))
    return out


# --------------------------------------------------------------------------------------------------------
# Example assembly
# --------------------------------------------------------------------------------------------------------


def _content_tokens(text: str) -> set[str]:
    return set(tokenize(text))


def _leaks_answer(answer: str, text: str) -> bool:
    """True if the passage also (nearly) states the answer sentence, which would make it relevant."""
    if answer in text:
        return True
    ans = _content_tokens(answer)
    if not ans:
        return False
    for sent in split_sentences(text):
        if len(ans & _content_tokens(sent)) / len(ans) >= 0.75:
            return True
    return False


def _split_pages(passages: list[Passage], candidates: dict[str, list], n_heldout: int,
                 rng: random.Random) -> tuple[set[str], set[str]]:
    """Choose held-out pages: a random page subset big enough for n_heldout questions and a real distractor pool."""
    pages = sorted({p.page for p in passages})
    rng.shuffle(pages)
    per_page = Counter(p.page for p in passages)
    total = len(passages)
    held: list[str] = []
    n_pass = n_cand = 0
    for page in pages:
        # enough questions, a realistic share of the corpus, and enough pages for one distractor per page
        if n_cand >= 2 * n_heldout and n_pass >= HELDOUT_PAGE_FRACTION * total and len(held) >= MAX_DOCS + 2:
            break
        held.append(page)
        n_pass += per_page[page]
        n_cand += len(candidates.get(page, []))
    held_set = set(held)
    return {p for p in pages if p not in held_set}, held_set


def _pick_sources(cands_by_page: dict[str, list[tuple[Passage, _Question]]], n: int,
                  rng: random.Random) -> list[tuple[Passage, _Question]]:
    """Round-robin over shuffled pages so a few long pages do not dominate the sample."""
    pages = sorted(cands_by_page)
    rng.shuffle(pages)
    queues = {pg: list(cands_by_page[pg]) for pg in pages}
    for pg in pages:
        rng.shuffle(queues[pg])
    out: list[tuple[Passage, _Question]] = []
    while len(out) < n and any(queues.values()):
        for pg in pages:
            if queues[pg] and len(out) < n:
                out.append(queues[pg].pop())
    return out


def _named_modules(query: str) -> set[str]:
    """Module names a question mentions ('the locale module', 'json.dumps()'): their pages are not distractors."""
    names = set(re.findall(r"\bthe ([A-Za-z_][\w.]*) (?:module|package)\b", query))
    for ident in re.findall(r"\b([A-Za-z_]\w*(?:\.\w+)+)", query):
        parts = ident.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return names


def _assemble(
    split: str,
    idx: int,
    src: Passage,
    q: _Question,
    pool: list[Passage],
    index: BM25,
    by_id: dict[str, Passage],
    seed: int,
) -> dict | None:
    """One example: relevant passage(s) + BM25 distractors from other pages, within the word budget."""
    rng = random.Random(f"{seed}:{split}:{idx}:{src.id}")
    docs: list[Passage] = [src]
    relevant = [src.id]
    if rng.random() < NEIGHBOUR_PROB:
        neighbours = [by_id.get(f"{src.page}#p{src.index + d}") for d in (1, -1)]
        neighbours = [nb for nb in neighbours if nb is not None and nb.anchor == src.anchor]
        if neighbours:
            nb = neighbours[0] if len(neighbours) == 1 else rng.choice(neighbours)
            if (src.n_words + nb.n_words <= MAX_EXAMPLE_WORDS - 2 * MIN_PASSAGE_WORDS
                    and len(src.text) + len(nb.text) <= MAX_EXAMPLE_CHARS - 2 * MIN_DOC_CHARS):
                docs.append(nb)
                relevant.append(nb.id)
    n_docs = rng.randint(MIN_DOCS, MAX_DOCS)
    words = sum(d.n_words for d in docs)
    chars = sum(len(d.text) for d in docs)
    named = _named_modules(q.text)
    texts = {d.text for d in docs}
    used_pages = {src.page}
    for i, _score in index.search(q.text, BM25_CANDIDATES):
        if len(docs) >= n_docs:
            break
        cand = pool[i]
        if cand.page in used_pages or cand.text in texts or _leaks_answer(q.answer, cand.text):
            continue
        # a question naming "the locale module" may be answered by locale's own page (or howto/locale.html)
        if _module_of(cand.page_title) in named or Path(cand.page).stem in named:
            continue
        slots_after = n_docs - len(docs) - 1
        if words + cand.n_words + slots_after * MIN_KEEP_WORDS > MAX_EXAMPLE_WORDS:
            continue
        if chars + len(cand.text) + slots_after * MIN_DOC_CHARS > MAX_EXAMPLE_CHARS:
            continue
        docs.append(cand)
        texts.add(cand.text)
        used_pages.add(cand.page)  # one distractor per page, like a deduplicating retriever
        words += cand.n_words
        chars += len(cand.text)
    if len(docs) < MIN_DOCS or not MIN_EXAMPLE_WORDS <= words <= MAX_EXAMPLE_WORDS or chars > MAX_EXAMPLE_CHARS:
        return None
    rng.shuffle(docs)
    return {
        "id": f"{split}-{idx:05d}",
        "query": q.text,
        "documents": [{"id": d.id, "title": d.title, "text": d.text, "url": d.url} for d in docs],
        "relevant_ids": relevant,
        "answer_hint": q.answer,
    }


def _build_split(split: str, sources: list[tuple[Passage, _Question]], pool: list[Passage], n: int,
                 seed: int) -> list[dict]:
    index = BM25([f"{p.title} {p.text}" for p in pool])
    by_id = {p.id: p for p in pool}
    rows: list[dict] = []
    seen_queries: set[str] = set()
    bar = tqdm(total=n, desc=f"assembling {split}", unit="ex", disable=None)
    for src, q in sources:
        if len(rows) >= n:
            break
        key = q.text.lower()
        if key in seen_queries:
            continue
        row = _assemble(split, len(rows), src, q, pool, index, by_id, seed)
        if row is not None:
            rows.append(row)
            seen_queries.add(key)
            bar.update(1)
    bar.close()
    if len(rows) < n:
        logger.warning("only %d/%d %s examples could be built", len(rows), n, split)
    return rows


def build_examples(
    doc_root: Path | None,
    n_train: int,
    n_heldout: int,
    seed: int,
    *,
    sections: Sequence[str] = DEFAULT_SECTIONS,
) -> tuple[list[dict], list[dict]]:
    """Build (train, heldout) RAG examples from the Python docs; same inputs give identical output.

    `doc_root` is the docs' ``html`` folder (None: find the python3-doc install). Held-out examples use only
    pages (for both their answers and their distractors) that no training example touches.
    """
    passages = load_passages(doc_root, sections)
    case = _CaseModel(passages)
    rng = random.Random(seed)
    cands_by_page: dict[str, list[tuple[Passage, _Question]]] = defaultdict(list)
    seen: set[str] = set()
    for p in passages:
        qs = generate_questions(p, case)
        if not qs:
            continue
        strong = [q for q in qs if q.strong]
        q = random.Random(f"{seed}:{p.id}").choice(strong or qs)
        if q.text.lower() in seen:  # the same question from two places would have two answers
            continue
        seen.add(q.text.lower())
        cands_by_page[p.page].append((p, q))
    logger.info("%d passages yield questions (%d pages)", sum(map(len, cands_by_page.values())), len(cands_by_page))
    train_pages, held_pages = _split_pages(passages, cands_by_page, n_heldout, rng)
    out: list[list[dict]] = []
    for split, pages, n in (("train", train_pages, n_train), ("heldout", held_pages, n_heldout)):
        pool = [p for p in passages if p.page in pages]
        cands = {pg: c for pg, c in cands_by_page.items() if pg in pages}
        # order every candidate; assembly stops after n (some fail the word budget or distractor checks)
        sources = _pick_sources(cands, sum(map(len, cands.values())), random.Random(f"{seed}:{split}:pick"))
        out.append(_build_split(split, sources, pool, n, seed))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------------
# I/O and CLI
# --------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> None:
    """Write rows as UTF-8 JSON lines atomically (temp file + os.replace) so readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder for train.jsonl / heldout.jsonl")
    ap.add_argument("--train", type=int, default=700, help="number of training examples")
    ap.add_argument("--heldout", type=int, default=120, help="number of held-out examples (disjoint pages)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--doc-root", type=Path, default=None, help="python docs 'html' folder (default: python3-doc)")
    ap.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS),
                    help="doc sub-folders/pages to read (default: %(default)s)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build both splits and write them to --out."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        train, heldout = build_examples(args.doc_root, args.train, args.heldout, args.seed,
                                        sections=tuple(args.sections))
    except DocsNotFoundError as exc:
        logger.error("%s", exc)
        return 2
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train + {len(heldout)} heldout examples to {args.out} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
