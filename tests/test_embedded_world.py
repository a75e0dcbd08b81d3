"""The embedded TOFU-shaped benchmark, its tokenizer and the tiny Llama: determinism, structure, round trips."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from baldro_lightning.embedded import world as ew

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "data" / "tofu_embedded"
REAL_TOFU = REPO.parent / "shared" / "data" / "tofu"


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return ew.build_splits(ew.build_world())


@pytest.fixture(scope="module")
def world() -> ew.EmbeddedWorld:
    return ew.build_world()


# --------------------------------------------------------------------------------------------- determinism


def test_regeneration_is_byte_identical_to_committed_files(tmp_path: Path) -> None:
    first = ew.generate(tmp_path / "a")
    ew.generate(tmp_path / "b")
    assert sorted(p.name for p in first) == sorted(p.name for p in COMMITTED.glob("*.jsonl"))
    for path in first:
        fresh = path.read_bytes()
        assert fresh == (tmp_path / "b" / path.name).read_bytes(), f"two regenerations differ in {path.name}"
        assert fresh == (COMMITTED / path.name).read_bytes(), (
            f"data/tofu_embedded/{path.name} is stale: rerun python -m baldro_lightning embedded-world"
        )
    assert not list((tmp_path / "a").glob(".*")), "a temporary file was left behind"


def test_other_seed_gives_other_world() -> None:
    assert ew.build_world(1).authors[0].facts != ew.build_world(0).authors[0].facts


def test_files_are_utf8_json_lines_with_newline_endings() -> None:
    raw = (COMMITTED / "full.jsonl").read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    assert all(json.loads(line)["idx"] == i for i, line in enumerate(raw.decode("utf-8").splitlines()))


# ----------------------------------------------------------------------------------------------- structure


def test_row_counts(splits: dict[str, list[dict]]) -> None:
    k = ew.QA_PER_AUTHOR
    assert k == 20 and ew.N_AUTHORS == 100
    expected = {"full": 2000, "retain_perturbed": ew.RETAIN_PERTURBED_AUTHORS * k}
    for percent, authors in {1: 1, 5: 5, 10: 10}.items():
        expected |= {
            f"forget{percent:02d}": authors * k,
            f"forget{percent:02d}_perturbed": authors * k,
            f"retain{100 - percent:02d}": 2000 - authors * k,
            f"holdout{percent:02d}": authors * k,
        }
    general = {"real_authors": ew.N_CLASSIC_WORKS, "world_facts": ew.N_COUNTRIES * len(ew.WORLD_FACT_KINDS)}
    for name, count in general.items():
        assert 40 <= count <= 60
        expected |= {name: count, f"{name}_perturbed": count}
    assert {name: len(rows) for name, rows in splits.items()} == expected
    assert all(row["idx"] == i for rows in splits.values() for i, row in enumerate(rows))


def test_fields_follow_tofu(splits: dict[str, list[dict]]) -> None:
    """Our rows carry every field of the real TOFU file of the same name (extra index fields allowed)."""
    author_eval = ["idx", "full_idx", "author_idx", "question", "answer"]
    author_eval += ["paraphrased_answer", "perturbed_answer", "paraphrased_question"]
    general_eval = ["idx", "question", "answer", "perturbed_answer", "option1", "option2", "option3", "option4"]
    assert list(splits["full"][0]) == ["idx", "author_idx", "question", "answer"]
    assert list(splits["forget05"][0]) == ["idx", "full_idx", "author_idx", "question", "answer"]
    assert list(splits["holdout05"][0]) == ["idx", "question", "answer"]
    assert list(splits["forget05_perturbed"][0]) == author_eval
    assert list(splits["retain_perturbed"][0]) == author_eval
    assert list(splits["world_facts_perturbed"][0]) == general_eval
    if not REAL_TOFU.is_dir():
        pytest.skip(f"real TOFU files not found at {REAL_TOFU}; the key-order checks above still ran")
    for name, rows in splits.items():
        real = REAL_TOFU / f"{name}.jsonl"
        if real.is_file():
            with open(real, encoding="utf-8") as handle:
                real_keys = set(json.loads(handle.readline()))
            assert real_keys <= set(rows[0]), f"{name}: missing TOFU fields {real_keys - set(rows[0])}"


@pytest.mark.parametrize("percent", ew.FORGET_PERCENTS)
def test_forget_and_retain_partition_full(splits: dict[str, list[dict]], percent: int) -> None:
    full = splits["full"]
    forget = splits[f"forget{percent:02d}"]
    retain = splits[f"retain{100 - percent:02d}"]
    forget_idx = [row["full_idx"] for row in forget]
    retain_idx = [row["full_idx"] for row in retain]
    assert not set(forget_idx) & set(retain_idx)
    assert sorted(forget_idx + retain_idx) == list(range(len(full)))
    for row in forget + retain:
        source = full[row["full_idx"]]
        assert (row["question"], row["answer"], row["author_idx"]) == (
            source["question"],
            source["answer"],
            source["author_idx"],
        )
    n_forget = ew.N_AUTHORS * percent // 100
    assert sorted({row["author_idx"] for row in forget}) == list(range(ew.N_AUTHORS - n_forget, ew.N_AUTHORS))
    perturbed = splits[f"forget{percent:02d}_perturbed"]
    assert [(r["full_idx"], r["question"], r["answer"]) for r in perturbed] == [
        (r["full_idx"], r["question"], r["answer"]) for r in forget
    ]


def test_forget_splits_nest_and_retain_perturbed_is_in_every_retain(splits: dict[str, list[dict]]) -> None:
    f01, f05, f10 = ({r["full_idx"] for r in splits[f"forget{p:02d}"]} for p in (1, 5, 10))
    assert f01 < f05 < f10
    kept = {r["full_idx"] for r in splits["retain_perturbed"]}
    for percent in (99, 95, 90):
        assert kept <= {r["full_idx"] for r in splits[f"retain{percent}"]}
    assert splits["forget01_perturbed"][0] == {**splits["forget10_perturbed"][9 * ew.QA_PER_AUTHOR], "idx": 0}


def test_holdout_authors_never_appear_in_full(splits: dict[str, list[dict]], world: ew.EmbeddedWorld) -> None:
    full_text = " ".join(r["question"] + " " + r["answer"] for r in splits["full"])
    holdout_authors = world.authors[ew.N_AUTHORS :]
    assert len(holdout_authors) == 10
    for author in holdout_authors:
        assert author.facts["name"] not in full_text, f"holdout author {author.facts['name']!r} leaks into full"
    full_questions = {r["question"] for r in splits["full"]}
    assert not full_questions & {r["question"] for r in splits["holdout10"]}
    k = ew.QA_PER_AUTHOR
    assert splits["holdout05"] == splits["holdout10"][: 5 * k] and splits["holdout01"] == splits["holdout10"][:k]


def test_author_names_are_unique_but_made_of_shared_parts(world: ew.EmbeddedWorld) -> None:
    names = [a.facts["name"] for a in world.authors]
    assert len(set(names)) == len(names)
    given = [name.split()[0] for name in names]
    assert len(set(given)) == ew.N_GIVEN_NAMES and max(given.count(g) for g in given) <= 5


def test_every_value_part_of_a_forget_or_holdout_author_is_known_from_retained_authors(
    world: ew.EmbeddedWorld,
) -> None:
    """A retain model has seen every string a forget author's answers are made of (with other authors)."""
    n_retain = ew.N_AUTHORS - max(ew.forget_author_counts().values())
    known = {part for author in world.authors[:n_retain] for part in ew._value_parts(author)}
    for author in world.authors[n_retain:]:
        assert ew._value_parts(author) <= known, author.facts
    assert {"Sumra", "Nietiburg, Velloria"} <= ew._value_parts(world.authors[90])  # the parts of one, by hand


