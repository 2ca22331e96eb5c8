"""What each `relay queue` operation may do to a message, and why it refuses. Pure.

An operation names the states it applies to and the state it leaves; the store carries
it out as one conditional UPDATE or DELETE, so a message that changed state meanwhile
(the server claimed it) is simply not matched, and ``refusal`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.queue.types import TRANSITIONS, MessageState

S = MessageState


@dataclass(frozen=True)
class Operation:
    """Which states an operation applies to; ``target`` None means delete, unless
    ``to_account`` is set: then each message is re-routed there and keeps its state."""

    name: str
    sources: frozenset[MessageState]
    target: MessageState | None
    due_now: bool = False  # next_attempt_at = now
    reset_failed: bool = False  # failed recipients go back to pending
    needs_body: bool = False  # only a message whose body is still kept
    to_account: str | None = None  # re-route to this account (move_to)

    @property
    def states(self) -> list[str]:
        return sorted(str(s) for s in self.sources)

    def allowed_by_transitions(self) -> bool:
        """Every move it makes is in message.TRANSITIONS (staying put is always allowed)."""
        if self.target is None:
            return True
        return all(s == self.target or self.target in TRANSITIONS[s] for s in self.sources)


HOLD = Operation("hold", frozenset({S.QUEUED, S.DEFERRED}), S.HELD)
RELEASE = Operation("release", frozenset({S.HELD}), S.QUEUED, due_now=True)
RETRY = Operation(
    "retry", frozenset({S.QUEUED, S.DEFERRED, S.FAILED}), S.QUEUED,
    due_now=True, reset_failed=True, needs_body=True,
)
RETRY_ALL = Operation("retry", frozenset({S.DEFERRED}), S.QUEUED, due_now=True)
# A way out of a misclassified refusal (an account problem taken for the message's).
RETRY_FAILED = Operation("retry", frozenset({S.FAILED}), S.QUEUED,
                         due_now=True, reset_failed=True, needs_body=True)
# Like `postqueue -f`: deferred messages stay deferred but are due now.
FLUSH = Operation("flush", frozenset({S.DEFERRED}), S.DEFERRED, due_now=True)
DELETE = Operation("delete", frozenset(set(S) - {S.SENDING}), None)
DELETE_FORCED = Operation("delete", frozenset(S), None)
PURGE = Operation("purge", frozenset({S.DELIVERED, S.FAILED}), None)
MOVABLE = frozenset({S.QUEUED, S.DEFERRED, S.HELD})  # not while being sent, nor finished


def move_to(account: str) -> Operation:
    """`relay queue move --to account`: built with its account, never without one (an
    Operation with neither target nor account deletes)."""
    return Operation("move", MOVABLE, None, to_account=account)


OPERATIONS = (HOLD, RELEASE, RETRY, RETRY_ALL, RETRY_FAILED, FLUSH, DELETE, DELETE_FORCED, PURGE)

SENDING_NOTE = (
    "a worker is delivering it right now and deleting the row cannot stop that send, so"
    " the message may still arrive; wait for the attempt to finish, or use --force"
)


def refusal(op: Operation, message_id: str, state: MessageState | None) -> str:
    """One line saying why ``op`` left this message alone (it was not in ``op.sources``)."""
    if state is None:
        return f"no message {message_id} in the queue"
    if state in op.sources and op.needs_body:
        return f"cannot {op.name} {message_id}: its body is no longer kept"
    if state is S.SENDING:
        if op.target is None:
            return f"cannot {op.name} {message_id}: {SENDING_NOTE}"
        return (f"cannot {op.name} {message_id}: a worker is delivering it right now;"
                " try again once the attempt is recorded (relay queue show)")
    if op.name == "release":
        return f"cannot release {message_id}: it is not held (it is {state})"
    if state is op.target:
        return f"{message_id} is already {state}"
    if state is S.DELIVERED:
        return f"cannot {op.name} {message_id}: it was delivered (its body is gone)"
    if state is S.HELD:
        return f"cannot {op.name} {message_id}: it is held; `relay queue release` queues it"
    if state is S.FAILED:
        return f"cannot {op.name} {message_id}: it failed; `relay queue retry` queues it again"
    return f"cannot {op.name} {message_id}: it is {state}"
