"""What each trial of the soak does, drawn from one seed before anything runs.

A trial is one exchange with one fault (or none). Its message names it (`trial 17 drop
after 3: ...`), so the fake Gemini server can look up the script of the request it gets.

Besides the faults of issue 7, two races: the client leaves, or sends a stop, just after
the last chunk, while the reply is finishing; either outcome is right, the books must
hold whichever wins.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.fakes.gemini_server import GeminiScript, ReceivedRequest
from tests.support.sse import is_piece

Kind = Literal[
    "complete",
    "no_usage",
    "disconnect",
    "stop",
    "drop",
    "rate_limited",
    "late_disconnect",
    "late_stop",
]
UsageMode = Literal["last", "every", "none"]

KINDS: tuple[Kind, ...] = (
    "complete",
    "no_usage",
    "disconnect",
    "stop",
    "drop",
    "rate_limited",
    "late_disconnect",
    "late_stop",
)
_WEIGHTS = (3, 3, 3, 3, 3, 3, 1, 1)
# the statuses a trial's reply may end with (the late races may go either way)
EXPECTED_STATUS: dict[Kind, tuple[str, ...]] = {
    "complete": ("complete",),
    "no_usage": ("complete",),
    "disconnect": ("interrupted",),
    "stop": ("stopped",),
    "drop": ("failed",),
    "rate_limited": ("failed",),
    "late_disconnect": ("interrupted", "complete"),
    "late_stop": ("stopped", "complete"),
}
LEAVES: tuple[Kind, ...] = ("disconnect", "late_disconnect")
STOPS: tuple[Kind, ...] = ("stop", "late_stop")
_TRIAL = re.compile(r"^trial (\d+) ")
# the server's settings that decide what the provider is sent
SYSTEM_PROMPT = "You are the assistant of a soak test. Answer briefly."
HISTORY_MESSAGES = 10


@dataclass(frozen=True, slots=True)
class TrialPlan:
    index: int
    kind: Kind
    after: int  # chunks the client reads (disconnect, stop) or pieces sent (drop) first
    pieces: int
    delay: float  # seconds between pieces upstream
    usage: UsageMode
    prompt_tokens: int  # what the fake reports as the prompt's tokens
    thinking_tokens: int
    words: int  # filler words of the message, so prompts differ in size

    @property
    def message(self) -> str:
        filler = " ".join(f"w{j}" for j in range(self.words))
        return f"trial {self.index} {self.kind} after {self.after}: {filler}"

    @property
    def reply_pieces(self) -> list[str]:
        return [f"t{self.index}p{i} " for i in range(self.pieces)]

    def script(self) -> GeminiScript:
        if self.kind == "rate_limited":
            return GeminiScript(error_status=429)
        return GeminiScript(
            pieces=self.reply_pieces,
            delay=self.delay,
            usage=self.usage,
            prompt_tokens=self.prompt_tokens,
            thinking_tokens=self.thinking_tokens,
            drop_after=self.after if self.kind == "drop" else None,
        )


def plan_trials(seed: int, count: int) -> list[TrialPlan]:
    rng = random.Random(seed)
    return [_plan(rng, index) for index in range(count)]


def _plan(rng: random.Random, index: int) -> TrialPlan:
    kind = rng.choices(KINDS, weights=_WEIGHTS)[0]
    usage: UsageMode = rng.choice(("last", "every", "none"))
    after, pieces, delay = 0, rng.randint(3, 12), rng.uniform(0.005, 0.03)
    if kind == "complete":
        usage = rng.choice(("last", "every"))
    elif kind == "no_usage":
        usage = "none"
    elif kind == "disconnect":
        # a long tail (6 s), so the upstream is still sending when the client has gone,
        # even on a loaded machine; 0: it leaves as soon as the response starts
        after = rng.randint(0, 4)
        pieces, delay = after + 200, 0.03
    elif kind == "stop":
        # longer still: a stop that reaches the other worker waits for its poll (0.5 s)
        after = rng.randint(0, 4)
        pieces, delay = after + 300, 0.03
    elif kind in ("late_disconnect", "late_stop"):
        after = pieces
    elif kind == "drop":
        after = rng.randint(0, 5)  # 0: the connection closes before the first piece
        pieces = after + rng.randint(1, 6)
    return TrialPlan(
        index=index,
        kind=kind,
        after=after,
        pieces=pieces,
        delay=round(delay, 4),
        usage=usage,
        prompt_tokens=rng.randint(20, 400),
        thinking_tokens=rng.choice((0, 0, rng.randint(1, 200))),
        words=rng.randint(0, 30),
    )


def trial_number(message: str) -> int | None:
    """The trial a user message belongs to."""
    match = _TRIAL.match(message)
    return int(match[1]) if match else None


def trial_of(request: ReceivedRequest) -> int | None:
    """The trial a request to the fake Gemini belongs to (from its last user message)."""
    contents = request.body.get("contents") or [{}]
    parts = contents[-1].get("parts") or [{}]
    return trial_number(parts[0].get("text", ""))


def request_texts(request: ReceivedRequest) -> list[str]:
    """The system prompt and every content text of a generate request, as sent."""
    system = request.body.get("systemInstruction", {}).get("parts", [])
    contents = request.body.get("contents", [])
    texts = [part.get("text", "") for part in system]
    return texts + [part.get("text", "") for c in contents for part in c.get("parts", [])]


@dataclass(frozen=True, slots=True)
class SoakConfig:
    trials: int = 1000
    seed: int = 0
    users: int = 20
    chats_per_user: int = 3
    concurrency: int = 16
    workers: int = 2
    time_limit: float = 900.0  # seconds for the trial phase; unstarted trials are reported


@dataclass
class TrialResult:
    plan: TrialPlan
    user_id: str
    chat_id: str
    status_code: int = 0
    body: Any = None
    events: list[dict[str, Any]] = field(default_factory=list)
    stop_status: int | None = None
    left: bool = False  # the client disconnected on purpose
    error: str | None = None  # what went wrong in the client, if anything
    started: float = 0.0
    first_chunk: float | None = None
    stop_sent: float | None = None
    stop_answered: float | None = None
    ended: float = 0.0
    settled: float | None = None  # a left reply: when its reservation was gone

    @property
    def chunks(self) -> list[str]:
        return [e["chunk"] for e in self.events if is_piece(e)]

    @property
    def final(self) -> dict[str, Any] | None:
        """The end or error event, when the client saw one."""
        last = self.events[-1] if self.events else None
        return last if last and (last.get("done") or last.get("error")) else None
