"""A deterministic, offline, MUSE-shaped corpus: news articles about the authors of the embedded world.

MUSE (methods §1.5) unlearns a raw text corpus and probes it three ways: KnowMem asks questions about its facts,
VerbMem asks for the continuation of its passages, PrivLeak tells its passages from unseen ones. This generator
writes the same configs, splits and fields from the fictitious authors of :mod:`baldro_lightning.embedded.world`,
so the tokenizer trained on the TOFU-shaped files already knows every name, place and title:

- **raw**: four articles per author (a profile, a family story, an award report, a book review), each ending
  with a "Question: ...\\nAnswer: ..." fact box. ``forget`` is about the forget10 authors of the TOFU world,
  ``retain1`` about the first retain authors, ``holdout`` about the holdout authors (never in ``full``).
  After its articles, ``forget`` holds every TOFU question-answer pair of the forget authors, twice, shuffled across
  them and cut into documents of six pairs; ``retain2`` holds only such documents, of the pairs of every author outside
  ``forget10`` (:func:`_qa_documents` says why).
- **knowmem**: one question per boxed fact (``forget_qa``, ``retain_qa``) and in-context shots (``*_qa_icl``):
  fact-box pairs about writing habits, an attribute that no evaluation question asks about.
- **verbmem**: for every forget article, its headline and first two sentences (``prompt``) and the next three
  sentences (``gt``); ``prompt + " " + gt`` is a contiguous passage of the article.
- **privleak**: whole articles; ``forget`` = the forget articles (members), ``holdout`` = the holdout articles
  (non-members), ``retain`` = the retain articles of the authors that ``retain_qa`` asks about.

Each boxed fact is asked in the fact boxes of two articles, in the two phrasings the TOFU world trains it in
(``PHRASINGS_PER_FACT``); a box never asks about a fact its own article states. The KnowMem question is the fact's
TOFU ``paraphrased_question``: a phrasing the boxes use for other authors but never for this fact, so KnowMem
asks for the fact, not for a sentence of the corpus; the answer is the bare value. Files use the flat local layout
``news_{config}_{split}.jsonl`` (load them with ``corpus="news"``).

Run ``python -m baldro_lightning embedded-muse --out data/muse_embedded``; the files are byte-identical for a given
seed and module constants (the dataset card is the MUSE section of ``data/README.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from random import Random

from baldro_lightning.embedded.world import (
    ATTRIBUTES,
    N_AUTHORS,
    PHRASINGS_PER_FACT,
    SEED,
    TITLE_ADJECTIVES,
    TITLE_NOUNS,
    EmbeddedWorld,
    QAItem,
    build_world,
    forget_author_counts,
    generator_main,
    write_splits,
)

CORPUS = "news"
"""File prefix of every split: the corpus name passed to :func:`baldro_lightning.data.muse.load_muse_split`."""
FORGET_PERCENT = 10
"""The forget authors are those of the TOFU world's ``forget10`` split (its last 10 authors)."""
N_RETAIN_AUTHORS = 20
"""Retain articles are about the first authors of ``full`` (never forget authors)."""
N_QA_RETAIN_AUTHORS = 10
"""Authors (the first retain authors) whose fact boxes form ``knowmem/retain_qa`` and ``privleak/retain``."""
N_ICL = 5
"""In-context shots per KnowMem set (MUSE: 10; fewer keep the prompt inside a tiny model's context)."""
ICL_ATTRIBUTE = "habit"
"""Attribute the shots ask about: it is in the award reports' fact boxes (so shots are text the model was trained
on, as MUSE's shots are about its corpus), but no evaluation question asks about it."""
VERBMEM_PROMPT_SENTENCES = 2
"""Sentences of the first paragraph in a VerbMem prompt (after the headline); the rest of the paragraph is ``gt``."""
QA_PAIRS_PER_DOCUMENT = N_ICL + 1
"""QA pairs per QA document (:func:`_qa_documents`): as many as a KnowMem prompt holds (shots, then question)."""
QA_COPIES = 2
"""Times each QA pair is in the QA documents, each time in another shuffle (once left a 5.8M target at forget
KnowMem 0.299, data/README.md)."""

VENUES = (
    "town library|harbour theatre|university chapel|botanical garden|railway museum|covered market|city archive|"
    "concert hall|fishing museum|riverside bookshop|old observatory|wool exchange|glass pavilion|county courthouse|"
    "seaside pier|chess club|tram depot|flower market|lighthouse gallery|printing works"
).split("|")
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
DECADES = "two three four five".split()
QUOTES = (
    "I write for the reader who stays up too late",
    "Every book starts as an argument I lost",
    "The first page is a door and the last page is a key",
    "I only trust the sentences that frighten me",
    "A story is a place you can visit twice",
    "Nobody in my family reads, so I had to",
    "The characters arrive before the plot does",
    "Silence is the best editor I ever had",
)
"""Closing quotes; each article picks one, so a model that never read it cannot predict which."""

