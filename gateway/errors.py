"""The gateway's exceptions, the TikTok codes they answer with, and how they are counted.

    GatewayError
    ├── ConfigError            bad configuration; stops start-up with one line
    │   └── LayoutMismatch     this Redis holds state laid out with other shards or buckets
    ├── RequestError           the client's fault; answered in TikTok's envelope
    │   ├── InvalidRequest     malformed body or field (names the field)
    │   │   ├── InvalidEvent   one event of a request is malformed
    │   │   └── InvalidJSON    the body is not JSON: empty, not UTF-8, unparseable, too deep
    │   ├── AuthError          missing or wrong Access-Token
    │   │   └── UnknownPixel   a pixel code that is not configured
    │   ├── PayloadTooLarge    body over the size limit
    │   ├── BodyTimeout        body not received in time (a slow-loris trickle)
    │   ├── OriginNotAllowed   browser request from an origin not configured
    │   ├── NotFound           no such endpoint, or debug is off
    │   ├── RateLimited        a client sent too much
    │   └── RelayRefused       a pass-through request not relayed to TikTok (`outcome` says why)
    │       ├── PathNotCanonical   400: dot segment, encoded / \\ . or %, empty segment, ...
    │       ├── NotOurCaller       401: Access-Token missing or no configured pixel's token
    │       └── PathNotRelayed     404: not under GATEWAY_PASSTHROUGH_PATHS
    └── StoreUnavailable       Redis cannot be reached; nothing was acknowledged

Handlers raise these; one middleware (`answers.error_middleware`) turns them into
responses. TikTok answers errors on its own paths as HTTP 200 with a non-zero
`code`, and so do we where a client of TikTok expects it (`tiktok_status`).
Each class's `reason` is its `gateway_events_rejected_total` label (None: not
counted there); a refused pass-through request is counted by its `outcome`.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration variable is missing or malformed."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class LayoutMismatch(ConfigError):
    """This Redis holds state laid out with other shards or dedup buckets than ours."""

    def __init__(self, recorded: str, ours: str) -> None:
        super().__init__(
            "GATEWAY_SHARDS / GATEWAY_DEDUP_BUCKETS",
            f"this Redis holds state laid out with {recorded}, this instance has {ours}; "
            "every instance on one Redis must use the same values, or it misses the others' "
            "events. To change them: stop every instance, delete the key tkgw:layout (keys "
            "remembered so far are forgotten, pending events may be stranded), start all "
            "with the new values",
        )


class RequestError(GatewayError):
    """An error caused by the request; carries TikTok's code and an HTTP status."""

    code = 40000
    http_status = 400
    # Status on TikTok-compatible paths: TikTok itself answers 200 with a code.
    tiktok_status = 200
    reason: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(RequestError):
    """The body, or one of its fields, is malformed."""

    code = 40002
    reason: str | None = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.detail = message  # what is wrong, without the field's name


class InvalidEvent(InvalidRequest):
    """One event of a request is malformed; the others may still be accepted."""

    reason = None  # counted per event, where the events were parsed

    def within(self, head: str) -> InvalidEvent:
        """The same error with its field named from `head`, the path of what holds it:
        validators name a field relative to its parent, and the parents add their part
        only when raising (building "data.3.user.email" for every field would cost)."""
        if not head:
            return self
        return InvalidEvent(f"{head}.{self.field}" if self.field else head, self.detail)


class InvalidJSON(InvalidRequest):
    """The body cannot be read as JSON at all (counted apart from well-formed bad bodies)."""

    reason = "invalid_json"


class AuthError(RequestError):
    """Missing or wrong Access-Token (40104, 40105)."""

    http_status = 401
    reason = "auth"

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class UnknownPixel(AuthError):
    """A pixel code that is not one of GATEWAY_PIXELS (TikTok's "no permission", 40001)."""

    reason = "unknown_pixel"

    def __init__(self, message: str) -> None:
        super().__init__(40001, message)


class PayloadTooLarge(RequestError):
    code = 40002
    http_status = 413
    tiktok_status = 413
    reason = "too_large"


class BodyTimeout(RequestError):
    """The body did not arrive within the body timeout; the connection is closed."""

    code = 40002
    http_status = 408
    tiktok_status = 408
    reason = "body_timeout"


class OriginNotAllowed(RequestError):
    code = 40001
    http_status = 403
    reason = "origin"


class NotFound(RequestError):
    code = 40400
    http_status = 404
    tiktok_status = 404


class RateLimited(RequestError):
    code = 40100
    http_status = 429
    tiktok_status = 429
    reason = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RelayRefused(RequestError):
    """A pass-through request the gateway does not relay; answered with a real HTTP status
    (a client's HTTP layer must see it was never TikTok's answer)."""

    outcome = "refused"


class PathNotCanonical(RelayRefused):
    code = 40002
    http_status = tiktok_status = 400
    outcome = "refused_path"


class NotOurCaller(RelayRefused):
    """No Access-Token (40104), or not one of the configured pixels' tokens (40105)."""

    http_status = tiktok_status = 401
    outcome = "refused_token"

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class PathNotRelayed(RelayRefused):
    code = 40400
    http_status = tiktok_status = 404
    outcome = "refused_prefix"


class StoreUnavailable(GatewayError):
    """Redis did not answer; the request was not stored and may be retried."""

    code = 50002
    http_status = 503
    reason = "store_unavailable"
