"""``python manage.py bemi_grants --app-role APP [--worker-role WORKER] [--print]``: append-only ``changes``."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import router

from bemi.grants import bemi_tables, grant_statements
from bemi.management.commands.bemi_prune import connect


class Command(BaseCommand):
    help = ("Make changes append-only for the application: the worker's role owns changes, its partitions and "
            "bemi's bookkeeping tables; the application's role may only SELECT changes (no UPDATE, DELETE, "
            "TRUNCATE). Run it as a superuser or the tables' owner, or print the SQL with --print. "
            "See docs/retention.md.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--app-role", required=True, help="the role the Django application connects as")
        parser.add_argument("--worker-role", default=None,
                            help="the role the worker connects as: made owner of bemi's tables (default: unchanged)")
        parser.add_argument("--print", action="store_true", dest="print_only",
                            help="print the SQL instead of running it")
        parser.add_argument("--database", default=None,
                            help="alias of the database holding changes (default: where BemiChange is written)")

    def handle(self, *args, **options) -> None:
        from bemi.models import BemiChange

        if options["app_role"] == options["worker_role"]:
            raise CommandError("--app-role and --worker-role must differ: the owner of a table can always rewrite it")
        alias = options["database"] or router.db_for_write(BemiChange) or "default"
        with connect(alias, check_owners=False) as conn:  # only DDL: no code of the tables' owners runs
            tables = bemi_tables(conn.cursor())
            if "changes" not in tables:
                raise CommandError("there is no table public.changes yet: start the worker once first")
            statements = grant_statements(tables, options["app_role"], options["worker_role"])
            if options["print_only"]:
                for statement in statements:
                    self.stdout.write(statement.as_string(conn) + ";")
                return
            with conn.transaction():
                for statement in statements:
                    conn.execute(statement)
        self.stdout.write(f"{options['app_role']} may now only read changes ({len(tables)} tables)")
        self.stdout.write("Partitions the worker creates later belong to the worker's role and grant the "
                          "application nothing: it reads them through changes.")
