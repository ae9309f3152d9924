"""The management API's request bodies and responses, declared once as pydantic models.

FastAPI validates requests with them and generates the OpenAPI document from them
(:func:`vdev.api.app.openapi_document`); the handlers build responses with them, so the
document cannot drift from what is served. Every size is bounded: no request can put a
number into the control plane (and so into ``/metrics``) that no machine has.

A request body that does not fit its model is answered 422 with ``{"error": "FIELD: why"}``
(:func:`describe_validation_error`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
)

from protocol.errors import ConfigError
from protocol.units import PAGE_SIZE
from vdev.config import parse_size

MIB = 1 << 20
#: The largest size any request may name: 4 PiB, what 52 physical address bits (x86-64's
#: architectural limit) can address. A balloon target or a host's free memory beyond it is
#: a typo or an attack; refusing it keeps ``/metrics`` free of absurd values.
MAX_BYTES = 1 << 52
MAX_PAGES = MAX_BYTES // PAGE_SIZE
MAX_MIB = MAX_BYTES // MIB
#: Settings are 64-bit signed integers at most (each setting has its own range on top).
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

Pages = Annotated[StrictInt, Field(ge=0, le=MAX_PAGES)]
Bytes = Annotated[StrictInt, Field(ge=0, le=MAX_BYTES)]
NonNegInt = Annotated[int, Field(ge=0)]


def _mib(value: Any) -> Any:
    # StrictFloat takes JSON integers too; refuse bools here (True is an int in Python)
    if isinstance(value, bool):
        raise ValueError("expected a number of MiB, got a boolean")
    return value


Mib = Annotated[
    StrictFloat,
    Field(ge=0, le=MAX_MIB, allow_inf_nan=False),
    BeforeValidator(_mib),
]


def size_string_bytes(value: str, field: str) -> int:
    """Bytes of a size string (``"512M"``, ``"1.5G"``) within :data:`MAX_BYTES`
    (ValueError naming ``field`` otherwise)."""
    if len(value) > 64:
        raise ValueError(f"{field}: a size string is at most 64 characters")
    try:
        nbytes = parse_size(value, field)
    except (ConfigError, OverflowError, ValueError) as e:
        raise ValueError(str(e)) from None
    if not 0 <= nbytes <= MAX_BYTES:
        raise ValueError(f"{field}: {value!r} is more than {MAX_BYTES} bytes (4 PiB)")
    return nbytes


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------- requests


class TargetMib(_Body):
    target_mib: Mib


class TargetPages(_Body):
    target_pages: Pages


class TargetBytes(_Body):
    target_bytes: Bytes


class TargetSize(_Body):
    target: Annotated[StrictStr, Field(examples=["512M", "1.5G"], max_length=64)]


class TargetPolicy(_Body):
    policy: Literal[True]


def _one_key(keys: Sequence[str], what: str) -> Any:
    """A callable discriminator: the tag is the one known key the body has."""

    def pick(value: Any) -> str | None:
        if not isinstance(value, dict):
            return None
        present = [k for k in keys if k in value]
        return present[0] if len(present) == 1 and len(value) == 1 else None

    def check(value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
        unknown = sorted(str(k) for k in value if k not in keys)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(unknown)}; expected one of {', '.join(keys)}"
            )
        if len(value) != 1:
            raise ValueError(f"expected exactly one of {', '.join(keys)}")
        return value

    return pick, check


_target_pick, _target_check = _one_key(
    ("target_mib", "target_pages", "target_bytes", "target", "policy"), "a target"
)

#: ``PUT /vms/{name}/target``: exactly one of the keys.
TargetRequest = Annotated[
    Annotated[TargetMib, Tag("target_mib")]
    | Annotated[TargetPages, Tag("target_pages")]
    | Annotated[TargetBytes, Tag("target_bytes")]
    | Annotated[TargetSize, Tag("target")]
    | Annotated[TargetPolicy, Tag("policy")],
    Discriminator(_target_pick),
    BeforeValidator(_target_check),
]


class FreeBytes(_Body):
    free_bytes: Bytes


class FreeMib(_Body):
    free_mib: Mib


class FreeSize(_Body):
    free: Annotated[StrictStr, Field(examples=["2G"], max_length=64)]


_free_pick, _free_check = _one_key(("free_bytes", "free_mib", "free"), "a simulated host")

#: ``PUT /host/simulated``: exactly one of the keys.
SimulatedRequest = Annotated[
    Annotated[FreeBytes, Tag("free_bytes")]
    | Annotated[FreeMib, Tag("free_mib")]
    | Annotated[FreeSize, Tag("free")],
    Discriminator(_free_pick),
    BeforeValidator(_free_check),
]


def target_pages(body: Any) -> int | None:
    """Pages of a validated :data:`TargetRequest` (None: back to the policy)."""
    if isinstance(body, TargetPolicy):
        return None
    if isinstance(body, TargetPages):
        return body.target_pages
    if isinstance(body, TargetBytes):
        return _whole_pages(body.target_bytes, "target_bytes")
    if isinstance(body, TargetMib):
        return _whole_pages(int(body.target_mib * MIB), "target_mib")
    assert isinstance(body, TargetSize)
    return _whole_pages(size_string_bytes(body.target, "target"), "target")


def _whole_pages(nbytes: int, field: str) -> int:
    """Pages in ``nbytes`` (rounded down); a size that is not 0 but under one page is an
    error, not a target of 0 (which would empty the balloon)."""
    if 0 < nbytes < PAGE_SIZE:
        raise ValueError(
            f"{field}: {nbytes} bytes is less than one page ({PAGE_SIZE} bytes); "
            "give 0 for an empty balloon"
        )
    return nbytes // PAGE_SIZE


def free_bytes(body: Any) -> int:
    """Bytes of a validated :data:`SimulatedRequest`."""
    if isinstance(body, FreeBytes):
        return body.free_bytes
    if isinstance(body, FreeMib):
        return int(body.free_mib * MIB)
    assert isinstance(body, FreeSize)
    return size_string_bytes(body.free, "free")


class SettingRequest(_Body):
    """``PUT /settings/{path}``: the setting's own range is checked by the policy engine."""

    value: Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]


