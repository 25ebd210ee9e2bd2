"""The harness's one error: model args or task settings that cannot work."""
from ..errors import UserError


class HarnessError(UserError, ValueError):
    """Model args or task settings that cannot work; the message says what to change."""
