"""``stratacache tune``: real training (a handful of optimizer steps on a slice of the shared QQP
pairs), no mocks."""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from stratacache import tune
from stratacache.curves import curve_metrics
from stratacache.pairs import STANDARD_PARTS, LabelledPair, read_pairs, split, write_pairs
from stratacache.tuning.card import CARD_NAME, fusion
from stratacache.tuning.data import transitive_pairs

from .data import qqp_pairs

SLICE = 240
STEPS = 4
CARD_FIELDS = {"kind", "base", "pairs", "parts", "feedback_rows", "steps", "epochs", "batch_size",
               "seconds", "device", "stratacache_version", "metrics"}
METRIC_FIELDS = {"auc", "precision_at_recall_0.50", "recall_at_precision_0.90",
                 "recall_at_precision_0.95"}


def _run(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tune.add_arguments(parser)
    return tune.run(parser.parse_args([str(a) for a in argv]))


def _quick(pairs: Path, out: Path, *extra: str | Path) -> int:
    # one thread: several times faster than two when the host is busy with anything else;
    # --save-steps beyond the run: checkpoints (with optimizer state) cost disk writes
    return _run("--pairs", pairs, "--out", out, "--max-steps", STEPS, "--batch-size", 8,
                "--save-steps", 1000, "--device", "cpu", "--threads", 1, *extra)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "slice.jsonl.gz"
    write_pairs(path, qqp_pairs(SLICE))
    return path


@pytest.fixture(scope="module")
def parts(pairs_file: Path) -> dict[str, list[LabelledPair]]:
    return split(read_pairs(pairs_file), STANDARD_PARTS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory,
             parts: dict[str, list[LabelledPair]]) -> Path:
    """A server data directory with feedback: two usable rows, one sharing a text with the
    held-back part (left out), one that is not feedback."""
    folder = tmp_path_factory.mktemp("data")
    conn = sqlite3.connect(folder / "evidence.sqlite3")
    conn.execute("CREATE TABLE evidence(id INTEGER PRIMARY KEY, namespace TEXT, source TEXT, "
                 "query TEXT, matched TEXT, correct INTEGER, entry_id TEXT, created_at REAL)")
    held = parts["calibrate"][0]
    rows = [("feedback", "How can I reset my router password?",
             "How do I change the password of my router?", 1),
            ("feedback", "What is the capital of Peru?", "What is the capital of Chile?", 0),
            ("feedback", held.b, "A question nobody asked before?", 0),
            ("served", "Is this counted?", "No, it is not feedback", 1)]
    conn.executemany("INSERT INTO evidence(namespace, source, query, matched, correct, entry_id, "
                     "created_at) VALUES ('default', ?, ?, ?, ?, 'e', 0)", rows)
    conn.commit()
    conn.close()
    return folder


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, pairs_file: Path, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "out"
    assert _quick(pairs_file, out, "--data-dir", data_dir, "--embedder") == 0
    return out


def _card(folder: Path) -> dict:
    return json.loads((folder / CARD_NAME).read_text())


def test_card_documents_data_recipe_and_heldout_metrics(
        tuned: Path, pairs_file: Path, parts: dict[str, list[LabelledPair]]) -> None:
    card = _card(tuned / "verifier")
    assert CARD_FIELDS <= set(card)
    assert card["kind"] == "verifier"
    assert card["steps"] == STEPS and card["batch_size"] == 8 and card["device"] == "cpu"
    assert card["pairs"]["path"] == str(pairs_file.resolve())
    assert len(card["pairs"]["sha256"]) == 64
    assert card["base"]["name"] == "all-MiniLM-L6-v2"
    assert card["parts"] == {name: {"pairs": len(ps), "duplicates": sum(p.duplicate for p in ps)}
                             for name, ps in parts.items()}
    assert card["feedback_rows"] == 2 and card["feedback_rows_left_out"] == 1
    assert card["symmetric"] is True
    metrics = card["metrics"]
    assert metrics["part"] == "calibrate"
    for name in ("verifier", "base_cosine"):
        assert METRIC_FIELDS <= set(metrics[name])
        assert metrics[name]["pairs"] == len(parts["calibrate"])
        assert 0.0 <= metrics[name]["auc"] <= 1.0
    assert metrics["base_cosine"]["auc"] > 0.6  # the plain cosine separates QQP pairs somewhat
    fused = metrics["fusion_with_base_cosine"]
    assert set(fused["weights"]) == {"intercept", "cosine", "verifier_logit"}
    assert METRIC_FIELDS <= set(fused["metrics"])
    assert not (tuned / "checkpoints").exists()  # removed once finished


def test_verifier_loads_as_a_cross_encoder_and_scores_in_unit_interval(tuned: Path) -> None:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(tuned / "verifier"), local_files_only=True, device="cpu")
    scores = model.predict([("How do I learn Python quickly?",
                             "What is the fastest way to learn Python?"),
                            ("What is the fastest way to learn Python?",
                             "How do I learn Python quickly?")])
    assert scores.shape == (2,)
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)


