"""One loader per source format, chosen by a registry keyed on file suffix.

Each loader takes a path and returns a list of `Document`s or raises `CorpusError` naming the file
and the fix. `load_corpus` walks files and folders, reports every bad file and keeps going.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import yaml
from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException
from tqdm.auto import tqdm

from assistant.corpus.document import Document, Section
from assistant.corpus.text import collapse_whitespace, markdown_table, normalize_date, read_utf8
from assistant.errors import CorpusError
from assistant.jsonl import jsonl_lines

logger = logging.getLogger(__name__)

Loader = Callable[[Path], list[Document]]


@dataclass
class LoadReport:
    """What `load_corpus` read, and every file or line it skipped with the reason."""

    documents: list[Document] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    files: int = 0


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "document"


# Markdown and plain text

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.DOTALL)
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")


def _front_matter(text: str, path: Path) -> tuple[dict, str]:
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        # PyYAML's own message spans several lines; the CLI prints errors as one line
        problem = getattr(err, "problem", None) or "syntax error"
        mark = getattr(err, "problem_mark", None)
        # the front matter starts on line 2 of the file, after the opening ---
        where = f" at line {mark.line + 2}" if mark is not None else ""
        raise CorpusError(
            f"front matter of {str(path)!r} is not valid YAML ({problem}{where}); fix the YAML between the --- lines"
        ) from err
    if not isinstance(meta, dict):
        raise CorpusError(f"front matter of {str(path)!r} must be a mapping of field: value")
    return meta, text[match.end():]


def _markdown_sections(body: str) -> tuple[str | None, list[Section]]:
    """Split Markdown at headings; a section's title is its heading path below the document's H1."""
    h1: str | None = None
    path: list[tuple[int, str]] = []
    sections: list[Section] = []
    lines: list[str] = []

    def flush() -> None:
        text = "\n".join(lines).strip()
        if text:
            title = " > ".join(t for _, t in path) or None
            sections.append(Section(text=text, title=title))
        lines.clear()

    in_fence = False
    for line in body.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        # a `#` line inside a fenced code block is code (a shell comment), not a heading
        match = None if in_fence else _HEADING.match(line)
        if not match:
            lines.append(line)
            continue
        flush()
        level, title = len(match.group(1)), match.group(2)
        if level == 1 and h1 is None and not sections:
            h1 = title
            continue
        path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, title)]
    flush()
    return h1, sections


# front matter fields a document reads; each must be a single value
_META_FIELDS = ("id", "title", "source", "url", "date", "specialty", "issuer", "version")


def _document_from_meta(meta: dict, path: Path, default_title: str, sections: list[Section]) -> Document:
    for name in _META_FIELDS:
        # A list or mapping is no single value, and YAML aliases can nest one into billions of items
        # that str() would try to expand.
        if isinstance(meta.get(name), (list, dict)):
            raise CorpusError(f"front matter field {name!r} of {str(path)!r} is a list or mapping; "
                              "give it a single value")
    doc_id = str(meta.get("id") or slug(path.stem))
    return Document(
        doc_id=doc_id,
        title=str(meta.get("title") or default_title),
        sections=sections,
        source=str(meta.get("source") or meta.get("url") or path.as_posix()),
        date=normalize_date(meta.get("date"), path),
        specialty=str(meta["specialty"]) if meta.get("specialty") else None,
        issuer=str(meta["issuer"]) if meta.get("issuer") else None,
        version=str(meta["version"]) if meta.get("version") is not None else None,
    )


def load_markdown(path: Path) -> list[Document]:
    meta, body = _front_matter(read_utf8(path), path)
    h1, sections = _markdown_sections(body)
    if not sections:
        raise CorpusError(f"{str(path)!r} has no text after its front matter")
    return [_document_from_meta(meta, path, h1 or path.stem, sections)]


def load_text(path: Path) -> list[Document]:
    text = collapse_whitespace(read_utf8(path))
    if not text:
        raise CorpusError(f"{str(path)!r} is empty")
    return [_document_from_meta({}, path, path.stem.replace("_", " ").replace("-", " "), [Section(text)])]


# HTML

# Elements whose content starts on a new line; everything else is inline text.
_HTML_BLOCKS = (
    "address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "figcaption", "figure", "header",
    "hr", "li", "main", "ol", "p", "pre", "section", "ul",
)
_HTML_DROPPED = ["script", "style", "noscript", "nav", "footer", "template", "form", "button", "svg", "iframe"]


def _html_to_markdown(soup: Any) -> str:
    """Render parsed HTML as Markdown-like lines: `#` headings, `- ` list items and Markdown tables."""
    from bs4 import NavigableString

    # HTML collapses every whitespace run (line breaks included) to one space
    for string in list(soup.find_all(string=True)):
        if type(string) is NavigableString:
            string.replace_with(re.sub(r"\s+", " ", str(string)))
    # innermost tables first, so an outer table's cells already hold the inner table's text
    for table in reversed(soup.find_all("table")):
        rows = [[cell.get_text(" ", strip=True) for cell in tr.find_all(["th", "td"])] for tr in table.find_all("tr")]
        table.replace_with(NavigableString("\n" + markdown_table([r for r in rows if any(r)]) + "\n"))
    for heading in soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6"]):
        level = int(heading.name[1])
        text = heading.get_text(" ", strip=True)
        heading.replace_with(NavigableString(f"\n{'#' * level} {text}\n" if text else "\n"))
    for line_break in soup.find_all("br"):
        line_break.replace_with(NavigableString("\n"))
    for block in soup.find_all(_HTML_BLOCKS):
        block.insert_before(NavigableString("\n"))
        block.insert_after(NavigableString("\n"))
        if block.name == "li":
            block.insert(0, NavigableString("- "))
    root = soup.body or soup
    lines = [line.strip() for line in root.get_text().splitlines()]
    return "\n".join(line for line in lines if line)


def load_html(path: Path) -> list[Document]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(read_utf8(path), "lxml")
    meta = {name.lower(): tag.get("content") for tag in soup.find_all("meta")
            if (name := tag.get("name")) and tag.get("content")}
    title_tag = soup.find("title") or soup.find("h1")
    title = title_tag.get_text(" ", strip=True) if title_tag else ""
    for tag in soup(_HTML_DROPPED):
        tag.decompose()
    if soup.head is not None:
        soup.head.decompose()

    h1, sections = _markdown_sections(_html_to_markdown(soup))
    if not sections:
        raise CorpusError(f"{str(path)!r} has no visible text; check that the page is not rendered by scripts")
    return [_document_from_meta(meta, path, title or h1 or path.stem, sections)]


# PDF

class _CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@contextlib.contextmanager
def _pypdf_warnings_counted() -> Iterator[_CountingHandler]:
    """Count pypdf's repair warnings instead of letting them through.

    pypdf logs one warning per unreadable object while it repairs a damaged file: a PDF cut in half
    produced about 2,900 lines, which would bury the one error the user needs to read.
    """
    pdf_logger = logging.getLogger("pypdf")
    handler = _CountingHandler()
    propagate = pdf_logger.propagate
    pdf_logger.addHandler(handler)
    pdf_logger.propagate = False
    try:
        yield handler
    finally:
        pdf_logger.removeHandler(handler)
        pdf_logger.propagate = propagate


def load_pdf(path: Path) -> list[Document]:
    from pypdf import PdfReader

    try:
        with _pypdf_warnings_counted() as repairs:
            reader = PdfReader(path)
            pages = [page.extract_text() or "" for page in reader.pages]
            info = reader.metadata or {}
    # A damaged PDF raises many exception types from pypdf and the codecs under it (PdfReadError,
    # zlib.error, KeyError, IndexError, RecursionError). Each of them means this file cannot be read.
    except Exception as err:  # noqa: BLE001
        raise CorpusError(f"{str(path)!r} is not a readable PDF ({err}); re-export it or remove it") from err
    if repairs.count:
        logger.warning("%s: pypdf repaired %d structural problems while reading it; check the extracted text "
                       "or re-export the PDF", path, repairs.count)
    sections = [Section(text=collapse_whitespace(text), page=number) for number, text in enumerate(pages, 1)]
    sections = [s for s in sections if s.text]
    if not sections:
        raise CorpusError(f"{str(path)!r} has no extractable text (a scanned PDF needs OCR first)")
    title = str(info.get("/Title") or "").strip() or path.stem.replace("_", " ")
    date = None
    raw_date = str(info.get("/ModDate") or info.get("/CreationDate") or "")
    if raw_date.startswith("D:") and len(raw_date) >= 10:
        # a malformed date in the PDF's metadata is no reason to drop its text
        with contextlib.suppress(CorpusError):
            date = normalize_date(raw_date[2:10], path)
    return [Document(doc_id=slug(path.stem), title=title, sections=sections, source=path.as_posix(), date=date)]


# XML: MedQuAD and FDA Structured Product Labeling

MEDQUAD_SPECIALTIES = {
    "CancerGov": "oncology",
    "NHLBI": "cardiology",
    "NIDDK": "endocrinology",
    "NINDS": "neurology",
    "CDC": "infectious_disease",
    "GARD": "genetics",
    "GHR": "genetics",
}
SPL_NS = "{urn:hl7-org:v3}"
# LOINC 42229-5 "SPL UNCLASSIFIED SECTION" labels a section that has no heading; it names nothing.
SPL_UNCLASSIFIED_CODE = "42229-5"


def _parse_xml(path: Path) -> Element:
    try:
        return SafeET.fromstring(path.read_bytes())
    # expat raises LookupError or ValueError for an unknown or unsupported declared encoding
    except (ParseError, DefusedXmlException, LookupError, ValueError) as err:
        raise CorpusError(f"{str(path)!r} is not well-formed XML ({err}); fix or remove the file") from err


def load_xml(path: Path) -> list[Document]:
    root = _parse_xml(path)
    if root.tag.lower() in {"document", "doc", "diseasefile"} and _child(root, "qapairs") is not None:
        return _medquad(root, path)
    if root.tag == SPL_NS + "document":
        return [_spl(root, path)]
    raise CorpusError(
        f"{str(path)!r} is XML of an unknown kind (root <{root.tag}>); bedside reads MedQuAD and FDA SPL XML"
    )


def _child(element: Element, *names: str) -> Element | None:
    """First direct child whose lower-cased tag is one of `names` (MedQuAD folders vary in case)."""
    return next((child for child in element if child.tag.lower() in names), None)


def _medquad(root: Element, path: Path) -> list[Document]:
    """One document per answered QA pair, titled by the focus; the question type names the section.

    Three schemas occur: <Document>/<QAPairs>/<QAPair>, <DiseaseFile> with the same children, and
    <doc>/<qaPairs>/<pair> with <doctitle-focus>. Question ids repeat across files (0000013_2.xml
    and 0000013_2_1.xml), so the document id is built from the file name and the pair number.
    """
    focus_node = _child(root, "focus", "doctitle-focus")
    focus = collapse_whitespace("".join(focus_node.itertext())) if focus_node is not None else ""
    source_name = root.get("source") or root.get("corpus") or ""
    url = root.get("url") or path.as_posix()
    documents = []
    for number, pair in enumerate(_child(root, "qapairs"), 1):
        question = _child(pair, "question")
        answer_node = _child(pair, "answer")
        answer = collapse_whitespace("".join(answer_node.itertext())) if answer_node is not None else ""
        if question is None or not answer:
            continue
        qtype = (question.get("qtype") or "information").strip()
        documents.append(Document(
            doc_id=f"medquad-{path.parent.name.split('_')[0]}-{path.stem}-{pair.get('pid', number)}",
            title=focus or path.stem,
            sections=[Section(text=answer, title=qtype)],
            source=url,
            specialty=MEDQUAD_SPECIALTIES.get(source_name),
            issuer=source_name or None,
            metadata={"question": collapse_whitespace(question.text or ""), "qtype": qtype,
                      "qid": question.get("qid", "")},
        ))
    return documents


def _spl_inline(element: Element) -> str:
    """Return an SPL element's text on one line, with `<br/>` as a space and a footnote in parentheses."""
    parts = [element.text or ""]
    for child in element:
        tag = child.tag.removeprefix(SPL_NS)
        if tag == "br":
            parts.append(" ")
        elif tag == "footnote":
            parts.append(f" ({_spl_inline(child)}) ")
        else:
            parts.append(_spl_inline(child))
        parts.append(child.tail or "")
    return " ".join("".join(parts).split())


