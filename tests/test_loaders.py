"""Every loader on its real sample: PDF, MedQuAD XML, FDA SPL XML, the demo Markdown corpus, text, HTML, JSONL."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import DEMO_CORPUS, need_shared

from assistant.corpus import load_corpus, load_file
from assistant.errors import CorpusError

TABLE_SEPARATOR = re.compile(r"^\|(---\|)+$")


def markdown_tables(text: str) -> list[list[str]]:
    """Each run of `|` lines in `text`, as a list of lines."""
    tables: list[list[str]] = []
    previous_was_table = False
    for line in text.splitlines():
        is_table = line.startswith("|") and line.endswith("|")
        if is_table and previous_was_table:
            tables[-1].append(line)
        elif is_table:
            tables.append([line])
        previous_was_table = is_table
    return tables


def cell_count(line: str) -> int:
    return line.count("|") - 1


# PDF

def test_pdf_keeps_page_numbers():
    pdf = need_shared("guidelines", "cdc_outpatient_infection_prevention.pdf")

    documents = load_file(pdf)

    assert len(documents) == 1
    document = documents[0]
    assert [section.page for section in document.sections] == list(range(1, 45))
    assert document.title.startswith("Guide to Infection Prevention")
    assert document.source == pdf.as_posix()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", document.date)
    assert all(section.text.strip() for section in document.sections)
    hand_hygiene_pages = [s.page for s in document.sections if "hand hygiene" in s.text.lower()]
    assert len(hand_hygiene_pages) > 3


# MedQuAD

def count_medquad_answers(folder: Path) -> int:
    """Oracle: QA pairs with a non-empty answer, counted with the standard library parser."""
    answers = 0
    for path in folder.rglob("*.xml"):
        for element in ET.parse(path).getroot().iter():
            if element.tag.lower() == "answer" and "".join(element.itertext()).strip():
                answers += 1
    return answers


def test_medquad_folder_one_document_per_answer():
    folder = need_shared("medquad")

    report = load_corpus([folder])

    assert report.problems == []
    # 6,114 QA pairs in the folder, one with an empty answer; LICENSE.txt and UPSTREAM_README.txt are
    # not documents
    assert len(report.documents) == count_medquad_answers(folder) == 6113
    assert all(document.source.startswith("http") for document in report.documents)
    assert all(document.metadata["question"] for document in report.documents)
    assert len({document.doc_id for document in report.documents}) == len(report.documents)


@pytest.mark.parametrize(("relative", "root_tag"), [
    ("1_CancerGov_QA/0000001_1.xml", "Document"),
    ("9_CDC_QA/0000397.xml", "DiseaseFile"),
    ("6_NINDS_QA/0000007.xml", "doc"),
])
def test_medquad_schema_keeps_focus_and_url(relative, root_tag):
    path = need_shared("medquad", *relative.split("/"))
    root = ET.parse(path).getroot()
    assert root.tag == root_tag
    pairs = [e for e in root.iter() if e.tag.lower() == "answer" and "".join(e.itertext()).strip()]
    focus = next(e for e in root if e.tag.lower() in {"focus", "doctitle-focus"}).text.strip()

    documents = load_file(path)

    assert len(documents) == len(pairs)
    for document in documents:
        assert document.source == root.get("url")
        assert document.title == focus
        assert document.sections[0].title == document.metadata["qtype"]
        assert document.metadata["question"].endswith("?")
        assert document.text


# FDA SPL

SPL_FILES = ["64f8040f-938d-4236-8e22-c838c9b5f8da.xml", "cough.xml", "humira.xml", "lipitor-orig.xml",
             "lipitor-repack.xml", "no-title.xml"]


@pytest.mark.parametrize("name", SPL_FILES)
def test_spl_label_sections_and_tables(name):
    path = need_shared("fda_spl", name)

    documents = load_file(path)

    assert len(documents) == 1
    label = documents[0]
    assert label.doc_id.startswith("spl-")
    assert label.title.endswith(" label")
    assert label.specialty == "pharmacology"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", label.date)
    assert len(label.sections) >= 15
    # only the label's revision stamp ("LAB-0021-29.0") sits in a section without a heading
    untitled = [section.text for section in label.sections if not section.title]
    assert len(untitled) <= 1, untitled
    assert all(len(text) < 40 for text in untitled), untitled
    assert not any("unclassified" in (section.title or "").lower() for section in label.sections)
    for section in label.sections:
        for table in markdown_tables(section.text):
            assert len(table) >= 2, f"table without rows in {section.title}"
            assert TABLE_SEPARATOR.match(table[1]), f"table without header separator in {section.title}"
            assert len({cell_count(line) for line in table}) == 1, f"ragged table in {section.title}"


def test_spl_lipitor_keeps_titles_and_table_cells():
    label = load_file(need_shared("fda_spl", "lipitor-orig.xml"))[0]

    titles = [section.title for section in label.sections]
    assert "1 INDICATIONS AND USAGE > 1.2 Hyperlipidemia" in titles
    adverse = next(s for s in label.sections
                   if s.title == "6 ADVERSE REACTIONS > 6.1 Clinical Trial Adverse Experiences")
    assert "| Nasopharyngitis | 8.3 | 12.9 | 5.3 | 7.0 | 4.2 | 8.2 |" in adverse.text
    # <br/> inside a header cell separates words instead of gluing them
    assert "| Any dose N=8755 |" in adverse.text
    assert label.title == "Lipitor (atorvastatin calcium) label"
    assert label.issuer == "Parke-Davis Div of Pfizer Inc"


def test_spl_without_title_gets_product_name():
    path = need_shared("fda_spl", "no-title.xml")
    root = ET.parse(path).getroot()
    # the document's <title/> is empty
    assert not "".join(root.find("{urn:hl7-org:v3}title").itertext()).strip()

    label = load_file(path)[0]

    assert label.title == "Haloperidol (haloperidol) label"


# Markdown: the demo corpus

def test_demo_corpus_metadata():
    report = load_corpus([DEMO_CORPUS])

    assert report.problems == []
    assert len(report.documents) == 30
    specialties = {document.specialty for document in report.documents}
    assert specialties == {"cardiology", "endocrinology", "infectious_disease", "nephrology", "oncology",
                           "pulmonology"}
    for document in report.documents:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", document.date), document.doc_id
        assert document.version, document.doc_id
        assert document.issuer, document.doc_id
        assert document.title
        assert document.title != document.doc_id
        assert Path(document.source).stem == document.doc_id
        assert all(section.title for section in document.sections), document.doc_id


def test_markdown_front_matter_and_code_fence(tmp_path):
    path = tmp_path / "sodium.md"
    path.write_text(
        "---\nid: hyponatraemia-demo\ntitle: Hyponatraemia\nissuer: Ward Group\nversion: 3\n"
        "date: 2024-02-29\nspecialty: nephrology\n---\n\n"
        "# Hyponatraemia\n\nIntro text.\n\n## Treatment\n\nRaise sodium slowly.\n\n"
        "```bash\n# correct by no more than 10 mmol/L in 24 h\n```\n\n### Monitoring\n\nCheck every 4 h.\n",
        encoding="utf-8",
    )

    document = load_file(path)[0]

    assert (document.doc_id, document.title, document.issuer, document.version, document.date, document.specialty) \
        == ("hyponatraemia-demo", "Hyponatraemia", "Ward Group", "3", "2024-02-29", "nephrology")
    assert [section.title for section in document.sections] == [None, "Treatment", "Treatment > Monitoring"]
    assert "# correct by no more than 10 mmol/L in 24 h" in document.sections[1].text


# plain text

def test_plain_text(tmp_path):
    path = tmp_path / "fluid_balance-notes.txt"
    path.write_text("Daily weights   guide fluid balance.\n\n\n\nRecord input and output.\n", encoding="utf-8")

    document = load_file(path)[0]

    assert document.doc_id == "fluid-balance-notes"
    assert document.title == "fluid balance notes"
    assert document.text == "Daily weights guide fluid balance.\n\nRecord input and output."
    assert document.source == path.as_posix()


# HTML

HTML_PAGE = """<!DOCTYPE html>
<html><head><title>Potassium Replacement Protocol</title>
<meta name="date" content="2024-05-01"><meta name="specialty" content="nephrology">
<script>var leaked = "script text must not be indexed";</script>
<style>body { color: red; }</style></head>
<body>
<nav>Home | About</nav>
<h1>Potassium Replacement</h1>
<p>Oral potassium chloride is preferred
   when the patient can swallow.</p>
