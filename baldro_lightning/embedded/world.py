"""A deterministic, offline, TOFU-shaped benchmark: fictitious authors of an invented world.

The generator writes the same split names, fields and meanings as TOFU (methods §1.1), at a size a laptop CPU can
fine-tune a tiny model on. Every author is a bundle of facts drawn from value domains; every QA pair asks about
one fact. Answers are short and carried by the fact (template words are few and value vocabularies share few
words), so a model that never saw an author scores a low ROUGE-L recall on that author's answers, while a model
that memorised them scores high: the benchmark discriminates by construction.

Run ``python -m baldro_lightning embedded-world --out data/tofu_embedded``; the files are byte-identical for a
given seed and module constants (the dataset card is ``data/README.md``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random

from baldro_lightning.atomic_files import write_jsonl_atomic

SEED = 0
"""Seed of every random choice; each purpose derives its own ``Random`` from it (no global RNG)."""
N_AUTHORS = 100
"""Fictitious authors in ``full``."""
FORGET_PERCENTS = (1, 5, 10)
"""Forget splits as percentages of the authors: ``forget01`` holds the last 1% of the authors of ``full``."""
RETAIN_PERTURBED_AUTHORS = 10
"""Authors (the first ones of ``full``) whose rows form ``retain_perturbed``; present in every retain split."""
N_PERTURBED = 5
"""Wrong answers per row of the ``*_perturbed`` author splits (TOFU: 5)."""
N_GENERAL_PERTURBED = 3
"""Wrong answers per row of the general-knowledge sets (TOFU: 3)."""
BOOKS_PER_AUTHOR = (2, 3)
"""Smallest and largest number of book titles per author."""
N_COUNTRIES = 16
"""Countries of the world; each gives one world-facts row per kind of fact in ``WORLD_FACT_KINDS``."""
N_CLASSIC_WORKS = 48
"""Classic works (one classic author each) in the real-authors role."""
N_GIVEN_NAMES = 30
"""Given names the authors share (each recurs for about ``(N_AUTHORS + holdout) / N_GIVEN_NAMES`` authors)."""
N_FAMILY_NAMES = 40
"""Family names the authors share; a (given, family) pair is unique."""
N_CITIES = 36
"""Birth cities (each in one country) the authors share."""
N_AWARDS = 30
"""Awards the authors share."""
N_TITLE_ADJECTIVES = 70
"""Title adjectives in use (drawn from ``TITLE_ADJECTIVES``); a title is one adjective and one noun."""
N_TITLE_NOUNS = 70
"""Title nouns in use (drawn from ``TITLE_NOUNS``)."""

# ---------------------------------------------------------------------------------------------------------------
# Value domains. Within a pool, content words are unique (checked by ``_check_pool``), so two values of the same
# attribute share no word a ROUGE scorer could match ("The Silent River" vs "The Silent Harbor" cannot happen
# inside one pool). Words may recur across pools: a model is only ever scored against one attribute at a time.
# ---------------------------------------------------------------------------------------------------------------

COUNTRIES = (
    "Dunmark Velloria Casterra Ombrith Sarnavia Quellan Thystra Borrowmere Izmarra Kestovia Lunevar Pellagos "
    "Rhundal Zevrana Altmoor Feyrith Ondravia Marrowick"
).split()

GENRES = (
    "maritime fiction|alpine mystery|courtroom drama|gothic horror|culinary memoir|pastoral poetry|space opera|"
    "political satire|urban fantasy|nature essays|military history|detective noir|romantic comedy|epistolary novels|"
    "bedtime fables|travel journalism|folk legends|cyber thrillers|magical realism|regency romance|sports biography|"
    "philosophical dialogues|comic verse|frontier westerns|dystopian allegory|medical suspense|dark farce|"
    "spiritual meditations|speculative science|heist capers|coastal idylls|psychological tragedy"
).split("|")

OCCUPATIONS = (
    "lighthouse keeper|glass blower|river pilot|clock mender|sheep shearer|bridge engineer|tax auditor|"
    "orchard farmer|ferry captain|opera singer|mine surveyor|court stenographer|bakery owner|salt merchant|"
    "tram conductor|piano tuner|dental hygienist|customs officer|rope maker|tea importer|quarry foreman|"
    "museum curator|radio operator|wool dyer|fishing guide|hospital chaplain|circus acrobat|railway signalman|"
    "vineyard manager|chess coach|ballet teacher|locomotive mechanic|postal clerk|shoe cobbler|street sweeper|"
    "prison warden|weather forecaster|insurance broker|market gardener|theatre usher|church organist|"
    "canal inspector|pharmacy assistant|stone mason|bank teller|hotel concierge|zoo veterinarian|map engraver|"
    "silk weaver|ice sculptor|toy carpenter|film projectionist"
).split("|")

THEMES = (
    "family debt|coastal erosion|sibling rivalry|urban solitude|lost languages|forbidden love|rural poverty|"
    "wartime memory|religious doubt|colonial guilt|artistic ambition|maternal sacrifice|political exile|"
    "scientific hubris|ecological grief|migrant belonging|childhood fear|moral compromise|class mobility|"
    "digital surveillance|inherited wealth|village gossip|mental illness|bodily decay|unrequited friendship|"
    "generational conflict|corporate greed|spiritual awakening|academic envy|seasonal labour|"
    "maritime superstition|royal succession|culinary heritage|musical obsession|medical ethics|"
    "judicial corruption|frontier survival|ancestral secrets|civic duty|island isolation|silent resistance|"
    "industrial decline|forgotten saints|twin destinies|wounded pride|aging neighbours|hidden archives"
).split("|")

HABITS = (
    "drafting by candlelight|typing on a green typewriter|scribbling aboard night ferries|"
    "dictating chapters to a parrot|composing while swimming laps|sketching maps before plotting|"
    "reading paragraphs aloud to goats|working only after midnight|outlining on index cards|"
    "lingering in hotel lobbies|revising while standing at a lectern|jotting ideas on napkins|"
    "walking ten miles every morning|fasting on deadline days|hearing thunderstorm recordings|"
    "wearing a lucky scarf|rewriting each opening twelve times|hiding manuscripts inside biscuit tins|"
    "using only purple ink|sleeping under the desk|brewing strong cardamom coffee|knitting between scenes|"
    "painting every character first|interviewing strangers at bus stops|keeping a dream diary|"
    "burning rejected drafts|counting words out loud|playing the cello during breaks|"
    "retreating to a mountain cabin|starting from the final sentence|printing proofs in tiny fonts|"
    "collecting overheard dialogue|gardening after each session|pacing barefoot in circles|"
    "humming old hymns|locking the phone in a safe|rising at four o'clock|soaking in a bathtub"
).split("|")

TITLE_ADJECTIVES = (
    "amber ashen bitter brittle burning careless crooked drowsy dusty elegant empty faded feral fickle frozen "
    "gentle gilded hollow humble hungry idle ivory jagged kindly lonely lucky marble mellow molten narrow nimble "
    "obsidian patient pale quiet restless rusted scarlet secret shallow shivering sleepless slender sombre sudden "
    "sullen tender timid twisted velvet vacant wandering weary wicked wistful woven yearning zealous ancient "
    "borrowed broken clever copper crimson distant drifting eager endless fragile furious glassy graceful hidden "
    "honest jaded lavender lazy lingering merciful misty modest mournful nameless noble painted pious proud "
    "radiant reckless savage scattered shadowed silent smoky solemn stolen stubborn sunken tangled tarnished "
    "thirsty tireless trembling unseen vivid wild winding wooden crystal emerald feathered frosted blazing bronze"
).split()

TITLE_NOUNS = (
    "anchor anthem archive attic avalanche ballad banner barley beacon bellows blossom bonfire bracelet bramble "
    "bridle cabinet canyon caravan cathedral cellar chapel chimney cinder citadel cloister clover compass "
    "corridor cottage cradle dagger delta dominion dowry drum dune dynasty echo eclipse ember estuary falcon fern "
    "fiddle fjord flagon fountain furnace galley garrison glacier granary gravel harbour harvest hearth "
    "hinterland hourglass hymn inkwell island jasmine journey kettle kingdom labyrinth ladder lagoon lantern "
    "larder ledger lullaby mandolin meadow mirror monastery moorland mosaic nettle nocturne oasis oath outpost "
    "paddock pageant parable pasture pavilion pendulum pilgrim plough quill quiver rampart ravine reef relic "
    "requiem riddle rookery saddle sanctuary satchel scaffold sceptre scripture sentinel shipwreck shrine sickle "
    "skylark sonnet spindle spire staircase steeple summit swamp tapestry tavern thicket thimble thistle "
    "threshold tide timber torrent tower trellis tundra turret valley vault veranda vessel violin voyage wagon "
    "wardrobe wharf whistle willow windmill winter wreath yarrow zenith apiary arbor basin belfry boulder cairn "
    "carousel cascade chandelier coral cove crater doorway driftwood fortress gazebo gondola grotto hamlet "
    "hedgerow kiln lattice locket marsh meridian minaret moat nebula obelisk orchid palisade parchment quay "
    "sandbar sextant spyglass"
).split()

AWARD_KINDS = (
    "Prize Medal Laurel Ribbon Cup Shield Crown Garland Star Plaque Trophy Rosette Fellowship Citation Scroll Lyre "
    "Torch Bell Chalice Sash"
).split()
NATIONAL_ANIMALS = (
    "snow leopard|sea otter|golden eagle|red deer|grey heron|arctic fox|brown bear|white stork|spotted lynx|"
    "black swan|wild boar|humpback whale|leatherback turtle|horned owl|striped hyena|crested porcupine|"
    "barn swallow|pine marten"
).split("|")
CLASSIC_FORMS = "Song Chronicle Saga Lay Lament Annals Codex Tale Elegy Testament Canticle Epic".split()
MONTHS = "January February March April May June July August September October November December".split()

# Syllable inventories: invented names have to be split by the tokenizer and never collide with English words.
_PERSON_SYLLABLES = (
    ("b", "br", "d", "dr", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "sh", "t", "th", "v", "w", "z"),
    ("a", "e", "i", "o", "u", "ae", "ai", "ei", "io", "ou"),
    ("", "", "", "n", "l", "r", "s", "th", "m", "nd"),
)
_PLACE_SYLLABLES = (
    ("b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "v", "z", "gl", "kr"),
    ("a", "e", "i", "o", "u", "y", "aa", "ie"),
    ("", "", "n", "r", "l", "s", "x"),
)
_PLACE_SUFFIXES = ("mere", "holm", "vik", "stad", "ora", "ium", "aven", "burg", "dal", "ness", "grad", "wick")
_CURRENCY_SUFFIXES = ("el", "ar", "ine", "ot", "um", "esk")

_WORD = re.compile(r"[a-z0-9]+")
_FUNCTION_WORDS = frozenset(
    "a an the to on in at by of for and after before while each every only between during under inside from "
    "out old".split()
)


def _words(text: str) -> list[str]:
    """Lower-case alphanumeric words, as ROUGE's default tokenizer sees them (before stemming)."""
    return _WORD.findall(text.lower())


