"""``python manage.py bemi_grants --app-role APP --worker-role WORKER [--print]``: the least-privilege set-up.

Run once by a superuser, before or after the worker's first start (docs/security.md).
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import router

from bemi import conf
from bemi.grants import grant_statements, source_statements, tracked_schemas
from bemi.management.commands.bemi_prune import connect
from bemi.tables import SCHEMA
from bemi.tracking import TrackingError


class Command(BaseCommand):
    help = (f"Least privilege for the audit trail, run once by a superuser: schema {SCHEMA} and every table of "
            "bemi (changes, its partitions, the worker's tables; moved there from schema public when an earlier "
            "version made them) belong to the worker's role; the application's role may only read changes; the "
            "worker's role gets REPLICATION and loses any membership in the application's role. Print the SQL "
            "with --print. See docs/security.md.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--app-role", required=True, help="the role the Django application connects as")
        parser.add_argument("--worker-role", required=True, help="the role the worker connects as")
        parser.add_argument("--print", action="store_true", dest="print_only",
                            help="print the SQL instead of running it")
        parser.add_argument("--database", default=None,
                            help="alias of the database holding changes (default: where BemiChange is written)")
        parser.add_argument("--source-database", default="default",
                            help="alias of the tracked database (default: default)")
        parser.add_argument("--publication", default="bemi", help="the worker's publication (default: bemi)")

    def handle(self, *args, **options) -> None:
        from bemi.models import BemiChange

        app_role, worker_role = options["app_role"], options["worker_role"]
        if app_role == worker_role:
            raise CommandError("--app-role and --worker-role must differ: the owner of a table can always rewrite it")
        alias = options["database"] or router.db_for_write(BemiChange) or "default"
        source_alias = options["source_database"]
        try:
            schemas = conf.tracking().sql_rules()["schemas"]
        except TrackingError as exc:
            raise CommandError(str(exc)) from exc
        plans = []
        # Only DDL and the catalog (and, as a superuser, the one row of public._bemi_tracking): no code of
        # another role runs.
        with connect(source_alias, check_owners=False) as source:
            plans.append((source, source_statements(source.cursor(), app_role, worker_role, options["publication"],
                                                    tracked_schemas(source.cursor(), schemas))))
            if alias == source_alias:
                plans[0][1].merge(grant_statements(source.cursor(), app_role, worker_role))
                self._run(plans, options["print_only"])
            else:
                with connect(alias, check_owners=False) as destination:
                    plans.append((destination, grant_statements(destination.cursor(), app_role, worker_role)))
                    self._run(plans, options["print_only"])
        if options["print_only"]:
            return
        plan = plans[-1][1]
        for _conn, each in plans:
            for note in each.notes:
                self.stdout.write(note)
        self.stdout.write(f"{app_role} may now only read changes; {worker_role} owns schema {SCHEMA} and its "
                          f"{len(plan.tables)} tables. Partitions the worker creates later belong to it too and "
                          "grant the application nothing: it reads them through changes.")

    def _run(self, plans: list, print_only: bool) -> None:
        refused = [r for _conn, plan in plans for r in plan.refused]
        if refused:
            raise CommandError("nothing done; first: " + "; ".join(refused))
        if print_only:
            for conn, plan in plans:
                self.stdout.write(f"-- database {conn.info.dbname}")
                for statement in plan.statements:
                    self.stdout.write(statement.as_string(conn) + ";")
            return
        for conn, _plan in plans:
            superuser = conn.execute("SELECT rolsuper FROM pg_catalog.pg_roles "
                                     "WHERE rolname OPERATOR(pg_catalog.=) CURRENT_USER").fetchone()
            if not (superuser and superuser[0]):
                raise CommandError(f"run it as a superuser (role {conn.info.user!r} is not), or print the SQL with "
                                   "--print and have one run it")
        for conn, plan in plans:  # the destination last: a failure leaves the source's part done, never half
            with conn.transaction():
                for statement in plan.statements:
                    conn.execute(statement)
