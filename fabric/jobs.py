"""Batch jobs: `python -m fabric run` reads JSONL requests and writes JSONL results.

Input, one JSON object a line: {"id", "prompt": [ids] or "text" (or "messages": a conversation),
"max_new_tokens", "temperature", "seed", "ignore_eos", "top_p", "top_k", "stop",
"stop_token_ids"}; only `prompt` (or `messages`) is required. Output, one line per input
line: {"id", "tokens", "text", "finish_reason", "metrics"}, or {"id", "line", "error",
"error_type"} for a line that failed (1-based `line`). A line without an id gets "line-<n>".

Resuming: ids with a result in the output file are skipped; failed ids are retried. The output
is compacted first (failed lines dropped, results kept), then appended to batch by batch, so
an interrupted job loses at most the batches in flight. Blank input lines are ignored.

Input is only ever parsed as JSON: nothing is unpickled or evaluated.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from fabric.result import Result

REQUEST_FIELDS = ("id", "prompt", "messages", "max_new_tokens", "temperature", "seed",
                  "ignore_eos", "top_p", "top_k", "stop", "stop_token_ids")
INVALID_LINE = "InvalidLine"        # error_type of a line that is not a well-typed request
IN_FLIGHT = 2                       # batches submitted at once: the next runs while one drains


class LineError(ValueError):
    """A line that cannot become a request; the message says why."""


@dataclass
class Line:
    number: int                     # 1-based
    id: str | int
    request: dict | None = None     # fields for `Fabric.submit`, without the id
    error: str | None = None
    error_type: str | None = None


# ---- parsing ---------------------------------------------------------------------------------
def default_id(number: int) -> str:
    return f"line-{number}"


def line_id(obj, number: int) -> str | int:
    """The line's own id (a string or an integer) or a stable one from its line number."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    if rid is None:
        return default_id(number)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise LineError(f"id must be a string or an integer, got {rid!r}")
    return rid


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_type(obj: dict, key: str, ok: Callable[[object], bool], what: str) -> None:
    if key in obj and not ok(obj[key]):
        raise LineError(f"{key} must be {what}, got {obj[key]!r}")


def check_fields(obj) -> dict:
    """Type-check a decoded line; return the request fields (without the id). Values the
    fabric judges (empty prompt, ids outside the vocabulary, max_new_tokens < 1) pass here."""
    if not isinstance(obj, dict):
        raise LineError(f"line must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise LineError(f"unknown field {unknown[0]!r} (allowed: {', '.join(REQUEST_FIELDS)})")
    if obj.get("messages") is not None:
        if not isinstance(obj["messages"], list):
            raise LineError("messages must be a list of {\"role\", \"content\"} objects")
    elif "prompt" not in obj or obj["prompt"] is None:
        raise LineError("prompt is missing")
    else:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) and not (isinstance(prompt, list)
                                                and all(map(_is_int, prompt))):
            raise LineError("prompt must be a string or a list of integer token ids")
    _check_type(obj, "max_new_tokens", _is_int, "an integer")
    _check_type(obj, "temperature", lambda t: _is_int(t) or isinstance(t, float), "a number")
    _check_type(obj, "seed", lambda s: s is None or _is_int(s), "an integer or null")
    _check_type(obj, "ignore_eos", lambda b: isinstance(b, bool), "true or false")
    return {k: v for k, v in obj.items() if k != "id"}


def parse_line(raw: bytes | str, number: int) -> Line:
    """One input line -> a `Line` holding either a request or an error. Never raises."""
    rid: str | int = default_id(number)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise LineError(f"malformed JSON: {e}") from None
        rid = line_id(obj, number)
        return Line(number, rid, request=check_fields(obj))
    except UnicodeDecodeError as e:
        return Line(number, rid, error=f"line is not UTF-8: {e}", error_type=INVALID_LINE)
    except (LineError, RecursionError) as e:
        msg = str(e) if isinstance(e, LineError) else "JSON nested too deeply"
        return Line(number, rid, error=msg, error_type=INVALID_LINE)


