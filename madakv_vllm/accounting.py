"""Page accounting shared by the scheduler (which frees pages) and the workers
(which pack retained KV into the pages that stay). Both sides must agree without
exchanging messages, so everything here is a pure function of the request's
compression length, its effective config and the block size.

Layout: after a compression event at logical length T, a request keeps logical
blocks [0, P) plus every block from floor(T / bs) on (the partly filled tail and
all later decode blocks); blocks [P, floor(T / bs)) go back to vLLM's pool.
All (layer, KV head) sequences are packed, across layers, into the sub-blocks of
the kept pages (a page of one layer holds one bs-token sub-block per KV head).
With L*H*B retained entries in total, per-(layer, head) rounding wastes less
than L*H sub-blocks, i.e. less than one page, hence P = ceil(B / bs) + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from madakv_vllm.config import MadaKVConfig


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CompressionPlan:
    comp_len: int  # C: logical length when the prompt's compression ran
    budget: int  # B: average retained entries per (layer, KV head)
    keep_pages: int  # P: pages [0, P) kept for the packed prefix
    interval: int  # re-compress every `interval` generated tokens (0: never)

    def event_len(self, length: int) -> int:
        """Logical length T of the latest compression event at or before ``length``."""
        if self.interval <= 0 or length <= self.comp_len:
            return self.comp_len
        return self.comp_len + (length - self.comp_len) // self.interval * self.interval

    def freed_range(self, event_len: int, block_size: int) -> tuple[int, int]:
        """Logical block range [first, last) that is freed after an event at ``event_len``."""
        tail = event_len // block_size
        return min(self.keep_pages, tail), tail

    def owned_blocks(self, event_len: int, num_blocks: int, block_size: int) -> list[int]:
        """Indices (into the request's block list) of the blocks the request still owns."""
        first, tail = self.freed_range(event_len, block_size)
        return list(range(first)) + list(range(tail, num_blocks))


def plan_compression(cfg: MadaKVConfig, comp_len: int, block_size: int) -> CompressionPlan | None:
    """The plan for a request whose prompt finished prefilling at length ``comp_len``,
    or None when nothing is evicted (policy ``full``, short prompt, budget >= length)."""
    if cfg.policy == "full" or comp_len < max(cfg.min_prompt_len, 1):
        return None
    budget = cfg.budget_tokens(comp_len)
    if budget >= comp_len:
        return None
    return CompressionPlan(
        comp_len=comp_len,
        budget=budget,
        keep_pages=cdiv(budget, block_size) + 1,
        interval=cfg.recompress_interval,
    )