def _spl_list(element: Element, depth: int = 0) -> list[str]:
    """Render each list item as a `- ` line, with a nested list indented under its item."""
    lines = []
    for item in element.findall(SPL_NS + "item"):
        nested = item.findall(SPL_NS + "list")
        for sublist in nested:
            item.remove(sublist)
        text = _spl_inline(item)
        if text:
            lines.append("  " * depth + "- " + text)
        for sublist in nested:
            lines.extend(_spl_list(sublist, depth + 1))
    return lines


def _spl_table(element: Element) -> list[str]:
    """Render a caption line, the table as Markdown (head rows, then body rows), then footer rows as notes."""
    def rows_of(*parts: str) -> list[Element]:
        return [tr for part in parts for group in element.findall(SPL_NS + part) for tr in group.findall(SPL_NS + "tr")]

    def cells(tr: Element) -> list[str]:
        return [_spl_inline(cell) for cell in tr if cell.tag in {SPL_NS + "td", SPL_NS + "th"}]

    lines = []
    caption = element.find(SPL_NS + "caption")
    if caption is not None and _spl_inline(caption):
        lines.append(_spl_inline(caption))
    rows = [cells(tr) for tr in rows_of("thead", "tbody") + element.findall(SPL_NS + "tr")]
    rows = [row for row in rows if any(row)]
    if rows:
        lines.append(markdown_table(rows))
    # a footer row spans the table with abbreviations and notes, which read better as prose
    lines += [note for tr in rows_of("tfoot") if (note := " ".join(c for c in cells(tr) if c))]
    return lines