def read_lines(path: str) -> Iterator[Line]:
    """Parsed non-blank lines of a JSONL file, numbered from 1."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield parse_line(raw, number)


def count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


# ---- output ----------------------------------------------------------------------------------
def is_done(row) -> bool:
    return isinstance(row, dict) and "error" not in row and "tokens" in row and "id" in row


def compact_output(path: str) -> set:
    """Keep only the finished results of an earlier run in `path` (rewritten atomically);
    return their ids. Failed and unreadable lines are dropped: their ids run again."""
    if not os.path.exists(path):
        return set()
    done, kept = set(), []
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if is_done(row) and _hashable(row["id"]) and row["id"] not in done:
                done.add(row["id"])
                kept.append(raw.rstrip(b"\r\n") + b"\n")
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return done


def _hashable(rid) -> bool:
    return isinstance(rid, (str, int)) and not isinstance(rid, bool)


def _clean_error(message: str) -> str:
    """`Fabric.submit` prefixes errors with the request's index in its batch; in a job the
    line number says where, so the index only misleads."""
    return re.sub(r"^prompt \d+: ", "", message)


def output_row(line: Line, result: Result | None = None) -> dict:
    if result is None or result.error is not None:
        error = line.error if result is None else _clean_error(result.error)
        error_type = line.error_type if result is None else result.error_type
        return {"id": line.id, "line": line.number, "error": error, "error_type": error_type}
    return {"id": line.id, "tokens": result.tokens, "text": result.text,
            "finish_reason": result.finish_reason, "metrics": result.metrics}


# ---- progress and summary -----------------------------------------------------------------
@dataclass
class Summary:
    lines: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0                # already done in the output file
    tokens: int = 0
    seconds: float = 0.0            # excluding the fabric's start
    startup_s: float = 0.0          # starting or connecting to the fabric
    started: float = field(default_factory=time.perf_counter, repr=False)

    def tick(self) -> None:
        self.seconds = time.perf_counter() - self.started - self.startup_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, row: dict) -> None:
        self.lines += 1
        if "error" in row:
            self.errors += 1
        else:
            self.ok += 1
            self.tokens += len(row["tokens"])
        self.tick()

    def format(self) -> str:
        return (f"lines {self.lines + self.skipped}, ok {self.ok}, errors {self.errors}, "
                f"skipped {self.skipped} (already done), tokens {self.tokens}, "
                f"seconds {self.seconds:.2f}, tokens/s {self.tokens_per_s:.1f}"
                f" (+{self.startup_s:.2f} s to reach the fabric)")


class Progress:
    """A one-line progress bar redrawn with `\\r` on a terminal; silent elsewhere."""

    WIDTH = 24

    def __init__(self, total: int, stream=None, *, enabled: bool | None = None):
        self.total, self.stream = total, stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0

    def update(self, s: Summary, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < 0.1):
            return
        self._last = now
        done = s.lines + s.skipped
        frac = min(1.0, done / self.total) if self.total else 1.0
        bar = "#" * int(frac * self.WIDTH)
        self.stream.write(f"\r[{bar:<{self.WIDTH}}] {done}/{self.total} lines, {s.errors} errors, "
                          f"{s.tokens} tokens, {s.tokens_per_s:.1f} tokens/s ")
        self.stream.flush()

    def close(self, s: Summary) -> None:
        if self.enabled:
            self.update(s, force=True)
            self.stream.write("\n")
            self.stream.flush()


# ---- the job -------------------------------------------------------------------------------
def submit_batch(fab, requests: list[dict]) -> list[Result]:
    """`Fabric.submit(errors="return")`; a failure of the fabric itself (an actor died) fails
    the batch's lines instead of the whole job, and a re-run retries them."""
    try:
        return fab.submit(requests, errors="return")
    except Exception as e:                                   # noqa: BLE001 - recorded per line
        return [Result([], finish_reason="error", request_id=r["id"],
                       error=f"fabric failed: {e!r}", error_type=type(e).__name__)
                for r in requests]


class JobRunner:
    """Batches lines, keeps `IN_FLIGHT` batches running, writes rows in input order."""

    def __init__(self, open_fabric: Callable[[], object], out, summary: Summary,
                 progress: Progress, batch_size: int):
        self.open_fabric, self.out, self.summary = open_fabric, out, summary
        self.progress, self.batch_size = progress, batch_size
        self.tag = uuid.uuid4().hex[:8]          # request ids unique across concurrent jobs
        self.pool = ThreadPoolExecutor(max_workers=IN_FLIGHT)
        self.pending: deque[tuple[list[Line], Future | None]] = deque()

    def run(self, lines: Iterator[Line]) -> None:
        batch: list[Line] = []
        for line in lines:
            batch.append(line)
            if sum(ln.request is not None for ln in batch) >= self.batch_size:
                self._submit(batch)
                batch = []
        if batch:
            self._submit(batch)
        self._drain(keep=0)
        self.pool.shutdown()

    def _submit(self, batch: list[Line]) -> None:
        requests = [{"id": f"{self.tag}-{ln.number}", **ln.request}
                    for ln in batch if ln.request is not None]
        future = self.pool.submit(submit_batch, self._fabric(), requests) if requests else None
        self.pending.append((batch, future))
        self._drain(keep=IN_FLIGHT - 1)

    def _fabric(self):
        t0 = time.perf_counter()
        fab = self.open_fabric()
        self.summary.startup_s += time.perf_counter() - t0
        return fab

    def _drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            batch, future = self.pending.popleft()
            results = iter(future.result() if future is not None else [])
            for line in batch:
                self._write(output_row(line, next(results) if line.request is not None else None))
            self.out.flush()

    def _write(self, row: dict) -> None:
        self.out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.summary.add(row)
        self.progress.update(self.summary)


def pending_lines(lines: Iterator[Line], done: set, summary: Summary) -> Iterator[Line]:
    """Drop lines whose id is already done; a repeated id in the input fails its later lines."""
    first: dict = {}
    for line in lines:
        if line.id in first and line.error is None:
            line.request, line.error_type = None, INVALID_LINE
            line.error = f"duplicate id {line.id!r} (first on line {first[line.id]})"
        first.setdefault(line.id, line.number)
        if line.id in done and line.request is not None:
            summary.skipped += 1
            continue
        yield line


def run_job(open_fabric: Callable[[], object], input_path: str, output_path: str, *,
            batch_size: int = 32, progress: Progress | None = None) -> Summary:
    """Run every pending line of `input_path` into `output_path`. `open_fabric()` is called
    (in this thread) when the first request is ready, so a job with nothing to run starts none."""
    done = compact_output(output_path)
    summary = Summary()
    progress = progress or Progress(count_lines(input_path))
    with open(output_path, "a", encoding="utf-8") as out:
        runner = JobRunner(open_fabric, out, summary, progress, batch_size)
        runner.run(pending_lines(read_lines(input_path), done, summary))
    summary.tick()
    progress.close(summary)
    return summary
