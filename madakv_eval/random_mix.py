"""Random mixes of legal requests for the engine-level property test (tests/test_random_mix.py) and
its longer script (scripts/fuzz_engine.py); ``draw_xargs`` also feeds the server fuzzer.

A mix draws, per request: every policy, budgets from 1 token to more than the prompt (ints) and
fractions, ``page_aligned`` both ways, windows, re-compression intervals, both prefill modes, prompt
lengths up to max_model_len, prompts over a few shared prefixes, n > 1, prompt logprobs, and aborts
at random steps. Run against an engine whose KV pool is small, it preempts too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from madakv_vllm.config import POLICIES


def draw_xargs(rng: random.Random, prompt_len: int) -> dict:
    """Legal ``madakv_*`` per-request settings, extreme ones included."""
    x: dict = {"madakv_policy": rng.choice(POLICIES)}
    if rng.random() < 0.5:
        x["madakv_budget"] = rng.choice([1, rng.randrange(1, 2 * prompt_len + 2), prompt_len, prompt_len + 1,
                                         max(prompt_len - 1, 1), rng.randrange(1, 200)])
    else:
        x["madakv_budget"] = rng.choice([0.001, 0.05, 0.2, 0.5, 0.9, 0.97, 0.998, 0.998, 1.0,
                                         round(rng.uniform(0.001, 1.0), 3)])
    if rng.random() < 0.4:
        x["madakv_window"] = rng.choice([1, 4, 16, 32, 64, 256])
    if rng.random() < 0.4:
        x["madakv_recompress_interval"] = rng.choice([0, 1, 3, 8, 32])
    chunked = rng.random() < 0.3
    if chunked:
        x["madakv_prefill_eviction"] = "chunked"
    elif rng.random() < 0.5:
        x["madakv_page_aligned"] = False
    if rng.random() < 0.15:
        x["madakv_min_prompt_len"] = rng.choice([0, 64, 2048])
    return x


@dataclass
class MixRequest:
    name: str
    prompt_token_ids: list[int]
    max_tokens: int
    xargs: dict
    n: int = 1
    prompt_logprobs: int | None = None
    abort_at: int | None = None  # engine step after which it is aborted

    @property
    def greedy(self) -> bool:
        return self.n == 1

    @property
    def end_mode(self) -> bool:
        return self.xargs.get("madakv_prefill_eviction", "end") == "end"

    def sampling_params(self):
        from vllm import SamplingParams

        if self.greedy:
            return SamplingParams(max_tokens=self.max_tokens, temperature=0, ignore_eos=True, logprobs=2,
                                  prompt_logprobs=self.prompt_logprobs, extra_args=dict(self.xargs))
        return SamplingParams(max_tokens=self.max_tokens, n=self.n, temperature=0.8, seed=7, ignore_eos=True,
                              prompt_logprobs=self.prompt_logprobs, extra_args=dict(self.xargs))


@dataclass
class Mix:
    seed: int
    requests: list[MixRequest] = field(default_factory=list)
    # engine steps after which one running request (``rng`` picks) is preempted as vLLM's scheduler
    # preempts when its pool runs out, on top of the preemptions a small pool causes
    preempt_at: list[int] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)


def draw_mix(seed: int, vocab: range, max_model_len: int, num_requests: int, num_prefixes: int = 3) -> Mix:
    """``num_requests`` requests over ``num_prefixes`` shared prefixes; every prompt + output fits
    ``max_model_len``."""
    rng = random.Random(seed)
    prefixes = [[rng.choice(vocab) for _ in range(rng.randrange(32, max_model_len // 2))] for _ in range(num_prefixes)]
    mix = Mix(seed, preempt_at=sorted(rng.sample(range(2, 120), 8)), rng=random.Random(seed + 1))
    for i in range(num_requests):
        out = rng.choice([1, 2, 8, 24, 40, 100, 160])
        n = rng.choice([1, 2, 33, 64, 200, 500, 700, 900, max_model_len - out, max_model_len - out])
        n = max(1, min(n, max_model_len - out))
        if rng.random() < 0.6:  # over a shared prefix (a prefix-cache hit, once one is cached)
            base = rng.choice(prefixes)[:n]
            ids = base + [rng.choice(vocab) for _ in range(n - len(base))]
        else:
            ids = [rng.choice(vocab) for _ in range(n)]
        mix.requests.append(MixRequest(
            name=f"mix{seed}-{i}", prompt_token_ids=ids, max_tokens=out, xargs=draw_xargs(rng, n),
            n=2 if rng.random() < 0.15 else 1,
            prompt_logprobs=1 if rng.random() < 0.1 else None,
            abort_at=rng.randrange(1, 40) if rng.random() < 0.15 else None))
    return mix


def same_up_to_a_tie(got, want, tol: float = 1e-3) -> bool:
    """Two greedy completions (vLLM CompletionOutputs with logprobs >= 2) are the same, or first
    differ where ``got``'s two best tokens were within ``tol`` of each other (a preempted request
    recomputes its KV in other kernel calls than it decoded them with: last-bit differences)."""
    for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)):
        if a != b:
            lp = got.logprobs[i]
            return b in lp and abs(lp[a].logprob - lp[b].logprob) < tol
    return len(got.token_ids) == len(want.token_ids)
