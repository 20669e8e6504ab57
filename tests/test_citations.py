"""Citation verification: markers resolve to prompt sources, sentences need support, numbers must match."""

from __future__ import annotations

from assistant.answer.citations import normalize_markers, verify_citations
from assistant.retrieval import Hit

SOURCES = [
    Hit(f"doc{n}#0-x", f"doc{n}", 1.0, title, "corpora/demo", text)
    for n, (title, text) in enumerate([
        ("Hyperkalaemia", "Give 10 mL of 10% calcium gluconate intravenously over 10 minutes when the ECG changes."),
        ("Hypoglycaemia", "Give 15 to 20 g of fast-acting carbohydrate and recheck glucose after 15 minutes."),
        ("Asthma", "Inhaled corticosteroids are the basis of maintenance therapy for persistent asthma."),
        ("Sepsis", "Give 30 mL/kg of crystalloid within the first three hours for hypotension."),
        ("Hypothyroidism", "Increase the levothyroxine dose by about 25 to 30 percent once pregnancy is confirmed."),
    ], 1)
]
MIN_SUPPORT = 0.45


def test_out_of_range_marker_removed_and_flagged(embedder):
    text = "Give 10 mL of 10% calcium gluconate over 10 minutes [1][9]."
    result = verify_citations(text, SOURCES, embedder, MIN_SUPPORT)
    assert "[9]" not in result.text
    assert [f["marker"] for f in result.flags if f["type"] == "invalid_citation"] == [9]
    assert [c.marker for c in result.citations] == [1]


def test_each_marker_resolves_to_its_own_source(embedder):
    text = ("Give 15 to 20 g of fast-acting carbohydrate [2]. Recheck glucose after 15 minutes [2]. "
            "Give 30 mL/kg of crystalloid within three hours [4].")
    result = verify_citations(text, SOURCES, embedder, MIN_SUPPORT)
    by_marker = {c.marker: c for c in result.citations}
    assert sorted(by_marker) == [2, 4]
    assert by_marker[2].chunk_id == SOURCES[1].chunk_id
    assert by_marker[4].chunk_id == SOURCES[3].chunk_id
    assert len(result.citations) == 2, "a repeated marker yields one citation"


def test_repeated_adjacent_marker_collapsed(embedder):
    result = verify_citations("Inhaled corticosteroids are the basis of asthma maintenance [3][3].", SOURCES,
                              embedder, MIN_SUPPORT)
    assert "[3][3]" not in result.text
    assert result.text.count("[3]") == 1


def test_grouped_markers_normalized():
    assert normalize_markers("See [1, 3] and [2;4].") == "See [1][3] and [2][4]."


def test_wrong_number_flagged_unsupported(embedder):
    result = verify_citations("Give 100 mL of 10% calcium gluconate over 10 minutes [1].", SOURCES, embedder,
                              MIN_SUPPORT)
    assert not result.sentences[0].supported
    flagged = [f for f in result.flags if f["type"] == "number_not_in_source"]
    assert flagged and flagged[0]["numbers"] == [100.0]


def test_unrelated_sentence_unsupported(embedder):
    result = verify_citations("The Eiffel Tower is in Paris.", SOURCES, embedder, MIN_SUPPORT)
    assert not result.sentences[0].supported
    assert result.sentences[0].markers == []
    assert any(f["type"] == "unsupported" for f in result.flags)


def test_uncited_supported_sentence_auto_cited(embedder):
    result = verify_citations("Increase the levothyroxine dose by 25 to 30 percent in pregnancy.", SOURCES,
                              embedder, MIN_SUPPORT)
    check = result.sentences[0]
    assert check.auto_cited and check.markers == [5]
    assert result.text.endswith("[5]")
    assert any(f["type"] == "auto_cited" for f in result.flags)