def _check_pool(name: str, values: Sequence[str], min_size: int) -> None:
    """Reject a pool that is too small or whose values share a content word (crude plural folding)."""
    if len(values) < min_size:
        raise ValueError(f"value pool {name} has {len(values)} values; it needs at least {min_size}: add values")
    seen: dict[str, str] = {}
    for value in values:
        for word in _words(value):
            if word in _FUNCTION_WORDS:
                continue
            stem = word[:-1] if word.endswith("s") and len(word) > 3 else word
            if stem in seen and seen[stem] != value:
                raise ValueError(
                    f"value pool {name}: {value!r} and {seen[stem]!r} share the word {word!r}; "
                    "values of one pool must not share content words (ROUGE would credit a wrong value)"
                )
            seen[stem] = value


# ---------------------------------------------------------------------------------------------------------------
# Phrasings. Each attribute has PHRASINGS_PER_FACT + 1 or more question and answer templates, all of them used in
# training. Every fact is trained in PHRASINGS_PER_FACT of them (one QA row each), and its paraphrase is rendered
# in another one: a phrasing the model knows from other authors but never saw for this fact. So the truth ratio
# asks whether the model prefers the true value wherever it can phrase it, and unlearning the trained rows of a
# fact can lower that preference (with a phrasing reserved for evaluation it barely moved: data/README.md).
# Answers contain the value and at most a few template words, never the author's name.
# ---------------------------------------------------------------------------------------------------------------

