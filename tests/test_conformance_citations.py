"""Every ``PROTOCOL.md §N Lxx`` a conformance case cites points at docs/PROTOCOL.md: the
lines exist, lie inside section N, and are not blank; a ``§N row NAME`` names a table row of
section N. So the citations cannot drift from the document again (they once followed the
shared spec's numbering, ~50 lines off from §2 on)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conformance import cases as catalogue

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
README = Path(__file__).resolve().parents[1] / "README.md"


def sections(lines: list[str]) -> dict[int, tuple[int, int]]:
    """``§N`` -> (first, last) line numbers (1-based) of the section, heading included."""
    starts = [
        (int(m.group(1)), i + 1)
        for i, line in enumerate(lines)
        if (m := re.match(r"## (\d+)\. ", line))
    ]
    out = {}
    for k, (num, first) in enumerate(starts):
        last = starts[k + 1][1] - 1 if k + 1 < len(starts) else len(lines)
        out[num] = (first, last)
    return out


def citations(spec: str) -> list[tuple[int, str]]:
    """The ``(section, what)`` pairs of docs/PROTOCOL.md a case's ``spec`` cites, ``what``
    being ``Lx``, ``Lx-y``, or ``row NAME``. The PROTOCOL.md part is the first ``;``-group
    that starts with ``PROTOCOL.md`` and the groups after it that start with ``§`` (a
    ``ref §`` group cites another document); parenthesised remarks are not citations."""
    out: list[tuple[int, str]] = []
    inside = False
    for group in spec.split(";"):
        group = group.strip()
        if group.startswith("PROTOCOL.md"):
            inside, group = True, group[len("PROTOCOL.md") :]
        elif not (inside and group.startswith("§")):
            inside = False
            continue
        group = re.sub(r"\([^)]*\)?", "", group)
        section = None
        for tok in re.finditer(r"§(\d+)|\bL(\d+(?:-\d+)?)|\brows? ([\w, ]+)", group):
            if tok.group(1):
                section = int(tok.group(1))
                continue
            assert section is not None, f"a citation before any §: {spec!r}"
            if tok.group(2):
                out.append((section, "L" + tok.group(2)))
            else:
                out += [(section, f"row {n.strip()}") for n in tok.group(3).split(",") if n.strip()]
    return out


def check(spec: str, lines: list[str]) -> list[str]:
    """What is wrong with ``spec``'s docs/PROTOCOL.md citations ([] when nothing)."""
    secs = sections(lines)
    problems = []
    for section, what in citations(spec):
        if section not in secs:
            problems.append(f"§{section} is not a section of docs/PROTOCOL.md")
            continue
        first, last = secs[section]
        if what.startswith("row "):
            name = what[4:]
            rows = [
                ln
                for ln in lines[first - 1 : last]
                if re.match(rf"\|[^|]*\| (ERROR_)?{name} \|", ln)
            ]
            if not rows:
                problems.append(f"§{section} has no table row {name}")
            continue
        a, _, b = what[1:].partition("-")
        lo, hi = int(a), int(b or a)
        if not (first < lo <= hi <= last):
            problems.append(f"{what} is not inside §{section} (lines {first + 1}-{last})")
            continue
        blank = [n for n in range(lo, hi + 1) if not lines[n - 1].strip()]
        if blank:
            problems.append(f"{what} of §{section}: line(s) {blank} are blank")
    return problems


def test_parser_reads_every_form() -> None:
    assert citations("PROTOCOL.md §2 L34, L57-58; ref §5.3") == [(2, "L34"), (2, "L57-58")]
    assert citations(
        "PROTOCOL.md §1 L26-28, §4 row ERROR_PPN_INVALID; vhost-user ADD_MEM_REG (ref §1.5)"
    ) == [(1, "L26-28"), (4, "row ERROR_PPN_INVALID")]
    assert citations("PROTOCOL.md §3 L117-118; §4 rows SUCCESS, PPN_LOCKED; §2 L51") == [
        (3, "L117-118"), (4, "row SUCCESS"), (4, "row PPN_LOCKED"), (2, "L51"),
    ]  # fmt: skip
    assert citations("PROTOCOL.md §4 L139 (2 MiB PFN not 512-aligned, L1), L151") == [
        (4, "L139"), (4, "L151"),
    ]  # fmt: skip
    assert citations("vhost-user 'Header'; ref §1.2") == []


#: citations that must be refused, with the problem reported
BAD = [
    ("PROTOCOL.md §3 L79-80", "not inside §3"),  # the shared spec's numbering
    ("PROTOCOL.md §2 L58-59; §6 L1", "not inside §6"),
    ("PROTOCOL.md §9 L1", "not a section"),
    ("PROTOCOL.md §2 L59", "blank"),
    ("PROTOCOL.md §4 row ERROR_NOPE", "no table row"),
    ("PROTOCOL.md §3 row ERROR_PPN_INVALID", "no table row"),  # a row of §4, not §3
]


@pytest.mark.parametrize(("spec", "problem"), BAD)
def test_bad_citations_are_caught(spec: str, problem: str) -> None:
    found = check(spec, DOC.read_text().splitlines())
    assert any(problem in p for p in found), found


def test_every_case_cites_lines_of_docs_protocol_inside_the_section() -> None:
    lines = DOC.read_text().splitlines()
    cited = 0
    problems = []
    for c in catalogue.CASES:
        cited += len(citations(c.spec))
        problems += [f"{c.name} ({c.spec!r}): {p}" for p in check(c.spec, lines)]
    assert not problems, "\n".join(problems)
    assert cited >= 50  # the parser found them (a parser that reads nothing checks nothing)


def test_readme_example_table_cites_the_same_lines() -> None:
    """The README's sample of the harness table shows the catalogue's citations."""
    text = README.read_text()
    shown = re.findall(r"│ (ring\.[\w-]+) +│ \w+ +│ (PROTOCOL\.md [^│]*?) +│", text)
    assert shown
    specs = {c.name: c.spec for c in catalogue.CASES}
    for name, spec in shown:
        assert specs[name].startswith(spec), (name, spec)
