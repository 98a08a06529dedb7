"""Build a second, out-of-domain held-out set of RAG examples from Debian package descriptions.

Why: the groundedness signal (does an answer sentence depend on the retrieved documents?) is trained and first
evaluated on the Python documentation (scripts/build_dataset.py). To see whether it holds on other technical text,
this builds held-out examples from a different kind of prose: the long descriptions of Debian packages (what a
package is, what it provides, what it supports), written by thousands of maintainers in many styles.

Half of the examples are *mismatched*: the question of one example is asked over another example's documents, so
no answer can stand on those documents. Such a line has ``"mismatched": true`` and ``"relevant_ids": []``; it keeps
the ``answer_hint`` (the sentence the question was made from) and ``question_from`` (the passage it came from, which
is not among its documents).

Source: Debian's ``Translation-en`` index (one ``Package`` / ``Description-md5`` / ``Description-en`` stanza per
package; the long descriptions are only there, not in the ``Packages`` index) and, optionally, the ``Packages`` index
of the same release for each binary package's ``Source``, so that packages built from one source (libfoo1,
libfoo-dev, ...), which share paragraphs, are never each other's distractors. Both are plain deb822 text files (or
.gz/.bz2/.xz); get them with::

    apt-get -o Acquire::Languages=en update
    lz4cat /var/lib/apt/lists/*_debian_dists_bookworm_main_i18n_Translation-en.lz4 > Translation-en
    lz4cat /var/lib/apt/lists/*_debian_dists_bookworm_main_binary-amd64_Packages.lz4 > Packages

Run as ``python scripts/build_second_domain.py --translations Translation-en --packages Packages
--out data/rag_second_domain --examples 80 --seed 0``. Same files and seed give byte-identical output.

Passages, question templates, the BM25 retriever, distractor assembly and the JSONL writer are those of
scripts/build_dataset.py (imported, so both sets are made the same way); only reading the source and the
mismatched pairing are new here. Output lines are ``{"id", "query", "documents": [{"id", "title", "text", "url"}],
"relevant_ids", "answer_hint", "mismatched", "question_from"}``.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import importlib.util
import logging
import lzma
import random
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TextIO

logger = logging.getLogger(__name__)


def _load_build_dataset() -> ModuleType:
    """scripts/build_dataset.py is a sibling script, not a package module: load it from its path (once)."""
    if "build_dataset" in sys.modules:
        return sys.modules["build_dataset"]
    path = Path(__file__).resolve().parent / "build_dataset.py"
    spec = importlib.util.spec_from_file_location("build_dataset", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bd = _load_build_dataset()
write_jsonl = bd.write_jsonl

RELEASE = "bookworm"
SPLIT = "heldout"
# Passages are whole sentences of one description, 60-150 words (as the Python-docs set's, but no shorter scraps:
# a description under 60 words is mostly a one-line summary).
MIN_PASSAGE_WORDS = bd.MIN_PASSAGE_WORDS
MAX_PASSAGE_WORDS = bd.MAX_PASSAGE_WORDS
# "This package provides ..." -> "the foo package provides ...": the question must name what it asks about
_GENERIC_OPENER = re.compile(
    r"^(?:(?:This|The) (?:(?:binary|source|Debian|dummy|transitional|meta) )?(?:package|library|tool|program|utility|"
    r"module|plugin|plug-in|extension|application|software|daemon|server|client|framework|toolkit|binary|"
    r"metapackage)|Package)\b"
    r"(?= (?:is|are|can|also|[a-z]+s)\b)"  # then its verb ('The package iter provides' names another package)
)
_BULLET = re.compile(r"^\s*(?:[-*+o\u2022]|\d+[.)]|[a-z][.)])\s")
_URL = re.compile(r"\b(?:https?|ftp)://|www\.")
# words of a subject that do not name a package on their own ('the Python module' is not python3-foo)
_GENERIC_TOKENS = frozenset("""package library module tool tools program utility plugin extension application
    files file data python python3 perl java ruby golang rust lib dev doc docs common bin utils""".split())
# a 'verb' followed by one of these is a noun ('copies of', 'reads can')
_NOT_AFTER_VERB = frozenset({"of", "can", "is", "are", "may", "will", "must", "should", "have", "has", "was", "were"})
_ANAPHORS = frozenset({"latter", "former", "first", "second", "third", "last", "next", "other", "another", "same",
                       "each", "both", "such", "above", "previous", "these", "most", "many", "some", "several",
                       "all"})
# share of the 'This package contains ...' questions kept: most questions ask about a named thing
WEAK_SHARE = 0.3


@dataclass(frozen=True)
class Description:
    """One binary package's description: name, one-line summary and the prose paragraphs of its long text."""

    package: str
    summary: str
    paragraphs: tuple[str, ...]
    md5: str = ""