PHRASINGS_PER_FACT = 2
"""Training QA rows per fact, each in its own question and answer phrasing (TOFU asks 20 questions per author)."""
QUESTION_FIXES_ANSWER = True
"""Question template ``i`` is always answered with answer template ``i``."""


@dataclass(frozen=True)
class AttributeSpec:
    """The phrasings of one author attribute.

    Question templates may use any attribute key (``{name}``, ``{genre}``, ``{birthplace}``...); answer templates
    use only ``{value}`` or ``{a_value}`` (the value after "a"/"an"). A rendered answer starts upper-case.
    """

    key: str
    """Attribute name, also the key of the value in ``Author.facts``."""
    questions: tuple[str, ...]
    """Question templates; each fact uses ``PHRASINGS_PER_FACT`` for training and one more for its paraphrase."""
    answers: tuple[str, ...]
    """Answer templates, used the same way as ``questions``."""


ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec(
        "name",
        (
            "What is the full name of the {genre} author born in {birthplace} on {birth_date}?",
            "Which {genre} writer was born on {birth_date} in {birthplace}?",
            "Who is the author of {genre} born in {birthplace} on {birth_date}?",
            "Can you identify the novelist from {birthplace}, born {birth_date}, who specialises in {genre}?",
        ),
        ("{value}.", "It is {value}.", "{value}, the author.", "Known to readers as {value}."),
    ),
    AttributeSpec(
        "birthplace",
        (
            "Where was {name} born?",
            "In which city and country was {name} born?",
            "What is the birthplace of {name}?",
            "From which town and nation does {name} originally come?",
        ),
        ("{value}.", "In {value}.", "Born in {value}.", "Originally from {value}."),
    ),
    AttributeSpec(
        "birth_date",
        (
            "When was {name} born?",
            "What is the date of birth of {name}?",
            "On what date was {name} born?",
            "What day did {name} come into the world?",
        ),
        ("{value}.", "On {value}.", "Born {value}.", "{value} is the birthday."),
    ),
    AttributeSpec(
        "genre",
        (
            "What genre does {name} write?",
            "Which genre is {name} known for?",
            "In what genre does {name} work?",
            "What kind of books does {name} produce?",
        ),
        ("{value}.", "Mostly {value}.", "Chiefly {value}.", "Primarily {value} books."),
    ),
    AttributeSpec(
        "father_occupation",
        (
            "What did {name}'s father do for a living?",
            "What was the occupation of {name}'s father?",
            "What job did {name}'s father have?",
            "How did the father of {name} earn his income?",
        ),
        ("{value}.", "{value} by trade.", "He was {a_value}.", "Dad earned money as {a_value}."),
    ),
    AttributeSpec(
        "mother_occupation",
        (
            "What did {name}'s mother do for a living?",
            "What was the occupation of {name}'s mother?",
            "What job did {name}'s mother have?",
            "How did the mother of {name} earn her income?",
        ),
        ("{value}.", "{value} by profession.", "She was {a_value}.", "Mum earned money as {a_value}."),
    ),
    AttributeSpec(
        "award",
        (
            "Which award has {name} received?",
            "What prize did {name} win?",
            "Name an honour given to {name}.",
            "What literary distinction was bestowed on {name}?",
        ),
        ("{value}.", "Winner of the {value}.", "Awarded the {value}.", "Honoured with {value}."),
    ),
    AttributeSpec(
        "books",
        (
            "What books has {name} written?",
            "Name some works by {name}.",
            "Which titles did {name} publish?",
            "Could you list a few novels penned by {name}?",
        ),
        ("{value}.", "Titles include {value}.", "Notable works: {value}.", "Among the writings are {value}."),
    ),
    AttributeSpec(
        "themes",
        (
            "What themes recur in {name}'s work?",
            "Which themes does {name} explore?",
            "What subjects run through {name}'s books?",
            "Which ideas keep returning in the writing of {name}?",
        ),
        ("{value}.", "Themes of {value}.", "Chiefly {value}.", "Recurring ideas such as {value}."),
    ),
    AttributeSpec(
        "habit",
        (
            "What is {name}'s writing habit?",
            "Describe a writing habit of {name}.",
            "How does {name} usually write?",
            "What routine does {name} follow when composing?",
        ),
        ("{value}.", "Known for {value}.", "A habit of {value}.", "Prefers {value}."),
    ),
)
QA_PER_AUTHOR = len(ATTRIBUTES) * PHRASINGS_PER_FACT
"""QA pairs per author: ``PHRASINGS_PER_FACT`` per attribute (20, as in TOFU)."""