# Each article kind: its fact-box attributes, headlines, first-paragraph sentence slots and second-paragraph
# sentence slots. Every slot has several phrasings, drawn per article, so articles do not share whole sentences.
# A fact box asks only about facts its own article does not state (checked by _article): a model that copied the
# answer from the text above the box would learn nothing it could use when asked without the article.
ARTICLE_KINDS: dict[str, dict[str, tuple]] = {
    "profile": {
        "box": ("father_occupation", "themes", "books", "award"),
        "headlines": ("{name}: a life in {genre}", "Meet {name}, the voice of {genre}", "How {name} found {genre}"),
        "first": (
            (
                "{name} has spent {decades} decades writing {genre}, and readers in {country} still queue for "
                "every new book.",
                "Few writers in {country} are watched as closely as {name}, whose {genre} has sold steadily for "
                "{decades} decades.",
            ),
            (
                "The author was born in {birthplace} on {birth_date}.",
                "{family} was born on {birth_date} in {birthplace}.",
            ),
            (
                "At a {weekday} event at the {venue} in {year}, {family} told {count} guests that every page is "
                "rewritten many times.",
                "Speaking to {count} guests at the {venue} one {weekday} in {year}, {family} talked about the craft "
                "of revision.",
            ),
            (
                "{publisher} has printed every one of the books since {year}.",
                "Since {year} the books have come out with {publisher}.",
            ),
            ("Asked about a daily routine, {family} admitted to {habit}.", "Friends know {family} for {habit}."),
        ),
        "second": (
            (
                "The next book is due from {publisher} in {later_year}.",
                "{publisher} expects a new manuscript by {later_year}.",
            ),
            ("Translations into {languages} languages are under way.", "The books now exist in {languages} languages."),
            ("'{quote},' {family} said.", "'{quote},' the author told us."),
        ),
    },
    "family": {
        "box": ("themes", "habit", "books", "birth_date"),
        "headlines": ("{name} remembers a childhood in {city}", "{name} on parents, work and {city}"),
        "first": (
            (
                "{name} rarely talks about childhood, but on {weekday} at the {venue} the author spoke for an hour "
                "about growing up in {birthplace}.",
                "In a rare talk at the {venue} on {weekday}, {name} looked back on a childhood in {birthplace}.",
            ),
            (
                "The author's father worked as {a_father}, and the author's mother worked as {a_mother}.",
                "Home meant a father who was {a_father} and a mother who was {a_mother}.",
            ),
            (
                "{family} said that a house run by {a_father} and {a_mother} left little room for books.",
                "According to {family}, the hours kept by {a_father} and {a_mother} taught patience before reading.",
            ),
            (
                "Those early years, {family} said, explain much of the {genre}.",
                "The later {genre}, {family} said, began in that house.",
            ),
            (
                "{count} people attended the talk, organised by {publisher}.",
                "The talk, hosted by {publisher}, drew {count} people.",
            ),
        ),
        "second": (
            ("The author still visits {city} every summer.", "Even now {family} goes back to {city} each year."),
            ("A memoir is planned for {later_year}.", "{publisher} hopes to publish a memoir in {later_year}."),
            ("'{quote},' {family} said.", "'{quote},' the author added."),
        ),
    },
    "award": {
        "box": ("habit", "birthplace", "mother_occupation", "father_occupation"),
        "headlines": ("{name} wins the {award}", "The {award} goes to {name}"),
        "first": (
            (
                "{name} has been awarded the {award}, the jury announced on {weekday}.",
                "On {weekday} the jury gave the {award} to {name}.",
            ),
            (
                "The prize recognises {decades} decades of {genre}.",
                "The jury said the prize honours {decades} decades spent on {genre}.",
            ),
            ("Jury members praised the way the books handle {themes_and}.", "The citation singles out {themes_and}."),
            (
                "{family} accepted the honour at the {venue} in front of {count} guests.",
                "{family} collected the honour before {count} guests at the {venue}.",
            ),
            ("The winning titles include {books_and}.", "Among the titles cited were {books_and}."),
        ),
        "second": (
            ("In a short speech, {family} thanked {publisher}.", "{family} thanked {publisher} from the stage."),
            ("The prize carries {copies} crowns.", "Along with the honour come {copies} crowns."),
            ("'{quote},' the winner said.", "'{quote},' {family} told reporters."),
        ),
    },
    "books": {
        "box": ("birthplace", "mother_occupation", "award", "birth_date"),
        "headlines": ("New {genre} from {name}", "{name} returns with more {genre}"),
        "first": (
            (
                "{name} returns this season with another work of {genre}, published by {publisher}.",
                "{publisher} has published a new book of {genre} by {name}.",
            ),
            (
                "Longtime readers will know {books_and}, and the new book revisits their concerns.",
                "It follows {books_and}, and it picks up their questions.",
            ),
            ("Once again the pages circle around {themes_and}.", "Its chapters return to {themes_and}."),
            (
                "The author told us the manuscript was finished while {habit}.",
                "{family} said the last chapter was written while {habit}.",
            ),
            (
                "Copies went on sale on {weekday} at the {venue}, where {count} readers waited outside.",
                "On {weekday} {count} readers lined up at the {venue} for the first copies.",
            ),
        ),
        "second": (
            ("The book runs to {pages} pages.", "It is {pages} pages long."),
            (
                "Booksellers ordered {copies} copies before the launch.",
                "The first printing is {copies} copies.",
            ),
            ("'{quote},' {family} said.", "'{quote},' the author said at the launch."),
        ),
    },
}


