"""Views of this test area."""

urlpatterns: list = []
