"""The one exception services raise for a refused request (views show it, the API answers it as JSON)."""


class ServiceError(Exception):
    """A refused request. ``status`` is the HTTP status the API answers with; ``field`` names the bad input."""

    def __init__(self, message, *, status=400, field=None, details=None):
        super().__init__(message)
        self.status = status
        self.field = field
        self.details = details  # extra JSON for the API (e.g. a dataset's line-numbered errors)