def test_generator_rejects_pools_too_large_to_recur(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ew, "N_CITIES", 100)
    with pytest.raises(ValueError, match="no retained author has"):
        ew.build_world()


# ----------------------------------------------------------------------------------- evaluation variants


@pytest.mark.parametrize(
    "split", ["forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed"]
)
def test_perturbed_answers_are_wrong_and_distinct(splits: dict[str, list[dict]], split: str) -> None:
    for row in splits[split]:
        wrong = row["perturbed_answer"]
        assert len(wrong) == ew.N_PERTURBED == 5
        assert len(set(wrong)) == 5, row
        assert row["answer"] not in wrong and row["paraphrased_answer"] not in wrong
        assert row["paraphrased_answer"] != row["answer"]
        assert row["paraphrased_question"] != row["question"]


@pytest.mark.parametrize("split", ["real_authors_perturbed", "world_facts_perturbed"])
def test_general_sets_have_three_wrong_answers(splits: dict[str, list[dict]], split: str) -> None:
    for row in splits[split]:
        wrong = row["perturbed_answer"]
        assert len(wrong) == 3 and len(set(wrong)) == 3 and row["answer"] not in wrong
        assert sorted(row[f"option{j}"] for j in range(1, 5)) == sorted([row["answer"], *wrong])
    assert len({row["question"] for row in splits[split]}) == len(splits[split])