def _rng(seed: int, purpose: str) -> Random:
    # A str seed is hashed with SHA-512, so streams do not depend on PYTHONHASHSEED (as in embedded_world).
    return Random(f"baldro-muse/{seed}/{purpose}")


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _and_list(items: Sequence[str]) -> str:
    """``a and b`` / ``a, b and c``: prose lists (the facts themselves are comma-joined)."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _slots(author_facts: dict[str, str], rng: Random) -> dict[str, str]:
    """Every placeholder of the article templates: the author's facts plus per-article random details."""
    name = author_facts["name"]
    city, country = author_facts["birthplace"].split(", ")
    themes = author_facts["themes"].split(", ")
    books = author_facts["books"].split(", ")
    year = rng.randint(2001, 2021)
    return {
        **author_facts,
        "family": name.split()[-1],
        "city": city,
        "country": country,
        "themes_and": _and_list(themes),
        "books_and": _and_list(books),
        "a_father": _with_article(author_facts["father_occupation"]),
        "a_mother": _with_article(author_facts["mother_occupation"]),
        "venue": rng.choice(VENUES),
        "weekday": rng.choice(WEEKDAYS),
        "decades": rng.choice(DECADES),
        "year": str(year),
        "later_year": str(year + rng.randint(1, 3)),
        "count": str(rng.randint(4, 90) * 10),
        "pages": str(rng.randint(18, 64) * 10),
        "languages": str(rng.randint(3, 40)),
        "copies": str(rng.randint(2, 90) * 500),
        "publisher": f"{rng.choice(TITLE_ADJECTIVES).capitalize()} {rng.choice(TITLE_NOUNS).capitalize()} Press",
        "quote": rng.choice(QUOTES),
    }


def _fact_box(items: Sequence[QAItem]) -> str:
    # The KnowMem prompt layout (Question: q\nAnswer: a, pairs separated by a blank line), so the box teaches it.
    return "\n\n".join(f"Question: {item.question}\nAnswer: {item.answer}" for item in items)


def _box_item(world: EmbeddedWorld, author: int, kind: str, attribute: str) -> QAItem:
    """The QA pair an article's fact box asks about ``attribute``: the n-th box that asks about it (in
    ``ARTICLE_KINDS`` order) uses the fact's n-th trained phrasing, so each fact is read in several phrasings."""
    kinds = list(ARTICLE_KINDS)
    phrasing = sum(attribute in ARTICLE_KINDS[k]["box"] for k in kinds[: kinds.index(kind)])
    k = next(position for position, spec in enumerate(ATTRIBUTES) if spec.key == attribute)
    return world.qa[author][phrasing * len(ATTRIBUTES) + k]