# ------------------------------------------------------------------------------- responses


class Error(BaseModel):
    """Every error, at every layer (HTTP framing, authorization, validation, state)."""

    error: str


class Rates(BaseModel):
    inflate_pages_per_s: Annotated[float, Field(ge=0)]
    deflate_pages_per_s: Annotated[float, Field(ge=0)]
    window_s: float


class Vm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    socket_path: str
    personality: str
    connected: bool
    driver_active: bool = Field(
        description="esxtop MCTL?: the balloon driver runs (vmw: START granted capabilities, "
        "no reset pending; virtio-balloon: DRIVER_OK, its rings started). Only active drivers "
        "are given policy targets"
    )
    state: Literal["disconnected", "resetting", "active", "inactive"] = Field(
        description="resetting: the operator demanded a balloon reset the guest has not "
        "started over from yet (vmw: no START since)"
    )
    control: Literal["policy", "manual"]
    manual_target_pages: int | None
    reason: str = Field(
        description="what decided the target: manual, pressure:soft, capped:CtlMaxPercent, "
        "rate-limited, hysteresis, limit, none..."
    )
    pool: str | None
    ram_pages: NonNegInt
    ram_bytes: NonNegInt
    target_pages: NonNegInt = Field(description="esxtop MCTLTGT")
    target_bytes: NonNegInt
    size_pages: NonNegInt = Field(description="esxtop MCTLSZ")
    size_bytes: NonNegInt
    max_pages: NonNegInt = Field(description="esxtop MCTLMAX")
    max_bytes: NonNegInt
    rates: Rates
    failures: NonNegInt = Field(
        description="the FAIL column: times the guest did something wrong, each counted once: "
        "bad frames and bad chains, commands answered ERROR_CMD_INVALID, pages refused "
        "PPN_INVALID / PPN_LOCKED / PPN_UNLOCKED (virtio-balloon: inflated PFNs not RAM or "
        "already in the balloon). Normal balloon flow is not counted: ERROR_RESET, ERROR_BUSY, "
        "PPN_NOTNEEDED, PPN_PINNED (vdev.policy.control.failures)"
    )
    capabilities: Any
    guest_type: Any
    doorbell_registered: bool
    counters: dict[str, int] = Field(
        description="device counters (debugfs vocabulary); the names listed in gauges are "
        "current levels, every other one only grows"
    )
    gauges: list[str] = Field(
        description="the names in counters that are gauges (e.g. events pending), exported to "
        "Prometheus as gauges"
    )
    guest_stats: dict[str, int] = Field(
        description="QEMU guest-stats keys; -1 = not reported. Refreshed every vdev serve "
        "--stats-interval seconds and on POST /vms/{name}/stats"
    )
    ram_allocated_bytes: NonNegInt
    reclaimed_bytes_total: NonNegInt


class VmList(BaseModel):
    vms: list[Vm]


class Psi(BaseModel):
    some_avg10: float | None
    full_avg10: float | None


