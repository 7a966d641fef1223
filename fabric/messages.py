"""Typed control messages between instances and the controller.

Every message is a frozen dataclass with `to_dict()` (plain values: int, float, str, bool, lists,
dicts with int keys) and `from_dict()`, which validates strictly: missing or extra fields and
wrong types raise `ValueError` naming the message and the field. Where a message crosses a
process boundary outside a Ray call, `encode` / `decode` carry it as msgpack
`{"type": <class name>, **fields}`; never pickle. Tensors never ride on these messages.

Values are checked for type (and floats for finiteness), not for meaning: that a count is not
negative or that a heartbeat's books add up is the receiver's business (`Ledger.check_integrity`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import msgpack

RebalanceKind = Literal["return_home", "cancel_cycle"]



CONTROL_TIMEOUT_S = 60.0   # every Ray call on a control path (driver, actors) waits at most this

class _Message:
    """Mixin: dict conversion driven by the dataclass fields and their type hints."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build the message from plain values; `ValueError` on missing/extra/ill-typed fields.
        Lists stand in for tuples (msgpack has no tuple) and ints for floats."""
        name = cls.__name__
        if not isinstance(data, dict):
            raise ValueError(f"{name} must be a dict, got {type(data).__name__}")
        spec = _fields(cls)
        missing = [k for k in spec if k not in data]
        extra = [k for k in data if k not in spec]
        if missing:
            raise ValueError(f"{name} is missing field(s) {', '.join(missing)}")
        if extra:
            raise ValueError(f"{name} has unknown field(s) {', '.join(map(str, extra))}")
        return cls(**{k: _coerce(data[k], tp, f"{name}.{k}") for k, tp in spec.items()})


@dataclass(frozen=True, slots=True)
class Heartbeat(_Message):
    """An instance's books, sent periodically to the controller. `seq` grows per instance;
    `creditors`: creditor id -> blocks this instance borrowed from it; `debtors`: debtor id ->
    blocks this instance lent to it. `load` is e.g. the number of unfinished requests."""

    instance_id: int
    node: str
    blocks_total: int
    blocks_free: int
    blocks_lent: int
    blocks_borrowed: int
    lend_cap: int
    load: float
    num_waiting: int
    creditors: dict[int, int]
    debtors: dict[int, int]
    seq: int


@dataclass(frozen=True, slots=True)
class BorrowRequest(_Message):
    """Debtor -> controller: find creditors for `num_blocks`, skipping the ids in `exclude`."""

    debtor: int
    num_blocks: int
    exclude: list[int]


@dataclass(frozen=True, slots=True)
class CreditorProposal(_Message):
    """Controller -> debtor: `grants` = [(creditor id, num blocks)]; empty = cannot be covered."""

    debtor: int
    grants: list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class ReserveRequest(_Message):
    """Debtor -> creditor: reserve `num_blocks` before any byte moves."""

    debtor: int
    num_blocks: int
    reservation_id: int


@dataclass(frozen=True, slots=True)
class ReserveReply(_Message):
    """Creditor -> debtor: the reserved physical block ids, or ok=False and why."""

    ok: bool
    block_ids: list[int]
    reason: str


@dataclass(frozen=True, slots=True)
class ReleaseBlocks(_Message):
    """Debtor -> creditor: these blocks held for `debtor` are no longer needed."""

    debtor: int
    block_ids: list[int]


@dataclass(frozen=True, slots=True)
class RebalanceOrder(_Message):
    """Controller -> instances: move `num_blocks` of `debtor`'s KV held on `creditor` back home.

    kind "return_home": the debtor has free local room; `cycle` is empty.
    kind "cancel_cycle": one edge of a debt cycle; `cycle` lists the instances in order, each
    borrowing from the next and the last from the first. All orders sharing a `cycle` form one
    swap (every instance's blocks go home into the room the others' blocks vacate): execute
    them together or not at all."""

    kind: RebalanceKind
    debtor: int
    creditor: int
    num_blocks: int
    cycle: list[int]

    def __post_init__(self) -> None:
        if self.kind not in typing.get_args(RebalanceKind):
            raise ValueError(f"RebalanceOrder.kind must be one of "
                             f"{typing.get_args(RebalanceKind)}, got {self.kind!r}")


Message = (Heartbeat | BorrowRequest | CreditorProposal | ReserveRequest | ReserveReply
           | ReleaseBlocks | RebalanceOrder)
MESSAGE_TYPES: dict[str, type] = {cls.__name__: cls for cls in typing.get_args(Message)}


def encode(msg: Message) -> bytes:
    """msgpack bytes of `{"type": <class name>, **msg.to_dict()}`."""
    name = type(msg).__name__
    if MESSAGE_TYPES.get(name) is not type(msg):
        raise ValueError(f"cannot encode {name}: not a fabric control message")
    return msgpack.packb({"type": name, **msg.to_dict()}, use_bin_type=True)


def decode(data: bytes, max_bytes: int = 1 << 20) -> Message:
    """Inverse of `encode`. `ValueError` on oversize, undecodable, unknown or malformed input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"decode expects bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ValueError(f"control message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # TypeError: list as map key
        raise ValueError(f"control message is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict) or "type" not in obj:
        raise ValueError("control message must be a map with a 'type' field")
    fields = dict(obj)
    name = fields.pop("type")
    cls = MESSAGE_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown control message type {name!r}; known: {sorted(MESSAGE_TYPES)}")
    return cls.from_dict(fields)


# ---- validation -------------------------------------------------------------------------------
@cache
def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(_seq(value, where))]
    if origin is tuple:
        items = _seq(value, where)
        if len(items) != len(args):
            raise ValueError(f"{where} must have {len(args)} items, got {len(items)}")
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(items, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a dict, got {type(value).__name__}")
        return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}[{k!r}]")
                for k, v in value.items()}
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {args}, got {value!r}")
        return value
    return _scalar(value, tp, where)


def _seq(value: Any, where: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _scalar(value: Any, tp: type, where: str) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    # bool is an int subclass: a flag never passes for a count, nor a count for a flag.
    if type(value) is not tp:
        raise ValueError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