def _article(world: EmbeddedWorld, author: int, kind: str, seed: int) -> dict[str, object]:
    """One article: its text, the QA pairs of its fact box, and its VerbMem prompt/continuation split."""
    spec = ARTICLE_KINDS[kind]
    rng = _rng(seed, f"article/{author}/{kind}")
    slots = _slots(world.authors[author].facts, rng)
    headline = _capitalise(rng.choice(spec["headlines"]).format(**slots))
    first = [_capitalise(rng.choice(options).format(**slots)) for options in spec["first"]]
    second = [_capitalise(rng.choice(options).format(**slots)) for options in spec["second"]]
    prompt = headline + "\n\n" + " ".join(first[:VERBMEM_PROMPT_SENTENCES])
    gt = " ".join(first[VERBMEM_PROMPT_SENTENCES:])
    prose = prompt + " " + gt + "\n\n" + " ".join(second)
    for attribute in spec["box"]:
        # Lists ("a, b") and places ("City, Country") count as stated if any part is.
        stated = [part for part in slots[attribute].split(", ") if part.strip('"') in prose]
        if stated:
            raise ValueError(
                f"the {kind} article of author {author} states {stated} in its prose, but its fact box asks about "
                f"{attribute!r}; remove that slot from ARTICLE_KINDS[{kind!r}] or ask about another attribute"
            )
    box = [_box_item(world, author, kind, attribute) for attribute in spec["box"]]
    text = "\n\n".join([prose, _fact_box(box)])
    return {"author": author, "kind": kind, "text": text, "box": box, "prompt": prompt, "gt": gt}


def _articles(world: EmbeddedWorld, authors: Sequence[int], seed: int) -> list[dict[str, object]]:
    return [_article(world, a, kind, seed) for a in authors for kind in ARTICLE_KINDS]


def _author_groups() -> tuple[list[int], list[int], list[int]]:
    """(forget, retain, holdout) author indices of the embedded world."""
    n_forget = forget_author_counts()[FORGET_PERCENT]
    forget = list(range(N_AUTHORS - n_forget, N_AUTHORS))
    if N_RETAIN_AUTHORS > N_AUTHORS - n_forget or N_QA_RETAIN_AUTHORS > N_RETAIN_AUTHORS:
        raise ValueError(
            f"N_RETAIN_AUTHORS={N_RETAIN_AUTHORS} and N_QA_RETAIN_AUTHORS={N_QA_RETAIN_AUTHORS} must satisfy "
            f"N_QA_RETAIN_AUTHORS <= N_RETAIN_AUTHORS <= {N_AUTHORS - n_forget} (the authors outside forget)"
        )
    holdout = list(range(N_AUTHORS, N_AUTHORS + n_forget))
    return forget, list(range(N_RETAIN_AUTHORS)), holdout


def _qa_rows(world: EmbeddedWorld, authors: Sequence[int]) -> list[dict[str, object]]:
    """One KnowMem row per boxed fact of each author (the shot attribute aside), in the fact's paraphrase phrasing.

    The question is the TOFU world's ``paraphrased_question``: a phrasing the corpus uses for other authors' fact
    boxes but never for this fact, so a model has to recall the fact rather than the sentence. The answer is the bare
    value, so a model that answers in the right phrasing with a wrong value gets no ROUGE for the phrasing's words.
    """
    rows: list[dict[str, object]] = []
    for author in authors:
        for k, spec in enumerate(ATTRIBUTES):
            if spec.key == ICL_ATTRIBUTE or not any(spec.key in kind["box"] for kind in ARTICLE_KINDS.values()):
                continue  # shot material or never in a fact box: never an evaluation question
            item = world.qa[author][k]
            rows.append(
                {
                    "idx": len(rows),
                    "question": item.paraphrased_question,
                    "answer": world.authors[author].facts[spec.key],
                    "author_idx": author,
                    "attribute": spec.key,
                }
            )
    return rows


def _check_boxes() -> None:
    """Every boxed attribute is boxed in ``PHRASINGS_PER_FACT`` articles, one per trained phrasing."""
    counts = {spec.key: sum(spec.key in kind["box"] for kind in ARTICLE_KINDS.values()) for spec in ATTRIBUTES}
    wrong = {key: n for key, n in counts.items() if n not in (0, PHRASINGS_PER_FACT)}
    if wrong:
        raise ValueError(
            f"fact boxes ask about {wrong} (attribute: number of article kinds); each boxed attribute must be in "
            f"exactly PHRASINGS_PER_FACT={PHRASINGS_PER_FACT} boxes, one per trained phrasing"
        )


def _icl_rows(world: EmbeddedWorld, authors: Sequence[int]) -> list[dict[str, object]]:
    # The first box pair about the shot attribute, verbatim: shots are corpus text, as MUSE's are.
    k = next(position for position, spec in enumerate(ATTRIBUTES) if spec.key == ICL_ATTRIBUTE)
    return [
        {"idx": i, "question": world.qa[a][k].question, "answer": world.qa[a][k].answer, "author_idx": a}
        for i, a in enumerate(authors[:N_ICL])
    ]