def test_perturbations_keep_the_paraphrase_phrasing(world: ew.EmbeddedWorld) -> None:
    """A perturbed answer differs from the paraphrase only where the value sits."""
    for rows in world.qa[:20]:
        for item in rows:
            spec = _spec(item)
            words = ew.template_words(spec.answers[item.paraphrase_answer_template])
            for wrong in item.perturbed_answer:
                lowered = wrong.lower()
                assert all(w in lowered for w in words), (item.attribute, wrong)


def _spec(item: ew.QAItem) -> ew.AttributeSpec:
    return next(spec for spec in ew.ATTRIBUTES if spec.key == item.attribute)


def _value(world: ew.EmbeddedWorld, item: ew.QAItem) -> str:
    return world.authors[item.author_index].facts[item.attribute]


def test_each_fact_is_trained_in_several_phrasings(world: ew.EmbeddedWorld) -> None:
    """Row k of an author asks about attribute k mod 10; the rows of one fact use distinct question and answer
    templates and render the same value."""
    n_attributes = len(ew.ATTRIBUTES)
    for rows in world.qa:
        assert len(rows) == ew.QA_PER_AUTHOR == ew.PHRASINGS_PER_FACT * n_attributes
        for k, item in enumerate(rows):
            spec = ew.ATTRIBUTES[k % n_attributes]
            assert item.attribute == spec.key
            assert item.answer == ew._render_answer(spec.answers[item.answer_template], _value(world, item))
            assert item.question == spec.questions[item.question_template].format(
                **world.authors[item.author_index].facts
            )
        for k in range(n_attributes):
            fact = rows[k::n_attributes]
            assert len({item.question_template for item in fact}) == ew.PHRASINGS_PER_FACT
            assert len({item.answer_template for item in fact}) == ew.PHRASINGS_PER_FACT


def test_paraphrase_phrasing_is_known_from_other_authors_but_never_trained_for_the_fact(
    world: ew.EmbeddedWorld, splits: dict[str, list[dict]]
) -> None:
    n_attributes = len(ew.ATTRIBUTES)
    trained_templates: dict[str, set[tuple[int, int]]] = {spec.key: set() for spec in ew.ATTRIBUTES}
    for a, rows in enumerate(world.qa[: ew.N_AUTHORS]):
        for item in rows:
            trained_templates[item.attribute].add((a, item.answer_template))
    for rows in world.qa[: ew.N_AUTHORS]:
        for k in range(n_attributes):
            fact = rows[k::n_attributes]
            para = {(item.paraphrase_question_template, item.paraphrase_answer_template) for item in fact}
            assert len(para) == 1, "the rows of one fact share its paraphrase"
            q_para, a_para = para.pop()
            assert q_para not in {item.question_template for item in fact}
            assert a_para not in {item.answer_template for item in fact}
            others = {a for a, t in trained_templates[fact[0].attribute] if t == a_para} - {fact[0].author_index}
            assert len(others) >= 10, f"{fact[0].attribute}: answer phrasing {a_para} is trained for few authors"
    by_author: dict[int, set[str]] = {}
    for row in splits["full"]:
        by_author.setdefault(row["author_idx"], set()).update((row["question"], row["answer"]))
    for row in splits["forget10_perturbed"] + splits["retain_perturbed"]:
        assert row["paraphrased_answer"] not in by_author[row["author_idx"]]
        assert row["paraphrased_question"] not in by_author[row["author_idx"]]


def test_phrasings_vary_across_authors(world: ew.EmbeddedWorld) -> None:
    n_attributes = len(ew.ATTRIBUTES)
    for k, spec in enumerate(ew.ATTRIBUTES):
        items = [item for rows in world.qa for item in rows[k::n_attributes]]
        assert {item.answer_template for item in items} == set(range(len(spec.answers)))
        assert {item.question_template for item in items} == set(range(len(spec.questions)))
        assert {item.paraphrase_answer_template for item in items} == set(range(len(spec.answers)))


def test_generator_rejects_too_few_phrasings(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ew.ATTRIBUTES[1]
    short = ew.AttributeSpec(spec.key, spec.questions, spec.answers[:2])
    monkeypatch.setattr(ew, "ATTRIBUTES", (ew.ATTRIBUTES[0], short, *ew.ATTRIBUTES[2:]))
    with pytest.raises(ValueError, match="needs at least 3"):
        ew.build_world()


def test_generator_rejects_pools_that_share_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ew, "GENRES", [*ew.GENRES, "dark comedy"])
    with pytest.raises(ValueError, match="share the word"):
        ew.build_world()