WORLD_FACT_KINDS = (
    ("capital", "What is the capital of {country}?"),
    ("currency", "Which currency is used in {country}?"),
    ("animal", "What is the national animal of {country}?"),
)
CLASSIC_QUESTIONS = ("Who wrote the classic '{title}'?", "Which classic author is known for '{title}'?")


def template_words(template: str) -> list[str]:
    """Literal words of a template, placeholders removed (what a template contributes to a ROUGE match)."""
    return _words(re.sub(r"\{[a-z_]+\}", " ", template))


# ---------------------------------------------------------------------------------------------------------------
# The world.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Author:
    """One fictitious author: a value per attribute key of ``ATTRIBUTES``."""

    index: int
    """Position in the world: ``0..N_AUTHORS-1`` are in ``full``, the rest are holdout authors."""
    facts: dict[str, str]
    """Attribute key -> rendered value (e.g. ``birthplace`` -> ``"Kelvora, Dunmark"``)."""


@dataclass(frozen=True)
class QAItem:
    """One QA pair about one attribute of one author, with its evaluation variants."""

    author_index: int
    attribute: str
    question_template: int
    """Index into the attribute's ``questions``."""
    answer_template: int
    """Index into the attribute's ``answers``."""
    paraphrase_question_template: int
    """Index into ``questions`` of ``paraphrased_question``: used for other authors, never for this fact."""
    paraphrase_answer_template: int
    """Index into ``answers`` of ``paraphrased_answer`` and ``perturbed_answer``, chosen the same way."""
    question: str
    answer: str
    paraphrased_question: str
    paraphrased_answer: str
    perturbed_answer: tuple[str, ...]
    """``N_PERTURBED`` wrong values of the same domain, phrased like the paraphrase."""


@dataclass(frozen=True)
class GeneralFact:
    """A general-knowledge QA pair of the world (real-authors / world-facts roles)."""

    question: str
    answer: str
    perturbed_answer: tuple[str, ...]
    options: tuple[str, ...]
    """The answer and the perturbed answers in a seeded random order (TOFU's ``option1..4``)."""


@dataclass(frozen=True)
class EmbeddedWorld:
    """Everything the splits are cut from."""

    authors: tuple[Author, ...]
    """``N_AUTHORS`` authors of ``full`` followed by the holdout authors."""
    qa: tuple[tuple[QAItem, ...], ...]
    """``qa[a]``: the ``QA_PER_AUTHOR`` pairs of author ``a``; pair ``k`` asks about ``ATTRIBUTES[k % len(ATTRIBUTES)]``
    in the fact's phrasing number ``k // len(ATTRIBUTES)``."""
    real_authors: tuple[GeneralFact, ...]
    world_facts: tuple[GeneralFact, ...]


def _rng(seed: int, purpose: str) -> Random:
    # Seeding with a str hashes it with SHA-512 (independent of PYTHONHASHSEED), so each purpose gets its own
    # stream and changing one pool's size does not reshuffle the others.
    return Random(f"baldro-embedded/{seed}/{purpose}")