<h2>Dosing table</h2>
<table><tr><th>Serum K (mmol/L)</th><th>Dose</th></tr>
<tr><td>3.0-3.4</td><td>40 mmol orally</td></tr>
<tr><td>&lt;3.0</td><td>IV 10 mmol/h</td></tr></table>
<p>Recheck serum potassium after <b>four</b> hours.</p>
<script>alert("another script")</script>
<h2>Monitoring</h2>
<ul><li>Cardiac monitor above 10 mmol/h</li><li>Check magnesium</li></ul>
<footer>Copyright</footer>
</body></html>
"""


def test_html_headings_table_and_scripts(tmp_path):
    path = tmp_path / "potassium.html"
    path.write_text(HTML_PAGE, encoding="utf-8")

    document = load_file(path)[0]

    assert document.title == "Potassium Replacement Protocol"
    assert (document.date, document.specialty) == ("2024-05-01", "nephrology")
    text = document.text
    assert "script" not in text
    assert "leaked" not in text
    assert "color" not in text
    assert "Home | About" not in text
    assert "Copyright" not in text
    assert "Oral potassium chloride is preferred when the patient can swallow." in text
    assert "Recheck serum potassium after four hours." in text
    dosing = next(section for section in document.sections if section.title == "Dosing table")
    assert "| Serum K (mmol/L) | Dose |\n|---|---|\n| 3.0-3.4 | 40 mmol orally |\n| <3.0 | IV 10 mmol/h |" \
        in dosing.text
    monitoring = next(section for section in document.sections if section.title == "Monitoring")
    assert monitoring.text == "- Cardiac monitor above 10 mmol/h\n- Check magnesium"


# JSONL

def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(doc_id: str, **extra: str) -> str:
    return json.dumps({"id": doc_id, "title": f"Title {doc_id}", "text": f"Text of {doc_id}.",
                       "source": f"https://example.org/{doc_id}", **extra})


def test_jsonl_valid_lines(tmp_path):
    path = write_jsonl(tmp_path / "notes.jsonl", [
        record("a", date="2023-04-05", specialty="oncology"),
        "",
        record("b"),
    ])

    documents = load_file(path)

    assert [d.doc_id for d in documents] == ["a", "b"]
    assert (documents[0].date, documents[0].specialty, documents[0].source) == \
        ("2023-04-05", "oncology", "https://example.org/a")
    assert documents[1].date is None
    assert documents[1].text == "Text of b."


def test_jsonl_bad_line_reported_and_skipped(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        record("a"),
        "{not json",
        json.dumps({"id": "c", "title": "No text"}),
        record("d", date="2020-13-45"),
        record("e"),
    ])

    problems: list[tuple[str, str]] = []
    documents = load_file(path, problems)
    report = load_corpus([tmp_path])

    assert [d.doc_id for d in documents] == ["a", "e"]
    assert [where for where, _ in problems] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "invalid JSON" in problems[0][1]
    assert "missing field(s) text, source" in problems[1][1]
    assert "2020-13-45" in problems[2][1]
    assert [d.doc_id for d in report.documents] == ["a", "e"]
    assert report.problems == problems


def test_jsonl_without_valid_line_rejected(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", ["[1, 2]", "{oops", json.dumps({"id": "x"})])

    with pytest.raises(CorpusError, match="has no valid document lines") as caught:
        load_file(path)

    assert str(path) in str(caught.value)
    assert "line 1: expected a JSON object" in str(caught.value)


def test_unsupported_suffix_rejected(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")

    with pytest.raises(CorpusError, match="unsupported type '.csv'"):
        load_file(path)
