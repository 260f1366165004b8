"""The README's "Querying changes" examples run as doctests, on the changes of the Bemi documentation's example."""

import datetime as dt
import doctest
import re
from pathlib import Path

import pytest

from tests.queryapp.models import Todo

README = Path(__file__).resolve().parent.parent / "README.md"


def section(name: str) -> str:
    text = README.read_text()
    start = text.index(f"<!-- section: {name} -->")
    end = text.find("<!-- section:", start + 1)
    return text[start:end if end != -1 else None]


def pycon_blocks(text: str) -> list[str]:
    return re.findall(r"```pycon\n(.*?)```", text, re.S)


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


def test_readme_has_an_example_of_every_helper():
    examples = "".join(pycon_blocks(section("querying")))
    for helper in ["bemi_changes()", "bemi_changes('task')", ".diff()", "field_changed(", ".before(", ".before_not(",
                   ".after(", ".after_not(", ".context(", ".context_not(", ".created()", ".updated()", ".deleted()",
                   ".asc()", ".desc()", "bemi_as_of(", "objects.as_of(", "bemi_history(", ".revert()", "revert(force=True)"]:
        assert helper in examples, helper
    assert "![The History page of a Todo in the Django admin](docs/admin-history.png)" in section("querying")
    assert (README.parent / "docs" / "admin-history.png").read_bytes()[:4] == b"\x89PNG"


def test_readme_examples_run(docs_example_changes):
    blocks = pycon_blocks(section("querying"))
    assert len(blocks) >= 4
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = {"Todo": Todo}
    report: list[str] = []
    for number, block in enumerate(blocks, 1):
        test = parser.get_doctest(block, globs, f"README querying block {number}", str(README), 0)
        runner.run(test, out=report.append, clear_globs=False)
        globs.update(test.globs)  # DocTest copies its globals: carry names to the next block
    assert runner.failures == 0, "".join(report)
    assert runner.tries >= 30
