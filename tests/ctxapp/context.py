"""The BEMI_CONTEXT_FUNCTION of the test project."""


def get_bemi_context(request):
    user = getattr(request, "user", None)
    return {
        "user_id": getattr(user, "id", None),
        "method": request.method,
        "path": request.path,
    }
