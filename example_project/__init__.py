"""The example Todo project (a Django project of its own: run ``manage.py`` from this folder).

Being a package too lets ``python -m example_project.demo`` run the one-command demo.
"""
