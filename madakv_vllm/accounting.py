"""Page accounting shared by the scheduler (which frees pages) and the workers
(which pack retained KV into the pages that stay). Both sides must agree without
exchanging messages, so everything here is a pure function of the request's
compression length, its effective config and the block size.

Layout: after a compression event at logical length T, a request keeps P logical
blocks (``CompressionPlan.kept_blocks``, [0, P) unless it was compressed during
prefill, below) plus every block from floor(T / bs) on (the partly filled tail and
all later decode blocks); the other blocks before floor(T / bs) go back to vLLM's pool.
All (layer, KV head) sequences are packed, across layers, into the sub-blocks of
the kept pages (a page of one layer holds one bs-token sub-block per KV head), so
the P pages hold L*H*P sub-blocks.

Page-aligned budgets (``page_aligned``, the default): the retained KV shares the
partly filled tail page instead of needing pages of its own. With r = T mod bs
entries in the tail page, every (layer, head) keeps r + a multiple of bs entries
(``Policy.begin(granule=bs, offset=r)``): its whole sub-blocks fill the P packed
pages exactly and its last r entries sit in its sub-block of the tail page, so the
request holds P + 1 pages, like a stock request of P*bs + r tokens. Decode tokens
then cross sub-block boundaries exactly when vLLM's logical length crosses a page
boundary, so the page vLLM appends is the one every head needs. The per-head budget
B = P*bs + r is the requested one rounded to nearest, never more than 15% above it,
never below the window (+ sinks): after compression a request holds at most
1.15 x budget x stock plus one partly filled page.
Without alignment, per-head counts are arbitrary: rounding each of the L*H sequences
up to whole sub-blocks wastes less than L*H sub-blocks, i.e. less than one page,
hence P = ceil(B / bs) + 1 next to the tail. Either way a compression happens only if it frees a
page (P < floor(T / bs)); otherwise the request keeps its stock pages.

A request preempted after its compression resumes by recomputing its prompt and generated tokens.
Its chunks stop at every length at which it was compressed (``RequestPlan.chunk_limit``): at
its prompt's end it selects from the same prompt with the same window queries, and its generated
tokens are then appended to every (layer, head) sequence as they were when it decoded them.

Eviction during chunked prefill (``prefill_eviction: chunked``): a request is also
compressed when a prefill chunk ends at T before the prompt does, if that frees a
page, to the budget of the T tokens seen so far (``next_plan``). A chunk of c tokens
appended to a head's r' + j*bs entries makes r + (j + d)*bs, with r = T mod bs and d
the pages the tail moved, so every count keeps the page-aligned form. The candidates
are the kept blocks, then the blocks from the previous tail page to the new one; the
first P of them are kept, so kept blocks need not be a prefix. A request then holds
about its budget plus one chunk while it prefills (``peak_pages``), which is what
admission reserves for it.

Fresh pages (vLLM's prefix caching on, ``RequestPlan.prefix_caching``): vLLM hashes a full
page when its chunk is scheduled, before the model writes it, and a freed hashed page stays
findable by later requests, so a page that holds prompt KV must never be rewritten. A request
compressed at the prompt's end at length C then packs into P fresh pages that the scheduler
appends to its block list in the step that reaches C, right after the prompt's own cdiv(C, bs)
pages (``CompressionPlan.fresh_at``); the prompt's full pages [0, C // bs) are all freed,
still hashed, and the request's later pages (its decode tail) are never hashed. The block list
is then P pages longer than vLLM's logical blocks: logical block j >= fresh_at sits at list
index j + P (``CompressionPlan.block_index``), and the manager asks vLLM for those P pages on
top of every later allocation (``RequestPlan.extra_pages``). A request that hits the prefix
cache recomputes at least its last ``window`` prompt tokens (``RequestPlan.max_cache_hit``), so
it observes with its own queries and keeps exactly what it would keep without the hit. Eviction
during chunked prefill rewrites the pages it keeps in place, so those requests neither read nor
add to the prefix cache.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

from madakv_vllm.config import MadaKVConfig

#: Most a page-aligned budget may exceed the requested one (the memory bound: 1.15 x budget x stock).
ALIGN_SLACK = 1.15


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class EventKind(enum.Enum):
    """Why a request is compressed at a length (both sides derive it, :meth:`RequestPlan.advance`)."""

    CHUNK = "chunk"  # a prefill chunk ended before the prompt did ("chunked" mode)
    PROMPT = "prompt"  # the prompt is fully computed
    RECOMPRESS = "recompress"  # recompress_interval tokens generated since the last compression


@dataclass(frozen=True)
class CompressionPlan:
    comp_len: int  # C: logical length when this compression ran
    budget: int  # B: average retained entries per (layer, KV head)
    keep_pages: int  # P: pages that hold the packed entries (``kept_blocks``), besides the tail
    interval: int  # re-compress every `interval` generated tokens (0: never)
    granule: int = 1  # page-aligned: every (layer, head) count is offset + a multiple of this (bs)
    # Block-list indices of the packed entries; None: the first P, [0, P). A request compressed after
    # earlier prefill chunks keeps the blocks it already kept plus the first new ones.
    kept: tuple[int, ...] | None = None
    # Fresh pages: the P packed pages were appended at this block-list index (cdiv(C, bs)), and every
    # later logical block sits P places further on (``block_index``). None: packed in place.
    fresh_at: int | None = None

    def kept_blocks(self) -> tuple[int, ...]:
        return self.kept if self.kept is not None else tuple(range(self.keep_pages))

    def event_len(self, length: int) -> int:
        """Logical length T of the latest compression event at or before ``length``."""
        if self.interval <= 0 or length <= self.comp_len:
            return self.comp_len
        return self.comp_len + (length - self.comp_len) // self.interval * self.interval

    def block_index(self, logical_block: int) -> int:
        """Index into the request's block list of vLLM's logical block ``logical_block``."""
        if self.fresh_at is None or logical_block < self.fresh_at:
            return logical_block
        return logical_block + self.keep_pages

    def offset(self, length: int) -> int:
        """Entries per (layer, head) that live in the tail page after an event at ``length``."""
        return length % self.granule

    def owned_blocks(self, event_len: int, num_blocks: int, block_size: int) -> list[int]:
        """Indices (into the request's block list) of the blocks the request still owns after an
        event at ``event_len``: the kept blocks, and every block from the tail page on."""
        tail = self.block_index(event_len // block_size)
        return [b for b in self.kept_blocks() if b < tail] + list(range(tail, num_blocks))

    def freed_runs(self, event_len: int, block_size: int) -> list[tuple[int, int]]:
        """Block-list ranges [first, last) freed after an event at ``event_len``: every block
        before the tail page that is not kept, as maximal runs."""
        tail = self.block_index(event_len // block_size)
        runs, start = [], 0
        for b in sorted(b for b in self.kept_blocks() if b < tail):
            if b > start:
                runs.append((start, b))
            start = b + 1
        if start < tail:
            runs.append((start, tail))
        return runs


@dataclass(kw_only=True)
class RequestPlan:
    """What the scheduler and the workers both know of one request. Each side calls
    :meth:`advance` with the request's computed length every step (the workers in the step that
    reaches it, the scheduler when it next schedules the request): the same lengths in the same
    order, hence the same events and plans, without a message."""

    cfg: MadaKVConfig
    num_prompt_tokens: int
    prefix_caching: bool = False  # vLLM's prefix caching is on: compress into fresh pages
    decided: bool = False  # the prompt is fully computed (its plan is final)
    plan: CompressionPlan | None = None  # the latest compression's plan; None: nothing evicted yet
    event_len: int = 0  # logical length of the latest compression event
    seen: int = 0  # the largest length given to advance()

    def advance(self, length: int, block_size: int) -> EventKind | None:
        """The compression event at ``length``, if any; updates :attr:`plan` then. Idempotent for a
        length already seen."""
        if length <= self.seen:
            return None
        self.seen = length
        if self.decided:
            if self.plan is None or self.plan.event_len(length) <= self.event_len:
                return None
            self.event_len = self.plan.event_len(length)
            return EventKind.RECOMPRESS
        final = length >= self.num_prompt_tokens
        if not final and not self.cfg.chunked:
            return None
        self.decided = final
        if length > self.num_prompt_tokens and self.plan is None:
            # Past its prompt at once: a resumed request whose hit covered its output, which only a
            # request its prompt does not compress gets (``max_cache_hit``). The scheduler sees the
            # hit's length and the workers the step's: both decide as at the prompt, no compression.
            return None
        nxt = next_plan(self.cfg, length, block_size, self.plan, final, fresh=self.fresh_pages)
        if nxt is None:
            return None
        self.plan, self.event_len = nxt, length
        return EventKind.PROMPT if final else EventKind.CHUNK

    @property
    def fresh_pages(self) -> bool:
        """Compress into fresh pages: prefix caching is on (chunked-prefill eviction never reads or
        adds to the prefix cache, and packs in place)."""
        return self.prefix_caching and not self.cfg.chunked

    def prompt_plan(self, block_size: int) -> CompressionPlan | None:
        """The plan of the compression at the prompt's end, as :meth:`advance` will make it
        (every chunk stops there: :meth:`chunk_limit`); None when the prompt is not compressed."""
        return plan_compression(self.cfg, self.num_prompt_tokens, block_size)

    def chunk_limit(self, computed: int, block_size: int) -> int | None:
        """Longest length a step that starts at ``computed`` may reach: the next length at which
        the request is compressed (its prompt's end, then every ``recompress_interval`` tokens), so
        every event sees exactly the tokens it would see in an uninterrupted run. Only a request
        replaying its output after preemption has chunks that would run past one; None: no limit.
        Pure in ``computed`` (the scheduler asks before it calls :meth:`advance` for that length)."""
        p = self.num_prompt_tokens
        if computed < p:
            return p
        interval = self.cfg.recompress_interval
        if interval <= 0 or (self.plan is None and self.prompt_plan(block_size) is None):
            return None
        return p + ((computed - p) // interval + 1) * interval

    def extra_pages(self, length: int, block_size: int) -> int:
        """Pages the request holds beyond vLLM's cdiv(length, bs) once its computed length reaches
        ``length``: the fresh pages, from the step that reaches the prompt's compression on.
        Pure in ``length`` until the scheduler sees that step (``advance``)."""
        if not self.fresh_pages:
            return 0
        if self.plan is not None:
            return self.plan.keep_pages if self.plan.fresh_at is not None else 0
        if self.decided or length < self.num_prompt_tokens:
            return 0
        plan = self.prompt_plan(block_size)
        return 0 if plan is None else plan.keep_pages

    def max_cache_hit(self, num_tokens: int, block_size: int) -> int | None:
        """Most tokens of a ``num_tokens``-token request that may come from the prefix cache, or
        None for stock's rule: a request compressed at its prompt's end recomputes its prompt's
        last ``window`` tokens (their queries choose what it keeps), also when it resumes after a
        preemption with generated tokens that another request's pages may cover; one evicting
        during chunked prefill reads nothing from the cache."""
        if not self.prefix_caching:
            return None
        if self.cfg.chunked:
            return 0
        if self.prompt_plan(block_size) is None:
            return None
        return max(min(num_tokens, self.num_prompt_tokens) - self.cfg.window, 0)

    def max_cached_tokens(self, block_size: int) -> int | None:
        """Most tokens whose pages vLLM may hash, or None for no limit (never compressed, like
        stock): the prompt's full pages before its compression; none in chunked mode."""
        if not self.prefix_caching:
            return None
        if self.cfg.chunked:
            return 0
        if self.plan is None:
            return None
        return self.plan.comp_len // block_size * block_size


def next_plan(cfg: MadaKVConfig, length: int, block_size: int, prev: CompressionPlan | None,
              final: bool, fresh: bool = False) -> CompressionPlan | None:
    """The plan of a compression at ``length`` after ``prev`` (None: not compressed yet), or None
    when there is none: nothing to evict, or (before the prompt's end) no page would be freed.
    ``fresh``: a first compression packs into P fresh pages appended after the prompt's pages.

    A compressed request owns its kept blocks and every block from its tail page on; at the next
    event its candidates are those kept blocks then the blocks up to the new tail page, and it keeps
    the first P of them, P the pages of the budget at ``length`` (at most all candidates)."""
    target = plan_compression(cfg, length, block_size)
    interval = cfg.recompress_interval if final else 0
    if prev is None:
        if target is None:
            return None
        if fresh:
            at = cdiv(length, block_size)
            return dataclasses.replace(target, interval=interval, fresh_at=at,
                                       kept=tuple(range(at, at + target.keep_pages)))
        return dataclasses.replace(target, interval=interval)
    assert not fresh, "fresh pages: one compression at the prompt's end, then re-compressions"
    tail_prev, tail = prev.comp_len // block_size, length // block_size
    candidates = prev.kept_blocks() + tuple(range(tail_prev, tail))
    pages = len(candidates) if target is None else min(target.keep_pages, len(candidates))
    if not final and pages == len(candidates):
        return None
    return CompressionPlan(length, pages * block_size + length % block_size, pages, interval, block_size,
                           kept=candidates[:pages])


def peak_pages(cfg: MadaKVConfig, num_tokens: int, new_tokens: int, block_size: int, max_chunk: int) -> int:
    """Most pages a request of ``num_tokens`` (then ``new_tokens`` generated) holds at once in
    "chunked" mode, prefilled in chunks of at most ``max_chunk`` tokens: its budget's pages, its tail
    page and one of rounding slack (or the uncompressed ``min_prompt_len`` prefix), plus one chunk or
    the tokens generated between re-compressions, whichever is more. Never more than stock's."""
    stock = cdiv(num_tokens + new_tokens, block_size)
    plan = plan_compression(cfg, num_tokens, block_size)
    if not cfg.chunked or plan is None:
        return stock
    # +2: the tail page, and page-aligned budgets of shorter lengths may round one page above this one's
    held = max(plan.keep_pages + 2, cdiv(cfg.min_prompt_len, block_size) + 1)
    decode = cfg.recompress_interval if cfg.recompress_interval > 0 else new_tokens
    growth = cdiv(max(max_chunk, decode), block_size) + 1
    return min(stock, held + growth)


def aligned_pages(budget: int, offset: int, forced: int, block_size: int) -> int:
    """Whole pages P per head, so that P * bs + offset is the requested ``budget`` (tokens)
    rounded to nearest, at most ALIGN_SLACK x budget, and at least the ``forced`` tokens."""
    nearest = int(math.floor((budget - offset) / block_size + 0.5))
    most = int(math.floor((ALIGN_SLACK * budget - offset) / block_size + 1e-9))
    # 0: the tail page alone may hold the whole budget (nearest/most go negative when budget < offset)
    return max(cdiv(max(forced - offset, 0), block_size), 0, min(nearest, most))


def plan_compression(cfg: MadaKVConfig, comp_len: int, block_size: int) -> CompressionPlan | None:
    """The plan for a request whose prompt finished prefilling at length ``comp_len``,
    or None when nothing is evicted (policy ``full``, short prompt, budget >= length)."""
    if cfg.policy == "full" or comp_len < max(cfg.min_prompt_len, 1):
        return None
    budget = cfg.budget_tokens(comp_len)
    if budget >= comp_len:
        return None
    if cfg.page_aligned:
        offset = comp_len % block_size
        pages = aligned_pages(budget, offset, cfg.window + cfg.sinks, block_size)
        plan = CompressionPlan(comp_len, pages * block_size + offset, pages, cfg.recompress_interval, block_size)
    else:
        pages = cdiv(budget, block_size) + 1
        plan = CompressionPlan(comp_len, budget, pages, cfg.recompress_interval)
    # A compression that frees no page would hold as many pages as stock or more (and with fresh
    # pages need more block-table entries than stock's twice): the request runs as stock.
    return plan if pages < comp_len // block_size else None
