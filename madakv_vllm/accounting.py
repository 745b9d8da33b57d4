"""Page accounting shared by the scheduler (which frees pages) and the workers
(which pack retained KV into the pages that stay). Both sides must agree without
exchanging messages, so everything here is a pure function of the request's
compression length, its effective config and the block size.

Layout: after a compression event at logical length T, a request keeps logical
blocks [0, P) plus every block from floor(T / bs) on (the partly filled tail and
all later decode blocks); blocks [P, floor(T / bs)) go back to vLLM's pool.
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
hence P = ceil(B / bs) + 1 next to the tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from madakv_vllm.config import MadaKVConfig

#: Most a page-aligned budget may exceed the requested one (the memory bound: 1.15 x budget x stock).
ALIGN_SLACK = 1.15


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CompressionPlan:
    comp_len: int  # C: logical length when the prompt's compression ran
    budget: int  # B: average retained entries per (layer, KV head)
    keep_pages: int  # P: pages [0, P) kept for the packed prefix
    interval: int  # re-compress every `interval` generated tokens (0: never)
    granule: int = 1  # page-aligned: every (layer, head) count is offset + a multiple of this (bs)

    def event_len(self, length: int) -> int:
        """Logical length T of the latest compression event at or before ``length``."""
        if self.interval <= 0 or length <= self.comp_len:
            return self.comp_len
        return self.comp_len + (length - self.comp_len) // self.interval * self.interval

    def offset(self, length: int) -> int:
        """Entries per (layer, head) that live in the tail page after an event at ``length``."""
        return length % self.granule

    def freed_range(self, event_len: int, block_size: int) -> tuple[int, int]:
        """Logical block range [first, last) that is freed after an event at ``event_len``."""
        tail = event_len // block_size
        return min(self.keep_pages, tail), tail

    def owned_blocks(self, event_len: int, num_blocks: int, block_size: int) -> list[int]:
        """Indices (into the request's block list) of the blocks the request still owns."""
        first, tail = self.freed_range(event_len, block_size)
        return list(range(first)) + list(range(tail, num_blocks))


@dataclass(kw_only=True)
class RequestPlan:
    """What the scheduler and the workers both know of one request. Each side calls
    :meth:`prompt_done` with the request's computed length every step; the plan is decided once,
    in the step that completes the prompt, identically on both sides."""

    cfg: MadaKVConfig
    num_prompt_tokens: int
    decided: bool = False
    plan: CompressionPlan | None = None  # None: nothing is evicted

    def prompt_done(self, length: int, block_size: int) -> bool:
        """True exactly once: when ``length`` first reaches the prompt (the prompt's compression
        runs at that length); decides :attr:`plan` then."""
        if self.decided or length < self.num_prompt_tokens:
            return False
        self.decided = True
        self.plan = plan_compression(self.cfg, length, block_size)
        return True


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
        if pages >= comp_len // block_size:  # would free no page
            return None
        return CompressionPlan(comp_len, pages * block_size + offset, pages, cfg.recompress_interval, block_size)
    return CompressionPlan(
        comp_len=comp_len,
        budget=budget,
        keep_pages=cdiv(budget, block_size) + 1,
        interval=cfg.recompress_interval,
    )
