"""Models used by the tests of this area (no migrations: created by syncdb)."""