def _spl_text(element: Element) -> str:
    """Text of an SPL <text> element: paragraphs and list items on their own lines, tables as Markdown."""
    parts: list[str] = []
    if element.text and element.text.strip():
        parts.append(" ".join(element.text.split()))
    for child in element:
        tag = child.tag.removeprefix(SPL_NS)
        if tag == "table":
            parts.extend(_spl_table(child))
        elif tag == "list":
            parts.extend(_spl_list(child))
        else:
            parts.append(_spl_inline(child))
        if child.tail and child.tail.strip():
            parts.append(" ".join(child.tail.split()))
    return "\n".join(p for p in parts if p.strip())


def _spl(root: Element, path: Path) -> Document:
    def title_of(element: Element) -> str:
        node = element.find(SPL_NS + "title")
        return " ".join("".join(node.itertext()).split()) if node is not None else ""

    sections: list[Section] = []

    def walk(section: Element, trail: list[str]) -> None:
        code = section.find(SPL_NS + "code")
        name = title_of(section)
        if not name and code is not None and code.get("code") != SPL_UNCLASSIFIED_CODE:
            name = code.get("displayName", "").title()
        here = trail + [name] if name else trail
        text_node = section.find(SPL_NS + "text")
        if text_node is not None:
            text = _spl_text(text_node)
            if text:
                sections.append(Section(text=text, title=" > ".join(here) or None))
        for component in section.findall(f"{SPL_NS}component/{SPL_NS}section"):
            walk(component, here)

    for top in root.iterfind(f".//{SPL_NS}structuredBody/{SPL_NS}component/{SPL_NS}section"):
        walk(top, [])
    if not sections:
        raise CorpusError(f"{str(path)!r} is an SPL label with no section text")

    product = root.find(f".//{SPL_NS}manufacturedProduct/{SPL_NS}manufacturedProduct/{SPL_NS}name")
    generic = root.find(f".//{SPL_NS}genericMedicine/{SPL_NS}name")
    names = [n.text.strip() for n in (product, generic) if n is not None and n.text and n.text.strip()]
    title = title_of(root)
    if names:
        # SPL document titles are long boilerplate ("These highlights do not include..."), so the
        # product and generic names make the citation readable.
        title = f"{names[0]} ({names[1]}) label" if len(names) > 1 else f"{names[0]} label"
    set_id = root.find(SPL_NS + "setId")
    doc_id = "spl-" + (set_id.get("root") if set_id is not None and set_id.get("root") else slug(path.stem))
    version = root.find(SPL_NS + "versionNumber")
    effective = root.find(SPL_NS + "effectiveTime")
    author = root.find(f".//{SPL_NS}representedOrganization/{SPL_NS}name")
    return Document(
        doc_id=doc_id,
        title=title or path.stem,
        sections=sections,
        source=path.as_posix(),
        date=normalize_date(effective.get("value"), path) if effective is not None else None,
        issuer=author.text.strip() if author is not None and author.text else None,
        version=version.get("value") if version is not None else None,
        specialty="pharmacology",
    )


