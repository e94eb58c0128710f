"""Position scaling for one request: `position` in (patches/rope.py's PositionSpec); no response fields.

The engine checks that it can serve the spec (server/engine/native/positions.py;
the vLLM engine refuses what its server-wide setting cannot give).
"""

from __future__ import annotations

from longserve.server.errors import APIError
from longserve.server.extensions import Extension


class Position(Extension):
    def __init__(self, body, state):
        self.spec = body.position

    async def prepare(self, request, state) -> None:
        try:
            state.engine.check_position(self.spec)
        except ValueError as exc:
            raise APIError(400, str(exc), "position" + (f".{exc.field}" if hasattr(exc, "field") else "")) from None
        request.position = self.spec