# --------------------------------------------------------------------------------------------------------
# Reading the deb822 indexes
# --------------------------------------------------------------------------------------------------------


def _open_text(path: Path) -> TextIO:
    """A deb822 index as text, plain or compressed the way Debian mirrors and snapshots serve it."""
    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    opener = openers.get(path.suffix)
    if opener is not None:
        return opener(path, "rt", encoding="utf-8", errors="replace")  # type: ignore[no-any-return]
    if path.suffix == ".lz4":
        raise ValueError(f"{path}: decompress it first (`lz4cat {path} > {path.stem}`): lz4 is not in the stdlib")
    return open(path, encoding="utf-8", errors="replace")


def iter_stanzas(path: Path | str) -> Iterator[dict[str, str]]:
    """Stanzas of a deb822 file as {field: value}; continuation lines are kept (with their leading space)."""
    stanza: dict[str, str] = {}
    key: str | None = None
    with _open_text(Path(path)) as fh:
        for raw in fh:
            line = raw.rstrip("\n")
            if not line.strip():
                if stanza:
                    yield stanza
                stanza, key = {}, None
            elif line[0] in " \t":
                if key is not None:
                    stanza[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                stanza[key] = value.strip()
    if stanza:
        yield stanza


def _prose_paragraphs(body_lines: Sequence[str]) -> list[str]:
    """Prose of a long description: ' .' separates paragraphs; bullet items and verbatim (indented) lines, which
    are lists, code or ASCII art, are dropped, and so is a sentence ending in ':' that introduced them."""
    paragraphs: list[str] = []
    run: list[str] = []

    def close() -> None:
        if run:
            text = bd._tidy_paragraph(bd._clean(" ".join(run)))
            if text and not text.endswith(":"):
                paragraphs.append(text)
            run.clear()

    for line in body_lines:
        content = line[1:] if line.startswith(" ") else line
        if content.strip() == ".":
            close()
        elif content.startswith((" ", "\t")) or _BULLET.match(content):
            close()  # a list or verbatim block ends the prose before it
        else:
            run.append(content.strip())
    close()
    return paragraphs


def read_descriptions(path: Path | str) -> list[Description]:
    """Every package's description from a Translation-en file (first stanza wins for a repeated package)."""
    out: dict[str, Description] = {}
    for st in iter_stanzas(path):
        pkg = st.get("Package", "").strip()
        desc = st.get("Description-en") or st.get("Description")
        if not pkg or not desc or pkg in out:
            continue
        summary, *body = desc.split("\n")
        out[pkg] = Description(pkg, summary.strip(), tuple(_prose_paragraphs(body)), st.get("Description-md5", ""))
    return [out[p] for p in sorted(out)]


def read_sources(path: Path | str | None) -> dict[str, str]:
    """Binary package -> source package from a Packages index ('Source: foo (1.2-1)' -> 'foo'); {} without one."""
    if path is None:
        return {}
    sources: dict[str, str] = {}
    for st in iter_stanzas(path):
        pkg = st.get("Package", "").strip()
        if pkg and pkg not in sources:
            src = st.get("Source", "").split("(")[0].strip()
            sources[pkg] = src or pkg
    return sources


# --------------------------------------------------------------------------------------------------------
# Passages and questions
# --------------------------------------------------------------------------------------------------------


def make_passages(descriptions: Sequence[Description], sources: dict[str, str]) -> list[bd.Passage]:
    """60-150 word passages of whole sentences; `page` is the source package (one distractor per source, never
    the question's own), `anchor` the binary package. A text seen before (same description) is kept once."""
    passages: list[bd.Passage] = []
    seen: set[str] = set()
    for d in descriptions:
        units: list[tuple[str, str | None]] = []
        breaks: set[int] = set()
        for para in d.paragraphs:
            breaks.add(len(units))
            units.extend((s, None) for s in bd.split_sentences(para))
        for i, chunk in enumerate(bd._chunk_section(units, breaks)):
            text = " ".join(s for s, _ in chunk)
            if not MIN_PASSAGE_WORDS <= len(text.split()) <= MAX_PASSAGE_WORDS or text in seen:
                continue
            seen.add(text)
            source = sources.get(d.package, d.package)
            passages.append(bd.Passage(
                id=f"{d.package}#p{i}", page=source, title=f"{d.package}: {d.summary}", text=text,
                url=f"apt:{d.package}?release={RELEASE}", anchor=d.package, page_title=d.summary, index=i,
                sentences=chunk,
            ))
    return passages


def _boilerplate(passages: Sequence[bd.Passage]) -> set[str]:
    """Sentences found in the descriptions of two or more sources ('This package contains the header files.'):
    a question made from one has its answer in many packages."""
    where: dict[str, set[str]] = defaultdict(set)
    for p in passages:
        for s, _ in p.sentences:
            where[s.lower()].add(p.page)
    return {s for s, pages in where.items() if len(pages) > 1}


class _NameCase(bd._CaseModel):
    """The Python-docs case model, except that a name keeps its capitals: the package's own name ('Inline is a
    Perl module' in libinline-perl) or a word followed by a capitalised one ('Entropy Broker')."""

    names: frozenset[str] = frozenset()  # lowercase words of the package being asked about

    def lower_first(self, phrase: str) -> str:
        head, _, rest = phrase.partition(" ")
        if head.lower() not in bd._DETERMINERS and (rest[:1].isupper() or head.lower() in self.names):
            return phrase
        return super().lower_first(phrase)


def _after_verb(sentence: str) -> str | None:
    """The word after the verb that the declarative templates key on ('Multiple copies of ...' -> 'of')."""
    words = sentence.rstrip(".").split()
    for i in range(1, min(len(words), 6)):
        if words[i] in ("is", "are", "can") or words[i] in bd._DECL_VERBS:
            return words[i + 1].lower() if i + 1 < len(words) else None
    return None


def _names_package(subject: str, package: str) -> bool:
    """Does the subject name the package itself ('H5py' for python3-h5py, 'libhivex' for libhivex0)? A plain
    lowercase word after an article ('the colour picker', 'the config file') is a common noun, not a name."""
    name = re.sub(r"[^a-z0-9]", "", package.lower())
    words = subject.split()
    article = words[0].lower() in {"the", "a", "an"}
    for word in words:
        token = re.sub(r"[^a-z0-9]", "", word.lower())
        if token in _GENERIC_TOKENS or not (len(token) >= 3 or token == name) or token not in name:
            continue
        if token == name or not (article and word.isalpha() and word.islower()):
            return True
    return subject.lower() == f"the {package} package"


def generate_questions(p: bd.Passage, case: bd._CaseModel, boilerplate: set[str]) -> list[bd._Question]:
    """Template questions about a sentence of the passage, each naming the package it asks about.

    A sentence about a named thing ('Numpy contains ...') asks about it ('What does Numpy contain?', strong); one
    opening 'This package/library ...' asks about the package by name ('What does the python3-numpy package
    contain?', weak). A subject that is not the package itself is pinned to it ('For the fonts-paratype package,
    what is PT Serif?'), so that the question has one answer among thousands of descriptions."""
    out: list[bd._Question] = []
    if isinstance(case, _NameCase):
        case.names = frozenset(re.split(r"[^a-z0-9]+", p.anchor.lower()))
    for s, _ in p.sentences:
        if s.lower() in boilerplate or _URL.search(s) or not bd._usable_sentence(s):
            continue
        generic = _GENERIC_OPENER.match(s)
        phrased = f"The {p.anchor} package{s[generic.end():]}" if generic else s
        if _after_verb(phrased) in _NOT_AFTER_VERB:  # 'Multiple copies of X', 'The polished reads can be'
            continue
        core = bd._declarative_core(phrased, None, None, case)
        if not core:
            continue
        questions, subject = core
        words = subject.lower().split()
        if set(words) & _ANAPHORS or set(words[1:]) & {"the", "a", "an"}:  # 'the latter'; 'Includes The package'
            continue
        # 'mod_case works by performing two checks': the subject ran past the real verb; TeX markup ('~\\pkg{x}')
        if any(w in bd._DECL_VERBS for w in words[1:]) or re.search(r"\bby \w+ing\b|[\\{}~]", subject):
            continue
        for q in questions:
            if not _names_package(subject, p.anchor):
                q = f"For the {p.anchor} package, {q[0].lower()}{q[1:]}"
            q = bd._polish(q)
            if 4 <= len(q.split()) <= 28 and q.endswith("?"):
                out.append(bd._Question(q, s, not generic))
    return out


# --------------------------------------------------------------------------------------------------------
# Examples: matched (question over its own retrieval) and mismatched (over another example's)
# --------------------------------------------------------------------------------------------------------


def _about(row: dict, docs: Sequence[dict], by_id: dict[str, bd.Passage]) -> bool:
    """Could `docs` answer `row`'s question? True if one is from the question's package or source, names the
    question's package in its title, or (nearly) states its answer sentence."""
    src = by_id[row["question_from"]]
    for d in docs:
        other = by_id[d["id"]]
        if other.page == src.page or other.anchor == src.anchor or src.anchor in d["title"].split(":")[0]:
            return True
        if bd._leaks_answer(row["answer_hint"], d["text"]):
            return True
    return False


def _pair_mismatched(donors: list[dict], by_id: dict[str, bd.Passage],
                     rng: random.Random) -> list[tuple[int, int]] | None:
    """(question example, documents example) pairs over `donors`, a derangement in which no question lands on
    documents that could answer it; None when the tries find none."""
    n = len(donors)
    order = list(range(n))
    for _attempt in range(20):
        rng.shuffle(order)
        for shift in range(1, n):
            pairs = [(order[i], order[(i + shift) % n]) for i in range(n)]
            if not any(_about(donors[a], donors[b]["documents"], by_id) for a, b in pairs):
                return pairs
    return None


def build_examples(
    translations: Path | str,
    packages: Path | str | None,
    n_examples: int,
    seed: int,
) -> list[dict]:
    """`n_examples` held-out rows (half matched, half mismatched, shuffled); same inputs give identical output."""
    if n_examples < 4 or n_examples % 2:
        raise ValueError(f"--examples must be an even number >= 4 (half matched, half mismatched), got {n_examples}")
    passages = make_passages(read_descriptions(translations), read_sources(packages))
    if not passages:
        raise ValueError(f"no description of {MIN_PASSAGE_WORDS}-{MAX_PASSAGE_WORDS} words in {translations}")
    logger.info("%d passages from %d sources", len(passages), len({p.page for p in passages}))
    case = _NameCase(passages)
    boilerplate = _boilerplate(passages)
    cands: dict[str, list[tuple[bd.Passage, bd._Question]]] = defaultdict(list)
    seen: set[str] = set()
    for p in passages:
        qs = generate_questions(p, case, boilerplate)
        if not qs:
            continue
        strong = [q for q in qs if q.strong]
        q = random.Random(f"{seed}:{p.id}").choice(strong or qs)
        if q.text.lower() not in seen:  # the same question from two packages would have two answers
            seen.add(q.text.lower())
            cands[p.page].append((p, q))
    logger.info("%d passages yield questions (%d sources)", sum(map(len, cands.values())), len(cands))
    # one question per source (round-robin over shuffled sources), distractors from every other source
    order = bd._pick_sources(cands, sum(map(len, cands.values())), random.Random(f"{seed}:{SPLIT}:pick"))
    index = bd.BM25([f"{p.title} {p.text}" for p in passages])
    by_id = {p.id: p for p in passages}
    rows: list[dict] = []
    used_sources: set[str] = set()
    weak_rng = random.Random(f"{seed}:{SPLIT}:weak")
    for src, q in order:
        if len(rows) >= n_examples:
            break
        if src.page in used_sources or (not q.strong and weak_rng.random() >= WEAK_SHARE):
            continue
        # by_id={}: no neighbouring passage joins the relevant one (ids here are not page#p<n> of one page)
        row = bd._assemble(SPLIT, len(rows), src, q, passages, index, {}, seed)
        if row is not None:
            row["question_from"] = src.id
            rows.append(row)
            used_sources.add(src.page)
    if len(rows) < n_examples:
        raise ValueError(f"only {len(rows)}/{n_examples} examples could be assembled from {translations}")
    rng = random.Random(f"{seed}:{SPLIT}:mismatch")
    half = n_examples // 2
    for _attempt in range(100):  # which half donates its questions: one whose questions can be paired off
        rng.shuffle(rows)
        matched, donors = rows[:half], rows[half:]
        pairs = _pair_mismatched(donors, by_id, rng)
        if pairs is not None:
            break
    else:
        raise RuntimeError("no mismatched pairing keeps every question away from documents that answer it")
    out = [{**r, "mismatched": False} for r in matched]
    for a, b in pairs:
        out.append({**donors[a], "documents": donors[b]["documents"], "relevant_ids": [], "mismatched": True})
    rng.shuffle(out)
    keys = ("id", "query", "documents", "relevant_ids", "answer_hint", "mismatched", "question_from")
    return [{k: (f"{SPLIT}-{i:05d}" if k == "id" else r[k]) for k in keys} for i, r in enumerate(out)]


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--translations", type=Path, required=True,
                    help="Debian Translation-en index (plain, .gz, .bz2 or .xz) with the long descriptions")
    ap.add_argument("--packages", type=Path, default=None,
                    help="Packages index of the same release, for each binary package's source (recommended)")
    ap.add_argument("--out", type=Path, required=True, help="output folder for heldout.jsonl")
    ap.add_argument("--examples", type=int, default=80, help="number of examples, half of them mismatched")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build the examples and write --out/heldout.jsonl."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        rows = build_examples(args.translations, args.packages, args.examples, args.seed)
    except (OSError, ValueError, RuntimeError) as exc:
        logger.error("%s", exc)
        return 2
    write_jsonl(args.out / "heldout.jsonl", rows)
    n_mis = sum(r["mismatched"] for r in rows)
    docs = Counter(len(r["documents"]) for r in rows)
    print(f"wrote {len(rows)} examples ({len(rows) - n_mis} matched, {n_mis} mismatched; documents per example "
          f"{dict(sorted(docs.items()))}) to {args.out / 'heldout.jsonl'} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
