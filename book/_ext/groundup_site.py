"""Sphinx extension of the book: one citation style in the text and in the bibliography.

The text cites author-year (``bibtex_reference_style: author_year``: "[Ho et al., 2020]"); this
registers the pybtex style ``groundup``, whose bibliography labels are the same author-year text (not
alpha labels such as "[HJA20]"), sorted by author and year, and which links every arXiv identifier
(``eprint`` with ``archivePrefix = {arXiv}``) to its abstract page.
"""

from __future__ import annotations

from collections import Counter

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle


def _last_names(entry) -> list[str]:
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    return [" ".join(p.last_names).replace("{", "").replace("}", "") for p in persons]


class AuthorYearLabelStyle(BaseLabelStyle):
    """"Ho et al., 2020", "Kingma and Ba, 2015", "Elman, 1990"; "2017a"/"2017b" where two would be equal."""

    def format_label(self, entry) -> str:
        names = _last_names(entry)
        if not names:
            key = entry.fields.get("key") or entry.fields.get("organization") or entry.key
            who = str(key).replace("{", "").replace("}", "")
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        year = entry.fields.get("year", "")
        return f"{who}, {year}" if year else who

    def format_labels(self, sorted_entries):
        labels = [self.format_label(entry) for entry in sorted_entries]
        count, seen = Counter(labels), Counter()
        for label in labels:
            if count[label] == 1:
                yield label
            else:
                yield label + chr(ord("a") + seen[label])
                seen[label] += 1


class GroundUpStyle(UnsrtStyle):
    default_label_style = "groundup_author_year"
    default_sorting_style = "author_year_title"


def setup(app):
    register_plugin("pybtex.style.labels", "groundup_author_year", AuthorYearLabelStyle)
    register_plugin("pybtex.style.formatting", "groundup", GroundUpStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
