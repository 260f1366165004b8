"""Recorded numbers come back exact: ORM writes -> the worker -> BemiChange, time travel, revert, admin, redact.

A ``numeric(30,2)`` holding ``12345678901234567.80`` is stored by the worker
with every digit; read as a float it would be ``1.2345678901234568e+16``, and
``1.20`` would be ``1.2``. Integers stay ``int``.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.test import override_settings

import bemi
from bemi import exactjson
from bemi import tracking as tr
from bemi.admin import diff_table
from bemi.models import BemiChange
from tests.queryapp.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)

BIG = Decimal("12345678901234567.80")
BIG_COUNT = 2**62 + 1  # more digits than a float holds


def drain(env) -> None:
    call_command("bemi_worker", "--once", "--slot", env.slot, "--publication", env.publication, verbosity=0)


@pytest.fixture
def ledger(worker_env):
    """A ledger row created with a big balance and updated to 1.20, both recorded by the worker."""
    drain(worker_env)
    row = Ledger.objects.create(balance=BIG, rate=0.1, count=BIG_COUNT, data={"fee": 1.5, "n": 3, "s": "x"})
    with bemi.context(step="pay"):
        Ledger.objects.filter(pk=row.pk).update(balance=Decimal("1.20"))
    drain(worker_env)
    return row


def test_before_after_and_diff_are_exact_decimals(ledger):
    created, updated = BemiChange.objects.record(Ledger, ledger.pk)
    assert created.after["balance"] == BIG and str(created.after["balance"]) == "12345678901234567.80"
    assert type(created.after["id"]) is int and created.after["count"] == BIG_COUNT and type(created.after["count"]) is int
    assert str(updated.before["balance"]) == "12345678901234567.80" and str(updated.after["balance"]) == "1.20"
    diff = updated.diff()
    assert list(diff) == ["balance"]
    assert [str(v) for v in diff["balance"]] == ["12345678901234567.80", "1.20"]
    assert all(type(v) is Decimal for v in diff["balance"])
    # the same through values() and a key transform
    assert BemiChange.objects.filter(pk=created.pk).values_list("after__balance", flat=True).get() == BIG
    # and a jsonb number inside a json column keeps its digits too
    assert created.after["data"] == {"fee": Decimal("1.5"), "n": 3, "s": "x"}


def test_filters_take_decimals_and_compare_them_exactly(ledger):
    changes = BemiChange.objects.record(Ledger, ledger.pk)
    assert [c.operation for c in changes.after({"balance": BIG})] == ["CREATE"]
    assert [c.operation for c in changes.before({"balance": BIG})] == ["UPDATE"]
    # jsonb compares numbers as numbers: 1.2 is 1.20; one cent more is another value (a float could not tell)
    assert [c.operation for c in changes.after({"balance": Decimal("1.2")})] == ["UPDATE"]
    assert not changes.after({"balance": Decimal("12345678901234567.81")}).exists()
    assert [c.operation for c in changes.after_not({"balance": BIG})] == ["UPDATE"]
    assert [c.operation for c in changes.filter(after__balance=Decimal("1.20"))] == ["UPDATE"]
    assert [c.operation for c in changes.after({"count": BIG_COUNT})] == ["CREATE", "UPDATE"]
    assert not changes.after({"count": BIG_COUNT - 1}).exists()


def test_as_of_gives_each_field_its_own_python_type(ledger):
    created = BemiChange.objects.record(Ledger, ledger.pk).created().get()
    old = ledger.bemi_as_of(created.committed_at)
    fresh = Ledger.objects.get(pk=ledger.pk)
    assert type(old) is Ledger
    assert old.balance == BIG and str(old.balance) == "12345678901234567.80"
    assert type(old.rate) is float and old.rate == 0.1
    assert type(old.count) is int and old.count == BIG_COUNT
    # a JSONField gets what Django loads from the column (its own decoder: floats), not Decimals
    assert old.data == fresh.data == {"fee": 1.5, "n": 3, "s": "x"} and type(old.data["fee"]) is float
    as_dict = BemiChange.objects.as_of("queryapp_ledger", ledger.pk, created.committed_at)
    assert str(as_dict["balance"]) == "12345678901234567.80"
    versions = [v.record.balance for v in Ledger.bemi_history(ledger.pk)]
    assert [str(b) for b in versions] == ["12345678901234567.80", "1.20"]


def test_revert_restores_the_exact_value(ledger, worker_env):
    BemiChange.objects.context({"step": "pay"}).revert()
    assert Ledger.objects.get(pk=ledger.pk).balance == BIG  # a float would write back 12345678901234568.00
    drain(worker_env)
    undo = BemiChange.objects.record(Ledger, ledger.pk).filter(context__has_key="bemi_revert").get()
    assert [str(v) for v in undo.diff()["balance"]] == ["1.20", "12345678901234567.80"]
    # the revert checks the row is as the change left it: with the exact value it is, so no force is needed
    with bemi.context(step="again"):
        Ledger.objects.filter(pk=ledger.pk).update(balance=Decimal("0.10"))
    drain(worker_env)
    BemiChange.objects.context({"step": "again"}).revert()
    assert Ledger.objects.get(pk=ledger.pk).balance == BIG


def test_admin_shows_the_recorded_digits(ledger):
    updated = BemiChange.objects.record(Ledger, ledger.pk).updated().get()
    html = str(diff_table(updated))
    assert "12345678901234567.80" in html and "1.20" in html and "1.2345678901234568e+16" not in html
    created = BemiChange.objects.record(Ledger, ledger.pk).created().get()
    assert 'fee' not in str(diff_table(updated)) and "1.5" in str(diff_table(created))


def test_bemi_redact_keeps_the_digits_it_does_not_mask_and_masks_numbers_as_the_worker(ledger, worker_env):
    master = tr.derive_key("bemi-tests")  # tests.settings.SECRET_KEY
    count_key = tr.column_key(master, "public", "queryapp_ledger", "count")
    key = tr.column_key(master, "public", "queryapp_ledger", "balance")
    with override_settings(BEMI_MASKED_COLUMNS=["queryapp_ledger.count"]):
        call_command("bemi_redact", verbosity=0)
    stored = worker_env.execute(
        "SELECT after->>'balance', after->>'count' FROM changes WHERE \"table\" = 'queryapp_ledger' "
        "ORDER BY commit_position")
    assert [balance for balance, _ in stored] == ["12345678901234567.80", "1.20"]
    assert {count for _, count in stored} == {tr.mask_json_value(count_key, BIG_COUNT)}
    # a masked numeric gets the digest of its text, as the worker digests what pgoutput sends (not of 1.2)
    with override_settings(BEMI_MASKED_COLUMNS=["queryapp_ledger.count", "queryapp_ledger.balance"]):
        call_command("bemi_redact", verbosity=0)
    stored = worker_env.execute(
        "SELECT after->>'balance' FROM changes WHERE \"table\" = 'queryapp_ledger' ORDER BY commit_position")
    assert [b for (b,) in stored] == [json.loads(tr.mask_text(key, b"12345678901234567.80")),
                                      json.loads(tr.mask_text(key, b"1.20"))]


def test_exact_json_round_trip():
    text = '{"a": 12345678901234567.80, "b": [1.20, 1e-7, -0.0, 7], "c": {"d": 2.50}, "e": null, "f": true}'
    value = exactjson.loads(text)
    assert value["a"] == BIG and type(value["b"][3]) is int and value["f"] is True
    assert json.loads(exactjson.dumps(value)) == json.loads(text)
    assert exactjson.dumps(value) == (
        '{"a": 12345678901234567.80, "b": [1.20, 0.0000001, -0.0, 7], "c": {"d": 2.50}, "e": null, "f": true}')
    assert exactjson.dumps({"x": Decimal("NaN"), "y": Decimal("-Infinity")}) == '{"x": "NaN", "y": "-Infinity"}'
    assert exactjson.dumps({"x": 1.5}) == json.dumps({"x": 1.5})