# JSONL

def iter_jsonl(path: Path) -> Iterable[tuple[int, dict | None, str | None]]:
    """Yield (line number, object or None, problem or None) for each non-blank line."""
    for number, line in enumerate(jsonl_lines(read_utf8(path)), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, None, f"invalid JSON ({err.msg})"
            continue
        except RecursionError:
            # the json module recurses once per nesting level and gives up near 1,000
            yield number, None, "invalid JSON (nested too deeply)"
            continue
        if not isinstance(value, dict):
            yield number, None, "expected a JSON object"
            continue
        yield number, value, None


def _optional_str(value: object) -> str | None:
    return str(value).strip() or None if value is not None else None


def load_jsonl(path: Path, problems: list[tuple[str, str]] | None = None) -> list[Document]:
    """Read `{"id", "title", "text", "source", "date"?, "specialty"?}` lines.

    A bad line is skipped and logged. With `problems` given, it is also appended there as
    ("FILE:LINE", reason). A file without one valid line raises `CorpusError`.
    """
    documents, skipped = [], []
    for number, record, problem in iter_jsonl(path):
        if record is not None:
            missing = [key for key in ("id", "title", "text", "source") if not str(record.get(key) or "").strip()]
            if missing:
                problem = f"missing field(s) {', '.join(missing)}"
        if not problem:
            try:
                date = normalize_date(record.get("date"), f"{path}:{number}")
            except CorpusError as err:
                problem = str(err)
        if problem:
            skipped.append((number, problem))
            continue
        documents.append(Document(
            doc_id=str(record["id"]).strip(),
            title=str(record["title"]).strip(),
            sections=[Section(text=str(record["text"]).strip(), title=_optional_str(record.get("section")))],
            source=str(record["source"]).strip(),
            date=date,
            specialty=_optional_str(record.get("specialty")),
            issuer=_optional_str(record.get("issuer")),
            version=_optional_str(record.get("version")),
        ))
    if not documents:
        detail = "; ".join(f"line {number}: {problem}" for number, problem in skipped[:3]) or "no lines"
        raise CorpusError(f"{str(path)!r} has no valid document lines ({detail})")
    for number, problem in skipped:
        logger.warning("%s: skipped line %d: %s", path, number, problem)
        if problems is not None:
            problems.append((f"{path}:{number}", problem))
    return documents


LOADERS: dict[str, Loader] = {
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".txt": load_text,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
    ".xml": load_xml,
    ".jsonl": load_jsonl,
}

# Files that describe a folder rather than belong to its corpus, such as MedQuAD's LICENSE.txt and
# UPSTREAM_README.txt. A folder walk skips them, but a file named on its own is still loaded.
_NOT_CORPUS = re.compile(r"^(.*[_.-])?(readme|licen[cs]e|notice|copying|changelog|authors)$", re.IGNORECASE)


def load_file(path: Path, problems: list[tuple[str, str]] | None = None) -> list[Document]:
    """Load one file with the loader for its suffix.

    `problems` collects the parts of a file a loader skipped (bad JSONL lines); a file that cannot be
    read at all raises `CorpusError`.
    """
    path = Path(path)
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise CorpusError(
            f"{str(path)!r} has unsupported type {path.suffix or '(none)'!r}; supported: {', '.join(sorted(LOADERS))}"
        )
    if not path.is_file():
        raise CorpusError(f"{str(path)!r} not found")
    try:
        if problems is not None and "problems" in inspect.signature(loader).parameters:
            return loader(path, problems=problems)
        return loader(path)
    except OSError as err:
        raise CorpusError(f"{str(path)!r} cannot be read ({err.strerror or err}); check its permissions") from err


def _corpus_files(paths: Iterable[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """List the corpus files under `paths` once each, in order of first mention.

    The same file reached twice (a folder given twice, or a folder and a file inside it, under any
    spelling of the path) is loaded once, so ingesting a folder twice yields the same chunks as once.
    """
    files, problems = [], []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        resolved = path.resolve()
        if resolved in seen:
            logger.debug("skipping %s: already listed", path)
            return
        seen.add(resolved)
        files.append(path)

    for root in paths:
        root = Path(root)
        if root.is_file():
            add(root)
        elif root.is_dir():
            for path in sorted(root.rglob("*")):
                hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
                if hidden or not path.is_file():
                    continue
                if _NOT_CORPUS.match(path.stem):
                    logger.debug("skipping %s: describes the folder, not a corpus document", path)
                elif path.suffix.lower() in LOADERS:
                    add(path)
                else:
                    logger.debug("skipping %s: unsupported type", path)
        else:
            problems.append((str(root), "not found; pass an existing file or folder to --corpus"))
    return files, problems


def load_corpus(paths: Iterable[Path], progress: bool = False) -> LoadReport:
    """Load every supported file under `paths`; bad files and lines are reported in `problems` and skipped."""
    files, problems = _corpus_files(paths)
    report = LoadReport(problems=problems, files=len(files))
    seen: dict[str, str] = {}
    for path in tqdm(files, desc="loading", unit="file", disable=not progress):
        try:
            documents = load_file(path, report.problems)
        except CorpusError as err:
            report.problems.append((str(path), str(err)))
            logger.warning("skipped %s", err)
            continue
        for document in documents:
            if document.doc_id in seen:
                report.problems.append(
                    (str(path), f"document id {document.doc_id!r} is also used by {seen[document.doc_id]!r}; "
                                "give each document a unique `id` in its front matter")
                )
                continue
            seen[document.doc_id] = str(path)
            report.documents.append(document)
    return report