def test_embedder_is_written_with_its_own_card(tuned: Path) -> None:
    from sentence_transformers import SentenceTransformer

    card = _card(tuned / "embedder")
    assert card["kind"] == "embedder" and card["steps"] == STEPS
    assert METRIC_FIELDS <= set(card["metrics"]["embedder_cosine"])
    vectors = SentenceTransformer(str(tuned / "embedder"), device="cpu",
                                  local_files_only=True).encode(["hello there"])
    assert vectors.shape == (1, 384) and np.isfinite(vectors).all()


def test_heldout_parts_are_written_and_share_no_text_with_train(
        tuned: Path, parts: dict[str, list[LabelledPair]]) -> None:
    train_texts = {t for p in parts["train"] for t in (p.a, p.b)}
    for name in ("calibrate", "test"):
        held = read_pairs(tuned / f"heldout-{name}.jsonl.gz")
        assert held == parts[name] and held
        assert not train_texts & {t for p in held for t in (p.a, p.b)}


def test_finished_out_dir_is_not_overwritten(tuned: Path, pairs_file: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    before = (tuned / "verifier" / CARD_NAME).read_bytes()
    assert _quick(pairs_file, tuned) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tuned / "verifier" / CARD_NAME).read_bytes() == before


def test_missing_pairs_file_is_a_clear_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert _quick(tmp_path / "nope.jsonl.gz", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "nope.jsonl.gz" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_stopped_run_resumes_from_its_checkpoint(tmp_path: Path, pairs_file: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    # stops with a checkpoint after 2 of 4 steps, like Ctrl-C would (whatever --save-steps)
    assert _quick(pairs_file, out, "--no-transitive", "--stop-after-steps", 2) == 3
    checkpoints = out / "checkpoints" / "verifier"
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "verifier").exists()
    # a plain rerun refuses to clobber the unfinished run
    assert _quick(pairs_file, out, "--no-transitive") == 2
    assert "--resume" in capsys.readouterr().err
    # so does a resume with another recipe
    assert _quick(pairs_file, out, "--resume") == 2
    assert "transitive" in capsys.readouterr().err
    assert _quick(pairs_file, out, "--no-transitive", "--resume") == 0
    card = _card(out / "verifier")
    assert card["resumed_from"] == "checkpoint-2"
    assert card["steps"] == STEPS


def test_help_documents_every_flag_with_its_default() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tune.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for flag in ("--pairs", "--out", "--base", "--data-dir", "--epochs", "--batch-size",
                 "--max-steps", "--limit", "--learning-rate", "--save-steps", "--resume",
                 "--embedder", "--device", "--seed", "--overwrite", "--symmetric"):
        assert flag in text
    assert "(default: default)" in text and "(default: auto)" in text


def test_curve_metrics_on_a_known_ranking() -> None:
    # scores descending: dup, dup, non, dup, non, non
    m = curve_metrics([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 1, 0, 1, 0, 0])
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["precision_at_recall_0.50"] == 1.0  # two of three duplicates above 0.8
    assert m["recall_at_precision_0.90"] == pytest.approx(2 / 3)
    assert m["threshold_at_precision_0.90"] == 0.8
    tied = curve_metrics([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0])
    assert tied["auc"] == 0.5 and tied["precision_at_recall_0.50"] == 0.5
    assert tied["recall_at_precision_0.95"] == 0.0


def test_transitive_pairs_close_duplicates_and_extend_non_duplicates() -> None:
    pairs = [LabelledPair("a", "b", True), LabelledPair("b", "c", True),
             LabelledPair("c", "x", False), LabelledPair("x", "y", True)]
    implied = {(frozenset((p.a, p.b)), p.duplicate)
               for p in transitive_pairs(pairs, max_cluster=8, seed=0)}
    assert (frozenset("ac"), True) in implied
    assert (frozenset("ay"), False) in implied and (frozenset("by"), False) in implied
    assert all(key not in {frozenset((p.a, p.b)) for p in pairs} for key, _ in implied)
    assert len(implied) == 1 + (3 * 2 - 1)


def test_fusion_combines_two_weak_scores_into_a_better_one() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(2000) < 0.4
    cosine = 0.7 + 0.1 * labels + 0.08 * rng.standard_normal(2000)
    verifier = 1 / (1 + np.exp(-(2 * labels - 1 + 1.2 * rng.standard_normal(2000))))
    pairs = [LabelledPair(f"a{i}", f"b{i}", bool(y)) for i, y in enumerate(labels)]
    fused = fusion(cosine, verifier, pairs)
    assert fused["weights"]["cosine"] > 0 and fused["weights"]["verifier_logit"] > 0
    assert fused["metrics"]["auc"] > max(curve_metrics(cosine, labels)["auc"],
                                         curve_metrics(verifier, labels)["auc"])


def test_the_server_serves_with_the_tuned_verifier(tuned: Path, start_server, encoder) -> None:  # type: ignore[no-untyped-def]
    """What tune wrote is what `serve --verifier` loads: the card's scoring choice and its
    cosine fusion (fitted for this embedder) are honoured, and hits carry the score."""
    from stratacache.verify import Verifier

    card = _card(tuned / "verifier")
    assert card["base"]["fingerprint"] == encoder.identity.fingerprint
    assert card["score_both_orders"] in (True, False)
    verifier = Verifier(tuned / "verifier", device="cpu", embedder=encoder.identity)
    assert verifier.identity.fused and verifier.identity.symmetric == card["score_both_orders"]
    server = start_server({"verifier": verifier}, verify_gate=0.5, verify_threshold=0.0)
    with server.client() as c:
        c.store("How do I learn Python quickly?", "answer")
        hit = c.lookup("What is the fastest way to learn Python?")
        assert hit.hit and hit.verifier_score is not None and 0 <= hit.verifier_score <= 1


def test_card_numbers_reproduce_from_its_held_back_scores(
        tuned: Path, parts: dict[str, list[LabelledPair]], encoder) -> None:  # type: ignore[no-untyped-def]
    """One decision score: the card's ``decision`` metrics are those of the score a server with
    the base model thresholds (the fused probability), computed from the held-back scores the
    card holds; the server reads the same scores, and derives the operating point the card
    reports."""
    from stratacache import operating_point
    from stratacache.verify import Fusion, Verifier

    metrics = _card(tuned / "verifier")["metrics"]
    held = metrics["held_back"]
    labels = [p.duplicate for p in parts["calibrate"]]
    assert held["part"] == "calibrate" and held["duplicate"] == [int(y) for y in labels]
    assert len(held["base_cosine"]) == len(held["verifier"]) == len(labels)
    fused = Fusion(**metrics["fusion_with_base_cosine"]["weights"])(
        np.asarray(held["base_cosine"]), np.asarray(held["verifier"]))
    decision = metrics["decision"]
    assert decision["unit"] == "probability" and decision["score"].startswith("fused")
    assert {k: v for k, v in decision.items() if k not in ("unit", "score")} == \
        curve_metrics(fused, labels)
    for key, value in decision.items():
        if key.startswith("threshold_") and value is not None:
            assert 0.0 <= value <= 1.0  # probabilities, unlike the fusion's logit thresholds

    points = metrics["default_operating_point"]
    for quantize, column in (("none", "verifier"), ("int8", "verifier_int8")):
        verifier = Verifier(tuned / "verifier", device="cpu", embedder=encoder.identity,
                            quantize=quantize)
        served = verifier.held_back()
        assert served is not None and served.scores_from == column
        assert np.allclose(served.score, Fusion(**metrics["fusion_with_base_cosine"]["weights"])(
            np.asarray(held["base_cosine"]), np.asarray(held[column])), atol=1e-6)
        point = operating_point.choose(served, min_similarity=points["min_similarity"])
        assert points[column]["threshold"] == pytest.approx(point.threshold)
        assert points[column]["gate"] == pytest.approx(point.gate)
    # the int8 column is what the int8 verifier scores (a server in int8 derives from it);
    # int8 activations are scaled per batch, so a score moves by ~1e-3 with its batch
    int8 = Verifier(tuned / "verifier", device="cpu", quantize="int8")
    assert np.allclose(held["verifier_int8"][:5], int8.own_scores(
        [(p.a, p.b) for p in parts["calibrate"][:5]]), atol=5e-3)
    assert metrics["decision_int8"]["unit"] == "probability"


def test_epoch_metrics_record_the_held_back_curve_per_epoch(tmp_path: Path,
                                                            pairs_file: Path) -> None:
    out = tmp_path / "out"
    assert _run("--pairs", pairs_file, "--out", out, "--limit", 120, "--epochs", 2,
                "--save-steps", 1000, "--device", "cpu", "--threads", 1,
                "--epoch-metrics") == 0
    card = _card(out / "verifier")
    assert card["batch_size"] == 32  # --batch-size 0: the CPU's default
    rows = card["metrics"]["per_epoch"]
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert rows[0]["step"] < rows[1]["step"] == card["steps"]
    assert rows[-1]["decision"] == card["metrics"]["decision"]
    assert set(rows[0]["decision"]) == set(card["metrics"]["decision"])
