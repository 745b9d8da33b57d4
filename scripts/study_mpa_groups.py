#!/usr/bin/env python3
"""Study: should MPA give video frames and still images ONE budget group or TWO?

Question. MadaKV's MPA (madakv_vllm/policies/madakv.py) treats each modality id of
madakv_vllm/config.py (text 0, image 1, video 2, audio 3) as its own group: each KV head's
non-forced slots are split over the groups by that head's attention mass on each, then filled with
the top scores within each group. Video frames therefore compete with still images only through
that mass split, never token against token. Would merging the two (one visual group) keep more
answers, or fewer?

Method. The accuracy proxies (scripts/train_proxy_vlm.py; v1: 4 layers, 2 KV heads, 3 tasks; v2:
8 layers, 4 KV heads, 4 tasks) take images only and were never trained on video tokens, so real
video would be meaningless to them. The question is asked at the provenance level instead: the
prompts, pixels and model stay the same, only the modality ids MPA groups by change, in this
process only (the product is not edited):

* rule for "frames": an image is a FRAME when it is adjacent to another image, i.e. nothing but
  the ``<|vision_end|><|vision_start|>`` pair lies between their placeholders (no filler sentence,
  no label, no needle sentence) -- a run of >= 2 consecutive images, like consecutive video
  frames. Every other image is a STILL. On these prompts (a filler sentence precedes each image
  with probability 0.7) about half the grey images are frames; the image needle's 4-image strip is
  always frames; a comparison image or a labelled picture is a frame or a still by chance;
* arm ``frames_video`` (A): frame tokens carry the VIDEO id, stills the IMAGE id -- two visual
  groups, the product's behaviour if the frames came from a video;
* arm ``all_image`` (B): every image token carries the IMAGE id (the unmodified run) -- one visual
  group, what merging video into images would do.

The relabelling wraps ``modality_array`` as madakv_vllm/integration/eviction.py imported it: each
request is recognised by its placeholders' offsets (precomputed from the prompt tokens; every
relabelled request must match exactly one prompt, checked), and in arm A the frame spans' tokens
get the VIDEO id. A wrapper around ``WorkerKV.compact`` records, at each prompt's compression, the
fraction of frame, still, text and needle tokens kept over all (layer, KV head) pairs.
Both arms run in one in-process vLLM engine per proxy (``--attention-backend madakv``, server
policy ``full``, exact budgets ``page_aligned: false``, like scripts/eval_proxy.py), policy
``madakv`` with every default, per-request budget in ``SamplingParams.extra_args``, greedy;
scoring (exact match of the whole answer) and the McNemar / paired-bootstrap helpers are
scripts/eval_proxy.py's. Prompts: the **dev** split only (``proxy_tasks.make_dataset(...,
split="dev")``, 24-64 images), the same prompts in both arms, so every comparison is paired: per
proxy x budget (and per task) the difference A - B with a 95% paired bootstrap interval (prompts
resampled within each task) and McNemar's exact test on the discordant prompts; pooled over both
proxies and all budgets with eval_proxy's ``pooled_means``. Per-task accuracies carry 95% Wilson
intervals. Each proxy runs in a child process (one engine at a time). Sanity check in the JSON
(``arm_B_matches_committed_dev_run``): arm B must answer prompt for prompt as the committed dev
runs of madakv (docs/data/proxy-dev-ablation8-v1.json, -v2.json) did.

Command (611 s, about 10 min, on 2 busy CPU cores, AMD EPYC; see "seconds" in the JSON):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \\
        .venv/bin/python scripts/study_mpa_groups.py --n-per-task 50 --budgets 0.2 0.1 0.5 \\
        --out docs/data/study_mpa_groups_dev.json

What it can show: on these proxies, whether splitting one visual modality's per-head budget by
provenance (two mass-proportional shares, top-k within each) keeps more or fewer answers than
one shared top-k over all image tokens, and how it moves retention between frames and stills.
What it cannot show: anything about real video (temporal redundancy between real frames, video
tokens' own attention statistics, a model that treats frames differently from images) -- the
proxy never saw video, and its "frames" are ordinary images by position. Small synthetic models;
no real VLM was available.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import eval_proxy as ep  # noqa: E402  (scoring, McNemar, bootstrap helpers, engine settings)
from madakv_eval import proxy_tasks as pt  # noqa: E402
from madakv_vllm.config import IMAGE, VIDEO  # noqa: E402

SPLIT = "dev"  # never the test split: this is a tuning-side study
ARM_SPLIT, ARM_MERGED = "frames_video", "all_image"  # A: two visual groups; B: one (the reference)
ARMS = (ARM_SPLIT, ARM_MERGED)
for _arm in ARMS:  # both arms are the default madakv policy; only the modality ids differ
    ep.VARIANTS[_arm] = {"policy": "madakv"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxies", nargs="+", default=["v1", "v2"], choices=sorted(pt.PROXY_VERSIONS))
    p.add_argument("--n-per-task", type=int, default=50)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.1, 0.5])
    p.add_argument("--seed", type=int, default=0, help="base seed of the dev split")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "data" / "study_mpa_groups_dev.json")
    p.add_argument("--one", choices=sorted(pt.PROXY_VERSIONS), help=argparse.SUPPRESS)  # child: one proxy
    p.add_argument("--raw-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- provenance
def frame_images(sample: pt.Sample) -> list[bool]:
    """Per image of ``sample`` (prompt order): True when the image is directly adjacent to another
    image in the prompt (no text part between them)."""
    flags = []
    prev_was_image = False
    for part in sample.parts:
        if isinstance(part, pt.ImageSpec):
            if prev_was_image:
                flags[-1] = True
                flags.append(True)
            else:
                flags.append(False)
            prev_was_image = True
        elif part:  # any non-empty text breaks a run
            prev_was_image = False
    return flags


def image_offsets(ids: list[int], image_token: int) -> list[int]:
    """First placeholder token of each image (vLLM's Qwen2-VL ``mm_position.offset``)."""
    return [i for i, t in enumerate(ids) if t == image_token and (i == 0 or ids[i - 1] != image_token)]


def provenance(samples, tokenizer) -> tuple[dict, list[dict]]:
    """(signature -> sample index, per-sample masks). A request's signature is the tuple of its
    image placeholders' offsets; masks are bool tensors over the prompt tokens."""
    import torch

    image_token = tokenizer.convert_tokens_to_ids(pt.IMAGE_TOKEN["qwen2vl"])
    by_signature, info = {}, []
    for i, s in enumerate(samples):
        ids = pt.prompt_token_ids(s, tokenizer)
        offsets = image_offsets(ids, image_token)
        frames = frame_images(s)
        assert len(offsets) == len(frames) == s.n_images, (len(offsets), len(frames), s.n_images)
        sig = tuple(offsets)
        if sig in by_signature:
            raise SystemExit(f"prompts {by_signature[sig]} and {i} share image offsets: cannot tell them apart")
        by_signature[sig] = i
        n = len(ids)
        frame_mask = torch.zeros(n, dtype=torch.bool)
        still_mask = torch.zeros(n, dtype=torch.bool)
        for off, is_frame in zip(offsets, frames):
            (frame_mask if is_frame else still_mask)[off:off + pt.TOKENS_PER_IMAGE] = True
        needle = torch.zeros(n, dtype=torch.bool)
        needle[pt.needle_token_positions(s, tokenizer)] = True
        info.append({
            "n_tokens": n, "frame_offsets": [o for o, f in zip(offsets, frames) if f],
            "frames": frame_mask, "stills": still_mask, "text": ~(frame_mask | still_mask), "needle": needle,
            "needle_frames": needle & frame_mask, "needle_stills": needle & still_mask,
            "n_frame_images": sum(frames), "n_images": len(frames),
        })
    return by_signature, info


class StudyState:
    """What the wrappers read and write: the running arm and config, and what they saw."""

    def __init__(self, by_signature, info):
        self.by_signature, self.info = by_signature, info
        self.arm = ARM_MERGED
        self.config = None
        self.relabelled: dict[str, set] = {}  # config -> sample indices whose frames got VIDEO
        self.unmatched = 0
        self.kept: dict[str, dict[int, dict]] = {}  # config -> sample -> fraction kept per token class

    def sample_of(self, spans) -> int | None:
        sig = tuple(sorted(int(f.mm_position.offset) for f in spans))
        return self.by_signature.get(sig)


def install_patches(state: StudyState) -> None:
    """In this process only: relabel frame spans VIDEO in arm A; record retention at each prompt's
    compression."""
    import torch

    from madakv_vllm.accounting import EventKind
    from madakv_vllm.integration import eviction

    original_modality_array = eviction.modality_array
    original_compact = eviction.WorkerKV.compact

    def modality_array(num_tokens, spans):
        spans = list(spans)
        out = original_modality_array(num_tokens, spans)
        if state.arm != ARM_SPLIT or not spans:
            return out
        i = state.sample_of(spans)
        if i is None:
            state.unmatched += 1
            return out
        for off in state.info[i]["frame_offsets"]:
            seg = out[off:off + pt.TOKENS_PER_IMAGE]
            seg[seg == IMAGE] = VIDEO
        state.relabelled.setdefault(state.config, set()).add(i)
        return out

    def compact(self, ev):
        if ev.from_stock and ev.kind is EventKind.PROMPT and state.config is not None:
            i = state.sample_of(ev.req.mm_features)
            if i is not None:
                masks = state.info[i]
                n = masks["n_tokens"]
                kept = {k: 0 for k in ("frames", "stills", "text", "needle", "needle_frames", "needle_stills")}
                pairs = 0
                for layer in ev.kept:
                    for idx in layer:
                        keep = torch.zeros(n, dtype=torch.bool)
                        keep[idx[idx < n]] = True
                        for k in kept:
                            kept[k] += int((keep & masks[k]).sum())
                        pairs += 1
                state.kept.setdefault(state.config, {})[i] = {
                    k: (v / (pairs * int(masks[k].sum())) if int(masks[k].sum()) else None) for k, v in kept.items()}
        return original_compact(self, ev)

    eviction.modality_array = modality_array
    eviction.WorkerKV.compact = compact


# ----------------------------------------------------------------------------- one proxy
def run_one(args) -> None:
    """Child process: one proxy, every arm x budget, raw results to ``--raw-out``."""
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    version = pt.PROXY_VERSIONS[args.one]
    model = REPO / "models" / version["model"]
    if not (model / "model.safetensors").is_file():
        print(f"{model} missing: rebuilding from {pt.default_assets_dir(args.one)}", flush=True)
        pt.rebuild_proxy_model(model, pt.default_assets_dir(args.one))
    tasks = tuple(json.loads((model / pt.MODEL_INFO).read_text())["tasks"])
    tok = AutoTokenizer.from_pretrained(str(model))
    samples = pt.make_dataset(tasks, args.n_per_task, ep.EVAL_IMAGES, split=SPLIT, base_seed=args.seed)
    by_signature, info = provenance(samples, tok)
    state = StudyState(by_signature, info)
    install_patches(state)

    llm = LLM(
        model=str(model), attention_backend="madakv",
        additional_config={"madakv": {"policy": "full", "page_aligned": False}},
        enforce_eager=True, block_size=32, dtype="float32", seed=0, max_model_len=4096,
        max_num_batched_tokens=4096, limit_mm_per_prompt={"image": ep.EVAL_IMAGES[1]}, max_logprobs=-1,
    )
    prompts = [pt.vllm_prompt(s) for s in samples]
    configs = [("full", None)] + [(arm, b) for b in args.budgets for arm in ARMS]
    results, seconds = {}, {}
    vocab = len(tok)
    t0 = time.time()
    for name, budget in configs:
        state.arm = name if name in ARMS else ARM_MERGED
        state.config = f"{name}@{budget}"
        extra = {"madakv_" + k: v for k, v in ep.config_fields(name).items()}
        if budget is not None:
            extra["madakv_budget"] = budget
        sps = [SamplingParams(max_tokens=pt.CODE_LEN[s.task] + 1, temperature=0.0, logprobs=-1, ignore_eos=True,
                              extra_args=extra) for s in samples]
        tc = time.time()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        results[(name, budget)] = [
            (list(o.outputs[0].token_ids), [ep._logprob_vector(lp, vocab) for lp in o.outputs[0].logprobs])
            for o in outs]
        seconds[state.config] = round(time.time() - tc, 1)
        print(f"[{args.one}] {state.config}: {len(prompts)} prompts in {seconds[state.config]} s", flush=True)
    vllm_s = time.time() - t0
    del llm

    # Every arm-A request was recognised and relabelled; no other arm was touched.
    for b in args.budgets:
        got = state.relabelled.get(f"{ARM_SPLIT}@{b}", set())
        if len(got) != len(samples):
            raise SystemExit(f"{ARM_SPLIT}@{b}: relabelled {len(got)} of {len(samples)} prompts")
    if state.unmatched or any(not k.startswith(ARM_SPLIT) for k in state.relabelled):
        raise SystemExit(f"relabelling leaked: unmatched {state.unmatched}, configs {sorted(state.relabelled)}")

    table = ep.score(samples, results, tok)
    retention = {}
    for key, per_sample in state.kept.items():
        cell = {}
        for t in tasks + ("all",):
            rows = [v for i, v in per_sample.items() if t == "all" or samples[i].task == t]
            cell[t] = {k: _mean_present([r[k] for r in rows]) for k in rows[0]} if rows else {}
            cell[t]["n"] = len(rows)
        retention[key] = cell
    frame_share = {t: _mean_present([info[i]["n_frame_images"] / info[i]["n_images"]
                                     for i, s in enumerate(samples) if s.task == t]) for t in tasks}
    needle_frames = {t: _mean_present([float(info[i]["needle_frames"].sum()) / max(1, float(info[i]["needle"].sum()))
                                       for i, s in enumerate(samples) if s.task == t]) for t in tasks}
    raw = {
        "proxy": args.one, "model": str(model.relative_to(REPO)), "split": SPLIT, "seed": args.seed,
        "tasks": list(tasks), "n_per_task": args.n_per_task, "images": list(ep.EVAL_IMAGES),
        "budgets": args.budgets, "policies": list(ARMS),
        "prompt_tokens": pt.summarize_lengths(samples, tok),
        "frame_image_share": frame_share, "needle_token_share_in_frames": needle_frames,
        "seconds": {"vllm": round(vllm_s, 1), "per_config": seconds},
        "table": table, "retention": retention,
    }
    args.raw_out.write_text(json.dumps(raw) + "\n")


def _mean_present(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- statistics
def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def paired_task(a: list[float], b: list[float], resamples: int, seed: int = 0) -> dict:
    """A - B over one task's prompts: difference, 95% paired bootstrap interval, McNemar."""
    rng = random.Random(seed)
    n = len(a)
    diffs = sorted(sum(a[j] - b[j] for j in (rng.randrange(n) for _ in range(n))) / n for _ in range(resamples))
    only_a = sum(x > y for x, y in zip(a, b))
    only_b = sum(y > x for x, y in zip(a, b))
    return {"diff": (sum(a) - sum(b)) / n + 0.0, "ci95": ep._ci95(diffs), "only_A_right": only_a, "only_B_right": only_b,
            "mcnemar_p": ep._mcnemar_exact(only_a, only_b)}


def analyse(raw: dict, resamples: int) -> dict:
    tasks = raw["tasks"]
    table = raw["table"]
    sample_tasks = [t for _ in range(raw["n_per_task"]) for t in tasks]  # make_dataset's interleaving
    samples = [SimpleNamespace(task=t) for t in sample_tasks]  # what paired_intervals reads
    per_budget = {}
    for b in raw["budgets"]:
        cell = {"tasks": {}}
        for arm in ARMS + ("full",):
            row = table[f"{arm}@{b if arm != 'full' else None}"]
            acc = row["acc_per_sample"]
            arm_cell = {}
            for t in tasks:
                v = [acc[i] for i, x in enumerate(sample_tasks) if x == t]
                arm_cell[t] = {"acc": sum(v) / len(v), "k": int(sum(v)), "n": len(v), "wilson95": wilson(int(sum(v)), len(v))}
            k, n = int(sum(acc)), len(acc)
            arm_cell["overall"] = {"acc": row["mean_acc"], "k": k, "n": n, "wilson95": wilson(k, n)}
            cell[arm] = arm_cell
        a_acc, b_acc = table[f"{ARM_SPLIT}@{b}"]["acc_per_sample"], table[f"{ARM_MERGED}@{b}"]["acc_per_sample"]
        for t in tasks:
            ix = [i for i, x in enumerate(sample_tasks) if x == t]
            cell["tasks"][t] = paired_task([a_acc[i] for i in ix], [b_acc[i] for i in ix], resamples)
        # mean over tasks (as eval_proxy's mean_acc); eval_proxy reports reference - policy = B - A
        p = ep.paired_intervals(samples, {k: table[k] for k in (f"{ARM_SPLIT}@{b}", f"{ARM_MERGED}@{b}")},
                                ARM_MERGED, resamples)[f"{ARM_SPLIT}@{b}"]
        cell["overall"] = {"diff": 0.0 - p["diff"], "ci95": [0.0 - p["ci95"][1], 0.0 - p["ci95"][0]] if p["ci95"] else None,
                           "only_A_right": p["only_other_right"], "only_B_right": p["only_reference_right"],
                           "mcnemar_p": p["mcnemar_p"]}
        cell["agree_A_B"] = sum(x == y for x, y in zip(a_acc, b_acc)) / len(a_acc)
        per_budget[str(b)] = cell
    return {"per_budget": per_budget, "sample_tasks": sample_tasks}


def committed_check(report: dict) -> dict:
    """Arm B is the unmodified policy: on the same dev prompts it must answer exactly as the
    committed dev run of madakv (docs/data/proxy-dev-ablation8-<proxy>.json) did, prompt for prompt.
    Per proxy x budget: True / False, or None where no committed row matches these prompts."""
    out = {}
    for v, d in report["proxies"].items():
        path = REPO / "docs" / "data" / f"proxy-dev-ablation8-{v}.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        same = all(old.get(k) == d[k] for k in ("split", "seed", "n_per_task", "images"))
        cells = {}
        for b in d["budgets"]:
            row = old.get("table", {}).get(f"madakv@{b}") if same else None
            cells[str(b)] = (row["acc_per_sample"] == d["table"][f"{ARM_MERGED}@{b}"]["acc_per_sample"]
                             if row else None)
        out[v] = {"against": str(path.relative_to(REPO)), "identical": cells}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        run_one(args)
        return
    t0 = time.time()
    raws = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.proxies:  # one engine at a time, each in its own process
            raw_out = Path(tmp) / f"{v}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", v, "--raw-out", str(raw_out),
                   "--n-per-task", str(args.n_per_task), "--seed", str(args.seed), "--threads", str(args.threads),
                   "--budgets", *map(str, args.budgets)]
            subprocess.run(cmd, check=True)
            raws.append(json.loads(raw_out.read_text()))
    proxies = {}
    for raw in raws:
        stats = analyse(raw, args.bootstrap)
        proxies[raw["proxy"]] = {**raw, "comparison": stats["per_budget"]}
        raw["_sample_tasks"] = stats["sample_tasks"]
    pooled = ep.pooled_means(raws, [r.pop("_sample_tasks") for r in raws], ARM_MERGED, args.bootstrap)
    pooled_diff = pooled[ARM_SPLIT]  # B - A
    report = {
        "question": "MPA: video frames and still images as two groups (A, frames_video) or one (B, all_image)?",
        "frame_rule": "an image directly adjacent to another image (only <|vision_end|><|vision_start|> between "
                      "their placeholders) is a frame (VIDEO id in arm A); every other image is a still (IMAGE id)",
        "split": SPLIT, "policy": "madakv (defaults)", "server": {"policy": "full", "page_aligned": False},
        "command": "VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python "
                   "scripts/study_mpa_groups.py " + " ".join(sys.argv[1:]),
        "seconds_total": round(time.time() - t0, 1),
        "pooled": {"A_mean": pooled[ARM_SPLIT]["mean"], "B_mean": pooled[ARM_MERGED]["mean"],
                   "diff_A_minus_B": 0.0 - pooled_diff["diff"],
                   "ci95": [0.0 - pooled_diff["ci95"][1], 0.0 - pooled_diff["ci95"][0]] if pooled_diff["ci95"] else None,
                   "over": "mean over every (proxy, budget) cell of the mean over tasks; prompts resampled within "
                           "each task, one resample per proxy shared by budgets and arms"},
        "proxies": proxies,
    }
    report["arm_B_matches_committed_dev_run"] = committed_check(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    print(f"\nwrote {args.out} ({report['seconds_total']:.0f} s)")


def print_report(report: dict) -> None:
    for v, d in report["proxies"].items():
        print(f"\n### proxy {v} (dev, {d['n_per_task']} prompts per task; frame share of images "
              + ", ".join(f"{t} {x:.2f}" for t, x in d["frame_image_share"].items()) + ")")
        print("| budget | task | A frames_video | B all_image | A - B [95% paired] | A-only/B-only, McNemar p |")
        print("|---|---|---:|---:|---:|---:|")
        for b, cell in d["comparison"].items():
            for t in d["tasks"] + ["overall"]:
                a, bb = cell[ARM_SPLIT][t], cell[ARM_MERGED][t]
                pr = cell["overall"] if t == "overall" else cell["tasks"][t]
                ci = pr["ci95"]
                print(f"| {b} | {t} | {a['acc']:.3f} [{a['wilson95'][0]:.2f}, {a['wilson95'][1]:.2f}] "
                      f"| {bb['acc']:.3f} [{bb['wilson95'][0]:.2f}, {bb['wilson95'][1]:.2f}] "
                      f"| {pr['diff']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] "
                      f"| {pr['only_A_right']}/{pr['only_B_right']}, p={pr['mcnemar_p']:.3g} |")
        for key, cell in d["retention"].items():
            r = cell["all"]
            fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            print(f"  kept {key}: frames {fmt(r['frames'])} stills {fmt(r['stills'])} text {fmt(r['text'])} "
                  f"needle {fmt(r['needle'])} (needle in frames {fmt(r['needle_frames'])}, in stills {fmt(r['needle_stills'])})")
    print(f"\narm B vs the committed dev runs of madakv (identical answers): {report['arm_B_matches_committed_dev_run']}")
    p = report["pooled"]
    print(f"\npooled over proxies and budgets: A {p['A_mean']:.4f}, B {p['B_mean']:.4f}, "
          f"A - B {p['diff_A_minus_B']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]")


if __name__ == "__main__":
    main()