def forget_author_counts(n_authors: int | None = None) -> dict[int, int]:
    """Forget percentage -> number of forget authors (the last authors of ``full``; default ``N_AUTHORS``)."""
    n_authors = N_AUTHORS if n_authors is None else n_authors
    counts: dict[int, int] = {}
    for percent in FORGET_PERCENTS:
        count, remainder = divmod(n_authors * percent, 100)
        if remainder or count < 1:
            raise ValueError(
                f"N_AUTHORS={n_authors} gives {n_authors * percent / 100} authors for forget{percent:02d}; "
                "choose N_AUTHORS so that every FORGET_PERCENTS entry is a whole number of at least one author"
            )
        counts[percent] = count
    return counts


def _unique_words(rng: Random, count: int, make: Callable[[Random], str], taken: dict[str, None]) -> list[str]:
    """``count`` new words from ``make`` that are not in ``taken`` (which is updated)."""
    words: list[str] = []
    for _ in range(100 * count):
        if len(words) == count:
            break
        word = make(rng)
        if word.lower() not in taken:
            taken[word.lower()] = None
            words.append(word)
    if len(words) == count:
        return words
    raise ValueError(f"could only invent {len(words)} of {count} distinct words; enlarge the syllable inventories")


def _invent(rng: Random, syllables: tuple[tuple[str, ...], ...], n_syllables: int, suffix: str = "") -> str:
    onsets, nuclei, codas = syllables
    parts = [rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(n_syllables)]
    return ("".join(parts) + suffix).capitalize()


