"""The querying examples run as doctests, on the changes of the Bemi documentation's example.

They live in two places: the README's "Querying changes" section (a quick
start) and the "Examples" section of docs/querying.md (every helper). The
blocks run in that order, sharing their names, like one session.
"""

import datetime as dt
import doctest
import re
from pathlib import Path

import pytest

from tests.queryapp.models import Todo

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
QUERYING = ROOT / "docs" / "querying.md"


def readme_section(name: str) -> str:
    text = README.read_text()
    start = text.index(f"<!-- section: {name} -->")
    end = text.find("<!-- section:", start + 1)
    return text[start:end if end != -1 else None]


def markdown_section(path: Path, heading: str) -> str:
    """From ``heading`` (a ``## `` line) to the next heading of the same level."""
    text = path.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def pycon_blocks(text: str) -> list[str]:
    return re.findall(r"```pycon\n(.*?)```", text, re.S)


def example_blocks() -> list[tuple[str, str]]:
    """``(where, block)`` for every example, in the order they run."""
    return [
        *((f"README.md querying block {n}", b) for n, b in enumerate(pycon_blocks(readme_section("querying")), 1)),
        *((f"docs/querying.md example {n}", b)
          for n, b in enumerate(pycon_blocks(markdown_section(QUERYING, "## Examples")), 1)),
    ]


@pytest.fixture
def docs_example_changes(recorder):
    """The psql output of the Bemi documentation's example, as the worker would have written it."""
    at = lambda second: dt.datetime(2023, 12, 11, 17, 9, second, tzinfo=dt.timezone.utc)  # noqa: E731
    post = {"user_id": 187234, "endpoint": "/todo", "method": "POST", "SQL": "INSERT INTO ..."}
    for pk, task, second in [(26, "Sleep", 9), (27, "Eat", 11), (28, "Repeat", 13)]:
        with recorder.track(Todo, pk, post, at=at(second)):
            Todo.objects.create(id=pk, task=task)
    with recorder.track(Todo, 26, {"user_id": 187234, "endpoint": "/todo/complete", "method": "PUT", "SQL": "UPDATE ..."}, at=at(15)):
        Todo.objects.filter(id=26).update(is_completed=True)
    with recorder.track(Todo, 27, {"user_id": 187234, "endpoint": "/todo/27", "method": "DELETE", "SQL": "DELETE FROM ..."}, at=at(18)):
        Todo.objects.filter(id=27).delete()


def test_the_readme_has_a_quick_start_example_and_links_to_the_others():
    section = readme_section("querying")
    assert len(pycon_blocks(section)) >= 1
    assert "docs/querying.md#examples" in section


def test_there_is_an_example_of_every_helper():
    examples = "".join(block for _where, block in example_blocks())
    for helper in ["bemi_changes()", "bemi_changes('task')", ".diff()", "field_changed(", ".before(", ".before_not(",
                   ".after(", ".after_not(", ".context(", ".context_not(", ".created()", ".updated()", ".deleted()",
                   ".asc()", ".desc()", "bemi_as_of(", "objects.as_of(", "bemi_history(", ".revert()", "revert(force=True)"]:
        assert helper in examples, helper
    assert "![The History page of a Todo](admin-history.png)" in (ROOT / "docs" / "admin.md").read_text()
    assert (ROOT / "docs" / "admin-history.png").read_bytes()[:4] == b"\x89PNG"


def test_the_examples_run(docs_example_changes):
    blocks = example_blocks()
    assert len(blocks) >= 5
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = {"Todo": Todo}
    report: list[str] = []
    for where, block in blocks:
        test = parser.get_doctest(block, globs, where, where.split()[0], 0)
        runner.run(test, out=report.append, clear_globs=False)
        globs.update(test.globs)  # DocTest copies its globals: carry names to the next block
    assert runner.failures == 0, "".join(report)
    assert runner.tries >= 30