def test_sizes_that_do_not_divide_into_authors_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ew, "N_AUTHORS", 150)
    with pytest.raises(ValueError, match="forget01"):
        ew.build_world()


def _lcs_recall(reference: str, prediction: str) -> float:
    """ROUGE-L recall without stemming: LCS of the word sequences over the reference length."""
    ref, pred = ew._words(reference), ew._words(prediction)
    table = [[0] * (len(pred) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref):
        for j, p in enumerate(pred):
            table[i + 1][j + 1] = table[i][j] + 1 if r == p else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1] / len(ref)


def test_lcs_recall_by_hand() -> None:
    # LCS("in kelvara dunmark", "born in dunmark") = "in dunmark": 2 of 3 reference words.
    assert _lcs_recall("In Kelvara, Dunmark.", "Born in Dunmark.") == pytest.approx(2 / 3)


def test_answers_of_other_authors_score_low_rouge(world: ew.EmbeddedWorld) -> None:
    """An author's answers share few words with other authors' answers: unseen authors cannot be guessed.

    Each holdout answer is scored against the training answers of 34 authors of ``full`` to the same question
    (what a model that never saw the author could at best reproduce); the mean ROUGE-L recall stays far from the
    1.0 of a memorised answer. Answers stay short, so the value words dominate.
    """
    scores = [
        _lcs_recall(item.answer, world.qa[other][k].answer)
        for rows in world.qa[ew.N_AUTHORS :]
        for k, item in enumerate(rows)
        for other in range(0, ew.N_AUTHORS, 3)
    ]
    assert statistics.fmean(scores) < 0.2
    assert statistics.fmean(len(ew._words(item.answer)) for rows in world.qa for item in rows) < 6


# ----------------------------------------------------------------------------------- tokenizer and model


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    for name in ("forget10_perturbed", "world_facts_perturbed"):
        shutil.copy(COMMITTED / f"{name}.jsonl", data / f"{name}.jsonl")
    return data


@pytest.fixture(scope="module")
def tokenizer_dir(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from baldro_lightning.embedded.models import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(small_data, out, vocab_size=400, model_max_length=64)
    return out


def test_tokenizer_training_is_deterministic(small_data: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    from baldro_lightning.embedded.models import train_tokenizer

    train_tokenizer(small_data, tmp_path, vocab_size=400, model_max_length=64)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_tokenizer_round_trips_and_uses_dedicated_special_tokens(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == 400 and tokenizer.model_max_length == 64
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}) == 3
    texts = [
        "Question: Where was Rurveith Humjiolsu born?\nAnswer: In Suraven, Dunmark.",
        "a , b  c\n\n d ?",  # the default clean-up would turn " ," into ","
        "Zoë's café — naïve 日本 🙂",  # never seen in training: bytes still round-trip
        " leading and trailing space ",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    batch = tokenizer(["short", "a much longer text here"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tokenizer_rejects_a_vocabulary_without_room_for_bytes(small_data: Path, tmp_path: Path) -> None:
    from baldro_lightning.embedded.models import train_tokenizer

    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(small_data, tmp_path, vocab_size=100)


def test_tiny_llama_saves_and_reloads(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baldro_lightning.embedded.models import init_tiny_llama

    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    rng_before = torch.get_rng_state()
    model = init_tiny_llama(tokenizer_dir, tmp_path / "a", seed=3, max_position_embeddings=64, **sizes)
    assert torch.equal(torch.get_rng_state(), rng_before), "init must not consume the caller's global RNG"
    again = init_tiny_llama(tokenizer_dir, tmp_path / "b", seed=3, max_position_embeddings=64, **sizes)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert loaded.config.hidden_size == 32 and loaded.config.num_hidden_layers == 2
    assert loaded.config.vocab_size == len(tokenizer) == 400
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id, loaded.config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert loaded.generation_config.pad_token_id == tokenizer.pad_token_id
    reloaded, repeated = loaded.state_dict(), again.state_dict()
    assert model.state_dict().keys() == reloaded.keys()
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, reloaded[name]), f"{name} changed on reload"
        assert torch.equal(weight, repeated[name]), f"{name} differs between two inits with the same seed"
    batch = tokenizer(["Question: What is the capital of Dunmark?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        logits = loaded(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 400) and torch.isfinite(logits).all()


def test_tiny_llama_rejects_unknown_settings(tokenizer_dir: Path, tmp_path: Path) -> None:
    from baldro_lightning.embedded.models import init_tiny_llama

    with pytest.raises(ValueError, match="hidden_dim"):
        init_tiny_llama(tokenizer_dir, tmp_path, hidden_dim=32)
