"""The BEMI_CONTEXT_FUNCTION of the test project."""


def get_bemi_context(request):
    user = getattr(request, "user", None)
    return {
        "user_id": getattr(user, "id", None),
        "method": request.method,
        "path": request.path,
    }


def raising_context(request):
    raise ValueError("the context function failed")


def list_context(request):
    return ["not", "a", "dict"]


def none_context(request):
    return None


not_callable = 42


def writing_context(request):
    """A context function that itself writes (through the same connection)."""
    from tests.ctxapp.models import Tag

    Tag.objects.get_or_create(name=f"seen {request.path}")
    return {"path": request.path, "from_function": True}