class Capped(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vms: dict[str, NonNegInt]
    pools: dict[str, NonNegInt]


class GuestInfo(BaseModel):
    """Per guest, what ``vdev stat`` shows beside its statistics (AGE, PFAIL, HOLD)."""

    stats_age_s: float | None = Field(
        description="seconds since vdev first saw the guest's current statistics (null: it "
        "never sent any)"
    )
    hold: str | None = Field(
        description="what holds its balloon: guest-backoff, futile inflation, RAM that cannot "
        "be reclaimed (share=off)"
    )
    reclaim_failures: int = Field(description="punches the host refused")
    unreclaimable: list[str] = Field(description="RAM regions the front-end maps private")


class Host(BaseModel):
    source: str = Field(description="simulated, proc or cgroup:DIR")
    simulated: bool
    state: Literal["high", "clear", "soft", "hard", "low"] | None
    total_bytes: int | None
    free_bytes: int | None
    min_free_bytes: int | None
    psi: Psi
    pressure_pages: int = Field(description="host pressure reclamation placed on balloons")
    unmet_pages: int = Field(
        description="host pressure demand the caps kept from any balloon (soft/hard/low only; "
        "ESXi would compress or swap it). Limits and manual targets never count here: see "
        "capped_pages"
    )
    capped_pages: int = Field(
        description="limits and manual targets cut by the caps (MCTLMAX), per VM and per "
        "pool, summed"
    )
    capped: Capped = Field(
        description="capped_pages by VM (its limit or manual target) and by pool (its limit); "
        "only non-zero entries"
    )
    policy_period_s: float
    steps: int
    last_step: float | None = Field(description="Unix time of the last policy step")
    error: str | None
    source_why: str | None = Field(default=None, description="why this source was chosen")
    cgroups: list[dict[str, Any]] = Field(
        default_factory=list, description="the watched cgroups' last readings (--watch-cgroup)"
    )
    notifications: dict[str, Any] = Field(
        default_factory=dict, description="kernel notifications: armed, skipped, received, last"
    )
    backstop: dict[str, Any] = Field(
        default_factory=dict,
        description="engaged, pauses, paused (the VMs whose QEMU is stopped now: name, pid, "
        "cgroup, since) and the last actions (--backstop)",
    )
    guests: dict[str, GuestInfo] = Field(
        default_factory=dict, description="per guest: the age of its statistics, what holds it"
    )


class Pool(BaseModel):
    name: str
    parent: str | None
    reservation_bytes: NonNegInt
    limit_bytes: NonNegInt | None
    shares: str | int
    share_count: float
    expandable_reservation: bool
    vms: list[str]


class PoolList(BaseModel):
    pools: list[Pool]


class Settings(BaseModel):
    settings: dict[str, int]


class Setting(BaseModel):
    path: str
    value: int


class HistoryPoint(BaseModel):
    t: float = Field(description="Unix time, seconds")
    target_pages: NonNegInt
    size_pages: NonNegInt
    max_pages: NonNegInt
    host_free_bytes: NonNegInt
    host_state: str
    connected: bool = Field(
        True,
        description="a front-end was connected (false: no guest yet or any more; size and max "
        "mean nothing then)",
    )


class History(BaseModel):
    name: str
    page_size: int
    points: list[HistoryPoint]


class Event(BaseModel):
    """One line of ``GET /events`` (NDJSON) or one SSE ``data:``; other keys per type."""

    model_config = ConfigDict(extra="allow")

    type: Literal[
        "hello", "heartbeat", "guest", "control", "host", "setting", "resync", "audit"
    ] = Field(
        description="guest: the registry's target/size/state event (with the reason of the "
        "last target set); control: manual/policy switch or reset; host: host state change "
        "or simulated free memory; setting: a setting changed; resync: guest events were "
        "lost, re-read the VMs; audit: a change made through the API, who made it (uid, "
        "pid, cmdline) and its outcome. A client that falls 4096 events behind is "
        "disconnected."
    )
    time: float
    monotonic: float | None = Field(
        None,
        description="time.monotonic() of the vdev process (CLOCK_MONOTONIC: comparable with "
        "any process's monotonic clock on the same Linux host). Guest events: when the "
        "registry published them; a size event is published once the device has finished the "
        "batch that moved the size (its reclaim done and its completion given to the guest). "
        "Other events: when the control plane published them.",
    )
    name: str | None = None


def describe_validation_error(errors: Sequence[Any]) -> str:
    """One line naming the field(s) pydantic refused and why (the union's tag, the word
    ``body`` and duplicate path parts are left out)."""
    parts = []
    for err in list(errors)[:3]:
        loc: list[str] = []
        for item in err.get("loc", ()):
            item = str(item)
            if (item in ("body", "query", "path") and not loc) or (loc and loc[-1] == item):
                continue
            if item.startswith(("function-", "tagged-union")):
                continue
            loc.append(item)
        msg = str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        ctx = err.get("ctx") or {}
        if err.get("type") == "finite_number" or (
            "input" in err and isinstance(err["input"], float) and not math.isfinite(err["input"])
        ):
            msg = "must be a finite number"
        if "error" in ctx and err.get("type") == "json_invalid":
            msg = f"not valid JSON: {ctx['error']}"
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    more = len(errors) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


__all__ = [
    "MAX_BYTES",
    "Error",
    "Event",
    "History",
    "HistoryPoint",
    "Host",
    "Pool",
    "PoolList",
    "Setting",
    "SettingRequest",
    "Settings",
    "SimulatedRequest",
    "TargetRequest",
    "Vm",
    "VmList",
    "describe_validation_error",
    "free_bytes",
    "target_pages",
]
