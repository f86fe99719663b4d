"""The invariants of the soak, checked in the database once the system is quiet.

Each check looks at every trial (or every user, or every ledger row) and reports how
many it looked at and the first few that broke it. A rule returns None when its subject
is right, else what is wrong with it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.db.tables import messages, reservations, usage_events, user_usage
from chatmeter.metering.counting import EXCHANGE_OVERHEAD_TOKENS
from tests.fakes.gemini_server import StreamRecord, count_rule
from tools.soak.plan import (
    EXPECTED_STATUS,
    HISTORY_MESSAGES,
    STOPS,
    SYSTEM_PROMPT,
    Kind,
    TrialPlan,
    TrialResult,
    request_texts,
    trial_number,
)

SHOWN = 5  # failures quoted per check
Rule = Callable[[TrialResult, Any], str | None]  # (trial, its assistant row) -> problem


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    looked_at: int
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Audit:
    checks: list[Check]
    replies: dict[int, Any] = field(default_factory=dict)  # trial -> its assistant row
    notes: list[str] = field(default_factory=list)  # figures worth knowing, not invariants

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


def _check(name: str, items: Iterable[tuple[object, str | None]]) -> Check:
    looked_at, failures = 0, []
    for subject, problem in items:
        looked_at += 1
        if problem is not None:
            failures.append(f"{subject}: {problem}")
    return Check(name, looked_at, failures)


@dataclass
class Books:
    """Everything the database holds, read once."""

    messages: list[Any]
    ledger: list[Any]
    users: list[Any]
    reservations: int


async def read_books(engine: AsyncEngine) -> Books:
    async with engine.connect() as conn:
        query = sa.select(messages).order_by(messages.c.chat_id, messages.c.created_at)
        rows = (await conn.execute(query)).all()
        ledger = (await conn.execute(sa.select(usage_events))).all()
        users = (await conn.execute(sa.select(user_usage))).all()
        held = await conn.execute(sa.select(sa.func.count()).select_from(reservations))
        return Books(list(rows), list(ledger), list(users), int(held.scalar_one()))


@dataclass
class Pairs:
    replies: dict[int, Any]  # trial -> its assistant row
    prompts: dict[int, list[str]]  # trial -> system prompt, history, message
    problems: list[str]


def pair_replies(rows: list[Any]) -> Pairs:
    """Each trial's assistant row (the row after its user message) and the prompt it
    should have sent (the chat's last non-empty messages before it, oldest first); and
    what is amiss: rows must alternate user, assistant within each chat."""
    pairs = Pairs({}, {}, [])
    by_chat: dict[uuid.UUID, list[Any]] = {}
    for row in rows:
        by_chat.setdefault(row.chat_id, []).append(row)
    for chat_id, chat in by_chat.items():
        for position, row in enumerate(chat):
            expected = "user" if position % 2 == 0 else "assistant"
            if row.role != expected:
                pairs.problems.append(f"chat {chat_id} row {position} is {row.role}")
                break
            if row.role == "user":
                continue
            question = chat[position - 1].content
            index = trial_number(question)
            if index is None or index in pairs.replies:
                pairs.problems.append(f"chat {chat_id} row {position}: trial {index} again")
                continue
            pairs.replies[index] = row
            earlier = [r.content for r in chat[: position - 1] if r.content]
            history = earlier[-HISTORY_MESSAGES:] if HISTORY_MESSAGES else []
            pairs.prompts[index] = [SYSTEM_PROMPT, *history, question]
        if len(chat) % 2:
            pairs.problems.append(f"chat {chat_id}: the last user message has no reply")
    return pairs


def expected_bill(
    plan: TrialPlan, content: str, prompt_texts: list[str], read: int | None = None
) -> tuple[int, str]:
    """What the trial must be billed, and from which source: the fake's last usage report
    the server read (`read` pieces: the saved ones, or more when a stop or disconnect
    left chunks read ahead, whose usage Gemini billed all the same), else the fake
    tokenizer's count of the prompt plus the reply (SPEC section 6), else nothing for a
    request that failed before producing anything (a 429, a drop before the first piece)."""
    pieces = len(content.split())
    read = pieces if read is None else read
    if plan.kind == "rate_limited" or (plan.kind == "drop" and pieces == 0):
        return 0, "provider"
    reported = plan.usage == "every" and read > 0
    reported = reported or (plan.usage == "last" and read == plan.pieces)
    if reported:
        return plan.prompt_tokens + read + plan.thinking_tokens, "provider"
    prompt = sum(count_rule([text]) for text in prompt_texts if text)
    reply = count_rule([content]) if content else 0
    return prompt + EXCHANGE_OVERHEAD_TOKENS + reply, "counted"


def left_early(result: TrialResult) -> bool:
    """A client that leaves, or sends a stop, as the response starts may beat the
    upstream request (the stop's ownership read is one round trip on PostgreSQL)."""
    return result.plan.kind in ("disconnect", "stop") and result.plan.after == 0


class Auditor:
    def __init__(
        self,
        books: Books,
        results: list[TrialResult],
        upstream: dict[int, list[StreamRecord]],
    ) -> None:
        self.books = books
        self.results = results
        self.upstream = upstream
        self.pairs = pair_replies(books.messages)
        self.ledger = {row.message_id: row for row in books.ledger}
        self.ledger_rows = Counter(row.message_id for row in books.ledger)
        self.assistant_ids = {m.message_id for m in books.messages if m.role == "assistant"}

    def each(self, rule: Rule, *kinds: Kind) -> Iterable[tuple[object, str | None]]:
        """`rule` over every trial (of `kinds`, if given) that has its assistant row."""
        for result in self.results:
            reply = self.pairs.replies.get(result.plan.index)
            if reply is not None and (not kinds or result.plan.kind in kinds):
                yield f"trial {result.plan.index} ({result.plan.kind})", rule(result, reply)

    # -- the trial as the client saw it ------------------------------------------------

    @staticmethod
    def ran(result: TrialResult | None) -> str | None:
        if result is None:
            return "never ran (time limit)"
        if result.status_code != 200:
            return f"answered {result.status_code} {result.body}"
        if result.error:
            return result.error
        if result.left:
            return None if result.settled is not None else "its reservation never went"
        return None if result.final is not None else "the stream ended without an end event"

    def has_reply(self, result: TrialResult) -> str | None:
        return None if result.plan.index in self.pairs.replies else "no assistant message"

    @staticmethod
    def status(result: TrialResult, reply: Any) -> str | None:
        want = EXPECTED_STATUS[result.plan.kind]
        if reply.status in want:
            return None
        return f"{result.plan.kind} ended {reply.status}, not {' or '.join(want)}"

    @staticmethod
    def client_text(result: TrialResult, reply: Any) -> str | None:
        seen = "".join(result.chunks)
        if result.final is not None and seen != reply.content:
            return f"saw {seen!r}, saved {reply.content!r}"
        if result.left and not reply.content.startswith(seen):
            return f"saw {seen!r}, saved {reply.content!r} (not a prefix)"
        return None

    @staticmethod
    def client_figures(result: TrialResult, reply: Any) -> str | None:
        final = result.final
        if final is None:
            return None
        if final.get("message_id") != str(reply.message_id):
            return f"end event names {final.get('message_id')}, saved {reply.message_id}"
        if final.get("tokens_used") != reply.tokens_consumed:
            return f"client saw {final.get('tokens_used')}, saved {reply.tokens_consumed}"
        if not final.get("done"):
            return None
        usage = final["usage"]
        if (usage["total_tokens"], usage["source"]) != (
            reply.tokens_consumed,
            reply.metering_source,
        ):
            return f"end event usage {usage}"
        if final["finish_reason"] != reply.finish_reason:
            return f"finish_reason {final['finish_reason']}, saved {reply.finish_reason}"
        return None

    @staticmethod
    def stopped(result: TrialResult, reply: Any) -> str | None:
        final = result.final or {}
        late = result.plan.kind == "late_stop"
        if late and result.stop_status == 404:  # the reply had ended: nothing to stop
            return None if reply.status == "complete" else f"404, yet {reply.status}"
        if result.stop_status != 202:
            return f"stop answered {result.stop_status}"
        if late and reply.status == "complete":  # accepted while the reply was settling
            return None if final.get("finish_reason") != "stopped" else "complete, yet stopped"
        if final.get("finish_reason") != "stopped" or reply.finish_reason != "stopped":
            return f"end event {final}, saved finish_reason {reply.finish_reason}"
        return None

    # -- the books -----------------------------------------------------------------------

    def user_books(self, user: Any) -> str | None:
        ledger = sum(row.total_tokens for row in self.books.ledger if row.user_id == user.user_id)
        if user.total_tokens_used != ledger or user.reserved_tokens != 0:
            total, reserved = user.total_tokens_used, user.reserved_tokens
            return f"total {total}, ledger {ledger}, reserved {reserved}"
        return None

    def billed_once(self, row: Any) -> str | None:
        if self.ledger_rows[row.message_id] > 1:
            return f"{self.ledger_rows[row.message_id]} ledger rows"
        return None if row.message_id in self.assistant_ids else "no assistant message"

    def matches_ledger(self, result: TrialResult, reply: Any) -> str | None:
        row = self.ledger.get(reply.message_id)
        if reply.tokens_consumed == 0:
            return None if row is None else f"billed 0 but a ledger row of {row.total_tokens}"
        if row is None:
            return f"tokens_consumed {reply.tokens_consumed} but no ledger row"
        if (row.total_tokens, row.source) != (reply.tokens_consumed, reply.metering_source):
            return f"message {reply.tokens_consumed}, ledger {row.total_tokens} ({row.source})"
        return None

    def unbilled(self, result: TrialResult, reply: Any) -> str | None:
        if reply.tokens_consumed or reply.message_id in self.ledger:
            return f"billed {reply.tokens_consumed}, ledger row {reply.message_id in self.ledger}"
        return None

    def exact(self, result: TrialResult, reply: Any) -> str | None:
        prompt = self.pairs.prompts[result.plan.index]
        saved = len(reply.content.split())
        records = self.upstream.get(result.plan.index)
        sent = records[-1].sent if records else saved
        wanted = {
            expected_bill(result.plan, reply.content, prompt, read)
            for read in range(saved, max(saved, sent) + 1)
        }
        if (reply.tokens_consumed, reply.metering_source) not in wanted:
            billed = f"{reply.tokens_consumed} ({reply.metering_source})"
            want = " or ".join(f"{w} ({source})" for w, source in sorted(wanted))
            return f"billed {billed}, want {want}"
        return None

    # -- the upstream --------------------------------------------------------------------

    def sent_prompt(self, result: TrialResult, reply: Any) -> str | None:
        records = self.upstream.get(result.plan.index)
        if not records:
            return None
        sent, want = request_texts(records[-1].request), self.pairs.prompts[result.plan.index]
        return None if sent == want else f"sent {sent}, want {want}"

    def upstream_calls(self, result: TrialResult, reply: Any) -> str | None:
        count = len(self.upstream.get(result.plan.index, []))
        return None if count == 1 or (count == 0 and left_early(result)) else f"{count} calls"

    def upstream_ended(self, result: TrialResult, reply: Any) -> str | None:
        records = self.upstream.get(result.plan.index)
        if not records:
            return None if left_early(result) else "no upstream call"
        record = records[-1]
        if record.completed or not record.disconnected.is_set():
            return f"upstream sent {record.sent}/{result.plan.pieces} and was not closed"
        return None

    def notes(self) -> list[str]:
        replies = self.pairs.replies
        early = [
            replies[r.plan.index]
            for r in self.results
            if not self.upstream.get(r.plan.index) and r.plan.index in replies
        ]
        ended = [
            (records[-1].sent, len(replies[r.plan.index].content.split()))
            for r in self.results
            if r.plan.kind in ("stop", "disconnect")
            and (records := self.upstream.get(r.plan.index))
            and r.plan.index in replies
        ]
        unseen = sum(sent - saved for sent, saved in ended)
        return [
            f"Replies whose client left before the request reached the provider: {len(early)}, "
            f"billed {sum(r.tokens_consumed for r in early)} tokens (the prompt, counted).",
            "Pieces the provider had sent when a stop or disconnect ended the reply, but that "
            f"the reply had not reached yet (neither shown, nor saved, nor billed): {unseen} "
            f"over {len(ended)} replies, at most {max((a - b for a, b in ended), default=0)} "
            "in one.",
        ]


def _spooled(outbox: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in outbox.glob("*.jsonl"))


async def audit(
    engine: AsyncEngine,
    plans: list[TrialPlan],
    results: list[TrialResult],
    upstream: dict[int, list[StreamRecord]],
    outbox: Path,
    quiet: float | None,
) -> Audit:
    books = await read_books(engine)
    spooled = await asyncio.to_thread(_spooled, outbox)
    a = Auditor(books, results, upstream)
    ran = {r.plan.index: r for r in results}
    held = books.reservations
    checks = [
        _check(
            "every trial ran: a stream, then its end event or a deliberate disconnect",
            ((f"trial {p.index} ({p.kind})", a.ran(ran.get(p.index))) for p in plans),
        ),
        _check(
            "chat rows alternate user, assistant (one reply per user message)",
            [("chats", "; ".join(a.pairs.problems[:SHOWN]) or None)],
        ),
        _check(
            "every trial's user message has its assistant message",
            ((f"trial {r.plan.index}", a.has_reply(r)) for r in results),
        ),
        _check("final status matches the trial", a.each(a.status)),
        _check(
            "the client saw exactly the saved reply (a prefix of it if it left)",
            a.each(a.client_text),
        ),
        _check(
            "client-seen message_id, tokens_used, usage, finish_reason equal the database's",
            a.each(a.client_figures),
        ),
        _check(
            'stop trials: stop answered 202, finish_reason "stopped" '
            "(late stops: or 404 and complete)",
            a.each(a.stopped, *STOPS),
        ),
        _check(
            "every user: total_tokens_used = sum of ledger rows, reserved_tokens = 0",
            ((f"user {u.user_id}", a.user_books(u)) for u in books.users),
        ),
        _check(
            "no row left in reservations once quiet",
            [("reservations", None if not held and quiet is not None else f"{held} rows")],
        ),
        _check(
            "no usage billed twice; every ledger row has its message",
            ((f"ledger row {row.event_id}", a.billed_once(row)) for row in books.ledger),
        ),
        _check(
            "tokens_consumed = its ledger row's total_tokens (no row when 0)",
            a.each(a.matches_ledger),
        ),
        _check(
            "rate-limited (429) trials billed 0, no ledger row", a.each(a.unbilled, "rate_limited")
        ),
        _check(
            "billed exactly: the provider's last usage read (read-ahead included), else the "
            "counted figure",
            a.each(a.exact),
        ),
        _check(
            "the provider was sent the system prompt, the chat's last "
            f"{HISTORY_MESSAGES} messages and the message, in order",
            a.each(a.sent_prompt),
        ),
        _check(
            "one upstream call per trial (none if the client left as the response started)",
            a.each(a.upstream_calls),
        ),
        _check(
            "stop and disconnect ended the upstream call",
            a.each(a.upstream_ended, "stop", "disconnect"),  # not the late races
        ),
        _check(
            "no settlement spooled to the outbox",
            [("outbox", None if spooled == 0 else f"{spooled} spooled")],
        ),
    ]
    return Audit(checks, a.pairs.replies, a.notes())