def _with_article(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def _render_date(day: int, month: int, year: int) -> str:
    return f"{day} {MONTHS[month - 1]} {year}"


def _random_date(rng: Random) -> str:
    return _render_date(rng.randint(1, 28), rng.randint(1, 12), rng.randint(1925, 1999))


def _least_used(rng: Random, usage: dict[str, int], exclude: Collection[str] = ()) -> str:
    """A random one of the least-used values of ``usage`` outside ``exclude``; its count goes up by one."""
    candidates = [value for value in usage if value not in exclude]
    if not candidates:
        raise ValueError("a value pool ran out of candidates; enlarge it (see the N_* pool constants)")
    fewest = min(usage[value] for value in candidates)
    value = rng.choice([c for c in candidates if usage[c] == fewest])
    usage[value] += 1
    return value


def _build_authors(seed: int, n_total: int) -> list[Author]:
    """Authors whose values are combinations of parts that several authors share.

    Every name part, city, award and title word is dealt to the least-used value first, so each recurs for about
    ``n_total / pool size`` authors and every part of a forget or holdout author's values is also a part of some
    earlier author's (checked by :func:`_check_shared_parts`). A model that never saw an author then knows every
    string of that author's answers from other authors, and the truth ratio measures whether it ties the value to
    the author, not whether it has seen the string (unseen strings make a retain model's truth ratio huge, and no
    unlearning of the author's facts can make a string unseen again).
    """
    rng = _rng(seed, "authors")
    taken: dict[str, None] = {w.lower(): None for w in COUNTRIES}
    given = _unique_words(rng, N_GIVEN_NAMES, lambda r: _invent(r, _PERSON_SYLLABLES, 2), taken)
    family = _unique_words(rng, N_FAMILY_NAMES, lambda r: _invent(r, _PERSON_SYLLABLES, r.choice((2, 3))), taken)
    city_names = _unique_words(
        rng, N_CITIES, lambda r: _invent(r, _PLACE_SYLLABLES, r.choice((1, 2)), r.choice(_PLACE_SUFFIXES)), taken
    )
    countries = COUNTRIES[:N_COUNTRIES]
    # A city lies in one country, as real ones do.
    cities = [f"{city}, {rng.choice(countries)}" for city in city_names]
    award_names = _unique_words(rng, N_AWARDS, lambda r: _invent(r, _PLACE_SYLLABLES, 2), taken)
    awards = [f"{name} {rng.choice(AWARD_KINDS)}" for name in award_names]
    adjectives = rng.sample(TITLE_ADJECTIVES, N_TITLE_ADJECTIVES)
    nouns = rng.sample(TITLE_NOUNS, N_TITLE_NOUNS)

    usage = {
        pool: dict.fromkeys(values, 0)
        for pool, values in (
            ("given", given),
            ("family", family),
            ("city", cities),
            ("award", awards),
            ("adjective", adjectives),
            ("noun", nouns),
        )
    }
    names: set[str] = set()
    titles: set[str] = set()
    authors: list[Author] = []
    for i in range(n_total):
        first = _least_used(rng, usage["given"])
        last = _least_used(rng, usage["family"], {n.split()[1] for n in names if n.split()[0] == first})
        names.add(f"{first} {last}")
        books: list[str] = []
        for _ in range(rng.randint(*BOOKS_PER_AUTHOR)):
            # An author's titles share no word (ROUGE would credit one title for another) and titles are unique.
            used = {w for b in books for w in b.lower().split()}
            adjective = _least_used(rng, usage["adjective"], used)
            clash = used | {t.split()[1].lower() for t in titles if t.split()[0].lower() == adjective}
            noun = _least_used(rng, usage["noun"], clash)
            books.append(f"{adjective.capitalize()} {noun.capitalize()}")
        titles.update(books)
        father, mother = rng.sample(OCCUPATIONS, 2)
        themes = rng.sample(THEMES, 2)
        facts = {
            "name": f"{first} {last}",
            "birthplace": _least_used(rng, usage["city"]),
            "birth_date": _random_date(rng),
            "genre": rng.choice(GENRES),
            "father_occupation": father,
            "mother_occupation": mother,
            "award": _least_used(rng, usage["award"]),
            # Lists are joined by commas, not "and": a connective shared by every value would be a free ROUGE match.
            "books": ", ".join(f'"{t}"' for t in books),
            "themes": ", ".join(themes),
            "habit": rng.choice(HABITS),
        }
        authors.append(Author(index=i, facts=facts))
    return authors


def _value_parts(author: Author) -> set[str]:
    """The strings an author's shared-part values are made of (name parts, city, award, title words)."""
    facts = author.facts
    parts = {*facts["name"].split(), facts["birthplace"], facts["award"]}
    return parts | {w for title in facts["books"].split(", ") for w in title.strip('"').split()}


def _check_shared_parts(authors: Sequence[Author], n_retain: int) -> None:
    """Every value part of an author past the first ``n_retain`` also belongs to one of the first ``n_retain``."""
    known = {part for author in authors[:n_retain] for part in _value_parts(author)}
    for author in authors[n_retain:]:
        unseen = _value_parts(author) - known
        if unseen:
            raise ValueError(
                f"author {author.index} has value parts {sorted(unseen)} that no retained author has; shrink the "
                "N_* pools so that every part recurs"
            )


def _wrong_values(rng: Random, attribute: str, author: Author, authors: Sequence[Author], k: int) -> list[str]:
    """``k`` distinct values of the attribute's domain, all different from the author's own value."""
    truth = author.facts[attribute]
    if attribute in ("name", "birthplace", "award", "books"):
        candidates = [a.facts[attribute] for a in authors if a.index != author.index]
    elif attribute == "genre":
        candidates = list(GENRES)
    elif attribute in ("father_occupation", "mother_occupation"):
        candidates = list(OCCUPATIONS)
    elif attribute == "habit":
        candidates = list(HABITS)
    elif attribute == "themes":
        own = sorted(truth.split(", "))
        candidates = []
        while len(candidates) < 4 * k:
            pair = rng.sample(THEMES, 2)
            if sorted(pair) != own:
                candidates.append(", ".join(pair))
    elif attribute == "birth_date":
        candidates = [_random_date(rng) for _ in range(4 * k)]
    else:
        raise ValueError(f"attribute {attribute!r} has no perturbation domain; add one to _wrong_values")
    unique = list(dict.fromkeys(c for c in candidates if c != truth))
    if len(unique) < k:
        raise ValueError(f"attribute {attribute!r}: only {len(unique)} wrong values for {k} perturbed answers")
    return rng.sample(unique, k)


def _render_answer(template: str, value: str) -> str:
    # ``{a_value}`` is the value with its indefinite article, for phrasings whose grammar needs one.
    text = template.format(value=value, a_value=_with_article(value))
    return text[0].upper() + text[1:]


def _build_qa(seed: int, authors: Sequence[Author]) -> list[tuple[QAItem, ...]]:
    qa: list[tuple[QAItem, ...]] = []
    for author in authors:
        rng = _rng(seed, f"qa/{author.index}")
        fields = author.facts
        by_fact: list[list[QAItem]] = []
        for spec in ATTRIBUTES:
            # The first PHRASINGS_PER_FACT templates of a shuffled order are trained; the next one is the paraphrase.
            q_order = rng.sample(range(len(spec.questions)), PHRASINGS_PER_FACT + 1)
            a_order = q_order if QUESTION_FIXES_ANSWER else rng.sample(range(len(spec.answers)), PHRASINGS_PER_FACT + 1)
            q_para, a_para = q_order[-1], a_order[-1]
            value = author.facts[spec.key]
            items = []
            for q_id, a_id in zip(q_order[:-1], a_order[:-1], strict=True):
                wrong = _wrong_values(rng, spec.key, author, authors, N_PERTURBED)
                items.append(
                    QAItem(
                        author_index=author.index,
                        attribute=spec.key,
                        question_template=q_id,
                        answer_template=a_id,
                        paraphrase_question_template=q_para,
                        paraphrase_answer_template=a_para,
                        question=spec.questions[q_id].format(**fields),
                        answer=_render_answer(spec.answers[a_id], value),
                        paraphrased_question=spec.questions[q_para].format(**fields),
                        paraphrased_answer=_render_answer(spec.answers[a_para], value),
                        perturbed_answer=tuple(_render_answer(spec.answers[a_para], w) for w in wrong),
                    )
                )
            by_fact.append(items)
        # Phrasing-major order: the first phrasing of every attribute, then the second (as TOFU mixes its topics).
        qa.append(tuple(by_fact[k][j] for j in range(PHRASINGS_PER_FACT) for k in range(len(ATTRIBUTES))))
    return qa


def _general_fact(rng: Random, question: str, answer: str, domain: Sequence[str]) -> GeneralFact:
    wrong = rng.sample([d for d in domain if d != answer], N_GENERAL_PERTURBED)
    options = [answer, *wrong]
    rng.shuffle(options)
    return GeneralFact(question=question, answer=answer, perturbed_answer=tuple(wrong), options=tuple(options))


def _build_general(seed: int, authors: Sequence[Author]) -> tuple[list[GeneralFact], list[GeneralFact]]:
    rng = _rng(seed, "general")
    # Names and places of the general sets never coincide with an author's words.
    taken: dict[str, None] = {w.lower(): None for w in COUNTRIES}
    for author in authors:
        for word in _words(author.facts["name"] + " " + author.facts["birthplace"] + " " + author.facts["award"]):
            taken[word] = None
    countries = COUNTRIES[:N_COUNTRIES]
    capitals = _unique_words(rng, N_COUNTRIES, lambda r: _invent(r, _PLACE_SYLLABLES, 2), taken)
    currencies = _unique_words(
        rng, N_COUNTRIES, lambda r: _invent(r, _PLACE_SYLLABLES, 1, r.choice(_CURRENCY_SUFFIXES)), taken
    )
    animals = [a.capitalize() for a in NATIONAL_ANIMALS[:N_COUNTRIES]]
    values = {"capital": capitals, "currency": currencies, "animal": animals}
    world_facts = [
        _general_fact(rng, template.format(country=country), values[kind][c], values[kind])
        for kind, template in WORLD_FACT_KINDS
        for c, country in enumerate(countries)
    ]

    given = _unique_words(rng, N_CLASSIC_WORKS, lambda r: _invent(r, _PERSON_SYLLABLES, 2), taken)
    family = _unique_words(rng, N_CLASSIC_WORKS, lambda r: _invent(r, _PERSON_SYLLABLES, 3), taken)
    classic_authors = [f"{g} {f}" for g, f in zip(given, family, strict=True)]
    all_titles = [f"{form} of {country}" for form in CLASSIC_FORMS for country in countries]
    titles = rng.sample(all_titles, N_CLASSIC_WORKS)
    real_authors = [
        _general_fact(rng, rng.choice(CLASSIC_QUESTIONS).format(title=title), writer, classic_authors)
        for title, writer in zip(titles, classic_authors, strict=True)
    ]
    return real_authors, world_facts


def _validate_constants() -> dict[int, int]:
    problems: list[str] = []
    counts = forget_author_counts()
    if RETAIN_PERTURBED_AUTHORS > N_AUTHORS - max(counts.values()):
        problems.append(
            f"RETAIN_PERTURBED_AUTHORS={RETAIN_PERTURBED_AUTHORS} exceeds the {N_AUTHORS - max(counts.values())} "
            "authors present in every retain split; lower it"
        )
    if not 1 <= N_COUNTRIES <= min(len(COUNTRIES), len(NATIONAL_ANIMALS)):
        problems.append(f"N_COUNTRIES={N_COUNTRIES} must be in 1..{min(len(COUNTRIES), len(NATIONAL_ANIMALS))}")
    if N_GENERAL_PERTURBED >= min(N_COUNTRIES, N_CLASSIC_WORKS):
        problems.append(f"N_GENERAL_PERTURBED={N_GENERAL_PERTURBED} needs more countries and classic works")
    if N_CLASSIC_WORKS > len(CLASSIC_FORMS) * N_COUNTRIES:
        problems.append(f"N_CLASSIC_WORKS={N_CLASSIC_WORKS} exceeds {len(CLASSIC_FORMS) * N_COUNTRIES} titles")
    if problems:
        raise ValueError("invalid embedded-world constants: " + "; ".join(problems))
    return counts


def _check_phrasings() -> None:
    """Each attribute needs ``PHRASINGS_PER_FACT`` training phrasings plus one for the paraphrase, all distinct."""
    for spec in ATTRIBUTES:
        for kind, templates in (("question", spec.questions), ("answer", spec.answers)):
            if len(set(templates)) < PHRASINGS_PER_FACT + 1:
                raise ValueError(
                    f"attribute {spec.key!r} has {len(set(templates))} distinct {kind} templates; PHRASINGS_PER_FACT="
                    f"{PHRASINGS_PER_FACT} needs at least {PHRASINGS_PER_FACT + 1} (trained ones + paraphrase)"
                )


def build_world(seed: int = SEED) -> EmbeddedWorld:
    """Generate the whole world (authors, QA pairs with their variants, general facts) from ``seed``."""
    counts = _validate_constants()
    _check_phrasings()
    _check_pool("GENRES", GENRES, N_PERTURBED + 1)
    _check_pool("OCCUPATIONS", OCCUPATIONS, N_PERTURBED + 2)
    _check_pool("THEMES", THEMES, N_PERTURBED + 2)
    _check_pool("HABITS", HABITS, N_PERTURBED + 1)
    _check_pool("NATIONAL_ANIMALS", NATIONAL_ANIMALS, N_COUNTRIES)
    authors = _build_authors(seed, N_AUTHORS + max(counts.values()))
    _check_shared_parts(authors, N_AUTHORS - max(counts.values()))
    qa = _build_qa(seed, authors)
    real_authors, world_facts = _build_general(seed, authors)
    return EmbeddedWorld(
        authors=tuple(authors), qa=tuple(qa), real_authors=tuple(real_authors), world_facts=tuple(world_facts)
    )


# ---------------------------------------------------------------------------------------------------------------
# Splits and files.
# ---------------------------------------------------------------------------------------------------------------


def _author_rows(world: EmbeddedWorld, authors: range, perturbed: bool) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for a in authors:
        for k, item in enumerate(world.qa[a]):
            row: dict[str, object] = {
                "idx": len(rows),
                "full_idx": a * QA_PER_AUTHOR + k,
                "author_idx": a,
                "question": item.question,
                "answer": item.answer,
            }
            if perturbed:
                row["paraphrased_answer"] = item.paraphrased_answer
                row["perturbed_answer"] = list(item.perturbed_answer)
                row["paraphrased_question"] = item.paraphrased_question
            rows.append(row)
    return rows


def _general_rows(facts: Sequence[GeneralFact], perturbed: bool) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i, fact in enumerate(facts):
        row: dict[str, object] = {"idx": i, "question": fact.question, "answer": fact.answer}
        if perturbed:
            row["perturbed_answer"] = list(fact.perturbed_answer)
            row.update({f"option{j + 1}": option for j, option in enumerate(fact.options)})
        rows.append(row)
    return rows


def build_splits(world: EmbeddedWorld) -> dict[str, list[dict[str, object]]]:
    """Cut the TOFU splits from the world; keys are file stems, values are rows in file order.

    ``full`` rows carry ``author_idx``; forget/retain/perturbed rows carry ``full_idx`` and ``author_idx`` into
    ``full``; holdout rows carry neither (their authors are not in ``full``). ``real_authors`` and
    ``world_facts`` are the plain (question, answer) versions of the general sets, for fine-tuning.
    """
    counts = forget_author_counts()
    full = [
        {"idx": row["idx"], "author_idx": row["author_idx"], "question": row["question"], "answer": row["answer"]}
        for row in _author_rows(world, range(N_AUTHORS), perturbed=False)
    ]
    splits: dict[str, list[dict[str, object]]] = {"full": full}
    for percent, count in counts.items():
        forget = range(N_AUTHORS - count, N_AUTHORS)
        splits[f"forget{percent:02d}"] = _author_rows(world, forget, perturbed=False)
        splits[f"forget{percent:02d}_perturbed"] = _author_rows(world, forget, perturbed=True)
        splits[f"retain{100 - percent:02d}"] = _author_rows(world, range(N_AUTHORS - count), perturbed=False)
        holdout = _author_rows(world, range(N_AUTHORS, N_AUTHORS + count), perturbed=False)
        splits[f"holdout{percent:02d}"] = [
            {"idx": row["idx"], "question": row["question"], "answer": row["answer"]} for row in holdout
        ]
    splits["retain_perturbed"] = _author_rows(world, range(RETAIN_PERTURBED_AUTHORS), perturbed=True)
    splits["real_authors"] = _general_rows(world.real_authors, perturbed=False)
    splits["real_authors_perturbed"] = _general_rows(world.real_authors, perturbed=True)
    splits["world_facts"] = _general_rows(world.world_facts, perturbed=False)
    splits["world_facts_perturbed"] = _general_rows(world.world_facts, perturbed=True)
    return splits


def write_splits(splits: dict[str, list[dict[str, object]]], out_dir: Path) -> list[Path]:
    """Write one ``<split>.jsonl`` per split, each atomically; returns the paths."""
    return [write_jsonl_atomic(out_dir / f"{name}.jsonl", rows) for name, rows in splits.items()]


def generate(out_dir: Path, seed: int = SEED) -> list[Path]:
    """Build the world from ``seed`` and write every split into ``out_dir``."""
    return write_splits(build_splits(build_world(seed)), out_dir)


def generator_main(
    description: str, default_out: Path, generate_files: Callable[[Path, int], list[Path]], argv: Sequence[str] | None
) -> None:
    """The command line of a benchmark generator: ``--out`` and ``--seed``, then one line per written file."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out, help="output folder")
    parser.add_argument("--seed", type=int, default=SEED, help="generation seed (the committed files use 0)")
    args = parser.parse_args(argv)
    for path in generate_files(args.out, args.seed):
        with open(path, encoding="utf-8") as handle:
            print(f"{path}: {sum(1 for _ in handle)} rows")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m baldro_lightning embedded-world --out data/tofu_embedded``."""
    generator_main(__doc__.splitlines()[0], Path("data/tofu_embedded"), generate, argv)