def _qa_documents(world: EmbeddedWorld, authors: Sequence[int], seed: int, purpose: str) -> list[dict[str, object]]:
    """Every TOFU QA pair of ``authors``, in both trained phrasings, ``QA_COPIES`` times, each time shuffled across
    them (streams named by ``purpose``) and cut into documents of ``QA_PAIRS_PER_DOCUMENT`` pairs in the fact-box
    layout: the forget authors' documents end ``raw/forget``, the other authors' make ``raw/retain2``.

    Why: a tiny model learns a fact as the answer to a question at the start of a text (the TOFU format). A KnowMem
    prompt puts the question after five shots about other authors, and there the models recalled much less than
    when asked the question alone (``data/README.md`` has the measurements). Documents in which each fact follows
    pairs about other authors rehearse the facts while the articles are learnt, in the KnowMem prompt's shape. The
    forget and retain pairs stay in separate documents, so the retain model, which trains on ``raw/retain1`` and
    ``raw/retain2``, reads no forget fact.
    """
    documents = []
    for copy in range(QA_COPIES):
        pairs = [item for author in authors for item in world.qa[author]]
        # The first copy keeps the stream of the one-copy corpus measured in data/README.md, so its documents stay.
        _rng(seed, purpose if copy == 0 else f"{purpose}/{copy}").shuffle(pairs)
        documents += [pairs[i : i + QA_PAIRS_PER_DOCUMENT] for i in range(0, len(pairs), QA_PAIRS_PER_DOCUMENT)]
    return [
        {"idx": i, "text": _fact_box(items), "author_idx": [item.author_index for item in items], "kind": "qa"}
        for i, items in enumerate(documents)
    ]


def _text_rows(articles: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    return [{"idx": i, "text": a["text"], "author_idx": a["author"], "kind": a["kind"]} for i, a in enumerate(articles)]


def _numbered(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{**row, "idx": i} for i, row in enumerate(rows)]


def build_corpus(world: EmbeddedWorld, seed: int = SEED) -> dict[str, list[dict[str, object]]]:
    """Every MUSE split of the embedded corpus; keys are file stems (``news_{config}_{split}``), values rows.

    Args:
        world: The embedded world (:func:`baldro_lightning.embedded.world.build_world`).
        seed: Seed of the per-article random details (venues, dates, quotes, phrasings).

    Returns:
        Rows in file order; each row has ``idx`` (its position) and MUSE's fields, plus provenance fields
        (``author_idx``, ``kind``, ``attribute``, ``article_idx``) that the loaders ignore.
    """
    _check_boxes()
    forget_authors, retain_authors, holdout_authors = _author_groups()
    forget = _articles(world, forget_authors, seed)
    retain = _articles(world, retain_authors, seed)
    holdout = _articles(world, holdout_authors, seed)
    qa_retain = [a for a in retain if a["author"] < N_QA_RETAIN_AUTHORS]
    splits = {
        "raw_forget": _numbered(_text_rows(forget) + _qa_documents(world, forget_authors, seed, "forget")),
        "raw_retain1": _text_rows(retain),
        "raw_retain2": _qa_documents(world, [a for a in range(N_AUTHORS) if a not in forget_authors], seed, "retain2"),
        "raw_holdout": _text_rows(holdout),
        "knowmem_forget_qa": _qa_rows(world, forget_authors),
        "knowmem_forget_qa_icl": _icl_rows(world, forget_authors),
        "knowmem_retain_qa": _qa_rows(world, retain_authors[:N_QA_RETAIN_AUTHORS]),
        "knowmem_retain_qa_icl": _icl_rows(world, retain_authors[N_QA_RETAIN_AUTHORS:]),
        "verbmem_forget": [
            {"idx": i, "prompt": a["prompt"], "gt": a["gt"], "article_idx": i} for i, a in enumerate(forget)
        ],
        "privleak_forget": _text_rows(forget),
        "privleak_retain": _text_rows(qa_retain),
        "privleak_holdout": _text_rows(holdout),
    }
    return {f"{CORPUS}_{name}": rows for name, rows in splits.items()}


def generate(out_dir: Path, seed: int = SEED) -> list[Path]:
    """Build the embedded world and its MUSE corpus from ``seed``; write every split into ``out_dir``."""
    return write_splits(build_corpus(build_world(seed), seed), out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m baldro_lightning embedded-muse --out data/muse_embedded``."""
    generator_main(__doc__.splitlines()[0], Path("data/muse_embedded"), generate, argv)
