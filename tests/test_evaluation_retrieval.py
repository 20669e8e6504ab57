"""Retrieval metrics: hand-computed values, and an end-to-end run checked against a brute-force oracle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import need_shared, run_cli

from assistant.evaluation.metrics import (
    accuracy,
    dedupe,
    macro_f1,
    majority_class,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
    reciprocal_rank,
)

PASSAGES = [
    ("volcano", "How volcanoes erupt", "Magma rises through cracks in the crust. When gas pressure in the magma "
     "chamber exceeds the strength of the rock above, the volcano erupts ash and lava."),
    ("bread", "Baking sourdough bread", "Sourdough rises because wild yeast and lactic acid bacteria in the starter "
     "ferment the flour. A long cold proof gives the loaf its sour taste and open crumb."),
    ("chess", "Chess openings for beginners", "The Italian Game starts with e4, e5, knight f3, knight c6 and bishop "
     "c4. It develops pieces quickly and aims at the weak f7 square."),
    ("bicycle", "Looking after a bicycle chain", "Clean the chain with a degreaser, dry it, then apply a drop of "
     "lubricant to each roller. A stretched chain wears the cassette and should be replaced."),
    ("bees-hive", "Life inside a honeybee hive", "A colony has one queen, thousands of female workers and a few "
     "drones. Workers build wax comb, nurse larvae and guard the entrance."),
    ("bees-honey", "How bees make honey", "Foraging bees collect nectar, add enzymes and store it in comb cells. "
     "They fan their wings to evaporate water until the nectar thickens into honey."),
    ("tides", "Why the sea has tides", "The moon's gravity pulls the ocean into two bulges on opposite sides of "
     "the Earth. As the planet turns, a coast passes through high and low tide about twice a day."),
    ("coffee", "Roasting coffee beans", "Green coffee beans turn yellow, then brown as sugars caramelise. The first "
     "crack signals a light roast; darker roasts continue to the second crack."),
]
QUERIES = [
    ("what makes a volcano erupt", ["volcano"]),
    ("why does sourdough taste sour", ["bread"]),
    ("how should I oil my bike chain", ["bicycle"]),
    ("how do honeybees live and make honey", ["bees-hive", "bees-honey"]),
    ("what causes high and low tide", ["tides"]),
    ("what happens during the first crack when roasting", ["coffee"]),
    ("a good first chess opening", ["chess"]),
]


# metric functions on hand-computed cases

def test_recall_counts_share_of_gold():
    assert recall_at_k(["a", "b", "c"], {"b", "e"}, 1) == 0.0
    assert recall_at_k(["a", "b", "c"], {"b", "e"}, 5) == 0.5
    assert recall_at_k(["a", "b", "e"], {"b", "e"}, 3) == 1.0


def test_reciprocal_rank_uses_first_gold():
    assert reciprocal_rank(["a", "b", "c"], {"c", "b"}) == 0.5
    assert reciprocal_rank(["a", "b", "c"], {"z"}) == 0.0
    # gold beyond the depth of 10 does not count
    assert reciprocal_rank([str(i) for i in range(20)], {"15"}) == 0.0


def test_ndcg_matches_formula():
    value = ndcg_at_k(["a", "b", "c", "d"], {"b", "e"})
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert value == pytest.approx(expected)
    assert ndcg_at_k(["b", "e", "a"], {"b", "e"}) == pytest.approx(1.0)


def test_dedupe_keeps_first_occurrence():
    assert dedupe(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]


def test_ranking_metrics_average_queries():
    out = ranking_metrics([["a", "b"], ["x", "y"]], [{"a"}, {"y"}])
    assert out["recall@1"] == 0.5
    assert out["mrr"] == pytest.approx(0.75)


def test_classification_metrics_match_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    labels = ["yes", "no", "maybe", "yes", "no", "yes", "maybe", "no"]
    predictions = ["yes", "yes", "no", "yes", "no", "maybe", "maybe", "no"]
    classes = ["yes", "no", "maybe"]
    assert accuracy(predictions, labels) == pytest.approx(sklearn.accuracy_score(labels, predictions))
    assert macro_f1(predictions, labels, classes) == pytest.approx(
        sklearn.f1_score(labels, predictions, labels=classes, average="macro"))
    # a class never predicted and never present scores 0, as scikit-learn's zero_division=0 does
    assert macro_f1(["yes"], ["yes"], classes) == pytest.approx(1 / 3)
    assert majority_class(["no", "yes", "yes"]) == "yes"


# end to end: the CLI on a hand-made set, checked against an oracle that ranks every chunk itself

@pytest.fixture(scope="module")
def handmade_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("handmade")
    passages = folder / "passages.jsonl"
    passages.write_text("\n".join(json.dumps({"id": i, "title": t, "text": x, "source": f"https://example.org/{i}"})
                                  for i, t, x in PASSAGES) + "\n")
    queries = folder / "queries.jsonl"
    queries.write_text("\n".join(json.dumps({"query": q, "gold": g}) for q, g in QUERIES) + "\n")
    return folder, passages, queries


def oracle_metrics(rankings: list[list[str]], golds: list[set[str]]) -> dict[str, float]:
    """Independent arithmetic: per-query loops over every position, as a reader would do by hand."""
    n = len(rankings)
    out = {}
    for k in (1, 5, 10):
        out[f"recall@{k}"] = sum(sum(1 for d in r[:k] if d in g) / len(g)
                                 for r, g in zip(rankings, golds, strict=True)) / n
    rr = []
    nd = []
    for ranking, gold in zip(rankings, golds, strict=True):
        hits = [d in gold for d in ranking[:10]]
        rr.append(1 / (hits.index(True) + 1) if True in hits else 0.0)
        dcg = sum(h / math.log2(i + 2) for i, h in enumerate(hits))
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(gold), 10)))
        nd.append(dcg / ideal)
    out["mrr"] = sum(rr) / n
    out["ndcg@10"] = sum(nd) / n
    return out


def test_eval_retrieval_matches_brute_force(handmade_set, embedder, tmp_path):
    folder, passages, queries = handmade_set
    out = tmp_path / "out"
    result = run_cli("eval", "retrieval", "--dataset", "jsonl", str(queries), "--passages", str(passages),
                         "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "recall@1" in result.stdout
    report = json.loads((out / "retrieval.json").read_text())
    assert (out / "retrieval.md").read_text().startswith("| mode |")
    assert set(report["modes"]) == {"dense", "bm25", "hybrid"}

    # dense oracle: cosine of each query with every chunk vector, best chunk per document
    from assistant.indexing import IndexStore

    index = IndexStore(tmp_path / "cache").open()
    chunks = index.chunks_by_int_id([int(i) for i in index.bm25_ids])
    doc_of_row = [chunks[int(i)].doc_id for i in index.bm25_ids]
    vectors = np.asarray(index.vectors)
    query_vectors = embedder.encode([q for q, _ in QUERIES], normalize_embeddings=True, convert_to_numpy=True)
    rankings = []
    for vector in query_vectors:
        scores = vectors @ vector
        best: dict[str, float] = {}
        for row, doc_id in enumerate(doc_of_row):
            best[doc_id] = max(best.get(doc_id, -1.0), float(scores[row]))
        rankings.append(sorted(best, key=lambda d: -best[d])[:10])
    golds = [set(g) for _, g in QUERIES]
    expected = oracle_metrics(rankings, golds)
    for name, value in expected.items():
        assert report["modes"]["dense"][name] == pytest.approx(value, abs=1e-9), name
    for row, ranking in zip(report["per_query"], rankings, strict=True):
        assert row["dense"] == ranking

    # the other modes: the reported numbers follow from the reported rankings
    for mode in ("bm25", "hybrid"):
        recomputed = oracle_metrics([row[mode] for row in report["per_query"]], golds)
        for name, value in recomputed.items():
            assert report["modes"][mode][name] == pytest.approx(value, abs=1e-9), (mode, name)


def test_eval_retrieval_rejects_unknown_gold(handmade_set, tmp_path):
    folder, passages, _ = handmade_set
    queries = tmp_path / "bad.jsonl"
    queries.write_text(json.dumps({"query": "anything", "gold": ["no-such-doc"]}) + "\n")
    result = run_cli("eval", "retrieval", "--dataset", "jsonl", str(queries), "--passages", str(passages),
                         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "no-such-doc" in result.stderr


def test_pubmedqa_documents_one_per_abstract():
    from assistant.evaluation.datasets import load_pubmedqa, pubmedqa_documents, spread

    data = load_pubmedqa(need_shared("pubmedqa"))
    assert len(data.items) == 1000
    assert len(data.test_ids) == 500
    assert len(data.train_ids) == 500
    documents = pubmedqa_documents(data, data.test_ids[:3])
    assert [d.doc_id for d in documents] == data.test_ids[:3]
    first = data.items[data.test_ids[0]]
    assert [s.text for s in documents[0].sections] == first.contexts
    # the question must not leak into the indexed title
    assert first.question not in documents[0].title
    labels = [data.items[i].decision for i in spread(data.test_ids, 100)]
    assert {"yes", "no", "maybe"} <= set(labels)
