"""The accuracy proxy's statistics over finished runs (scripts/eval_proxy.py): the pooled mean that
the dev splits' selection rule compares, its paired bootstrap interval, and merging runs of the
same prompts made from different checkouts. Pure Python over synthetic reports; no model."""

from __future__ import annotations

import json

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def ev():
    return load_script("eval_proxy")


def _run(rows: dict[str, dict[float, list[float]]], tasks: list[str], budgets=(0.5, 0.2)) -> dict:
    """A report as eval_proxy writes it: rows[policy][budget] = exact match per prompt."""
    def mean_acc(acc):
        per = {t: [a for a, x in zip(acc, tasks) if x == t] for t in sorted(set(tasks))}
        return sum(sum(v) / len(v) for v in per.values()) / len(per)

    table = {"full@None": {"policy": "full", "budget": None, "acc_per_sample": [1.0] * len(tasks)}}
    for name, by_budget in rows.items():
        for b, acc in by_budget.items():
            table[f"{name}@{b}"] = {"policy": name, "budget": b, "acc_per_sample": acc, "mean_acc": mean_acc(acc)}
    return {"budgets": list(budgets), "table": table}


def test_pooled_mean_weights_every_run_and_budget_equally(ev):
    tasks1, tasks2 = ["a", "a", "b", "b"], ["a", "b", "c"]
    r1 = _run({"ref": {0.5: [1, 1, 1, 0], 0.2: [1, 0, 0, 0]}, "p": {0.5: [1, 1, 1, 1], 0.2: [0, 0, 0, 0]}}, tasks1)
    r2 = _run({"ref": {0.5: [1, 1, 0], 0.2: [0, 0, 0]}, "p": {0.5: [1, 0, 0], 0.2: [1, 1, 1]}}, tasks2)
    out = ev.pooled_means([r1, r2], [tasks1, tasks2], "ref", resamples=200)
    cells = [r["table"][f"{n}@{b}"]["mean_acc"] for r in (r1, r2) for b in (0.5, 0.2) for n in ("ref",)]
    assert out["ref"]["mean"] == pytest.approx(sum(cells) / 4)
    assert out["ref"]["diff"] == 0 and out["ref"]["ci95"] == [0, 0]
    # p: (1 + 0 + 1/3 + 1) / 4; ref: (0.75 + 0.25 + 2/3 + 0) / 4
    assert out["p"]["mean"] == pytest.approx((1 + 0 + 1 / 3 + 1) / 4)
    assert out["p"]["diff"] == pytest.approx((0.75 + 0.25 + 2 / 3) / 4 - (1 + 0 + 1 / 3 + 1) / 4)
    lo, hi = out["p"]["ci95"]
    assert lo <= out["p"]["diff"] <= hi


def test_pooled_interval_separates_a_policy_that_is_always_worse(ev):
    tasks = ["a"] * 30 + ["b"] * 30
    ref = {0.5: [1.0] * 60, 0.2: [1.0, 0.0] * 30}
    worse = {0.5: [0.0] * 60, 0.2: [0.0] * 60}
    out = ev.pooled_means([_run({"ref": ref, "w": worse}, tasks)], [tasks], "ref", resamples=500)
    assert out["w"]["diff"] == pytest.approx(0.75)
    assert 0 < out["w"]["ci95"][0] <= 0.75 <= out["w"]["ci95"][1] < 1


def test_pooled_skips_policies_missing_a_cell_and_needs_the_reference_everywhere(ev):
    tasks = ["a", "b"]
    r1 = _run({"ref": {0.5: [1, 0], 0.2: [0, 0]}, "p": {0.5: [1, 1], 0.2: [1, 1]}}, tasks)
    r2 = _run({"ref": {0.5: [1, 1], 0.2: [1, 0]}, "p": {0.5: [0, 1]}}, tasks)  # p lacks r2's 0.2
    out = ev.pooled_means([r1, r2], [tasks, tasks], "ref", resamples=50)
    assert set(out) == {"ref"}
    with pytest.raises(ValueError, match="reference 'p'"):
        ev.pooled_means([r1, r2], [tasks, tasks], "p", resamples=50)


def _saved(tmp_path, name: str, model: str, full: list[float], rows: dict) -> str:
    from madakv_eval import proxy_tasks as pt

    tasks = [s.task for s in pt.make_dataset(("text_needle",), 2, (24, 64), split="dev", base_seed=0)]
    run = _run(rows, tasks)
    run["table"]["full@None"]["acc_per_sample"] = full
    run.update(model=model, split="dev", seed=0, tasks=["text_needle"], n_per_task=2, images=[24, 64],
               policies=list(rows), variants={})
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return str(path)


def test_merge_accepts_the_same_model_from_another_checkout_and_checks_the_prompts(ev, tmp_path, capsys):
    a = _saved(tmp_path, "a.json", "/work/one/models/proxy-vlm", [1.0, 1.0], {"madakv": {0.5: [1, 0], 0.2: [0, 0]}})
    b = _saved(tmp_path, "b.json", "models/proxy-vlm", [1.0, 1.0], {"snapkv": {0.5: [1, 1], 0.2: [0, 1]}})
    merged = ev.merge_runs(ev.parse_args(["--merge", a, b, "--bootstrap", "20"]))
    assert {"madakv@0.5", "snapkv@0.2"} <= set(merged["table"])
    assert merged["paired"]["snapkv@0.2"]["diff"] == pytest.approx(-0.5)
    other = _saved(tmp_path, "c.json", "models/proxy-vlm2", [1.0, 1.0], {"snapkv": {0.5: [1, 1], 0.2: [0, 1]}})
    with pytest.raises(SystemExit, match="model"):
        ev.merge_runs(ev.parse_args(["--merge", a, other]))
    changed = _saved(tmp_path, "d.json", "models/proxy-vlm", [1.0, 0.0], {"snapkv": {0.5: [1, 1], 0.2: [0, 1]}})
    with pytest.raises(SystemExit, match="full cache answered differently"):
        ev.merge_runs(ev.parse_args(["--merge", a, changed]))


@pytest.mark.parametrize("text, fields, config", [
    ("mix75:mpa_mix=0.75", {"experimental_mpa_mix": 0.75}, {"experimental": {"mpa_mix": 0.75}}),
    ("d95:mpa_split=demand,theta=0.95", {"experimental_mpa_split": "demand", "theta": 0.95},
     {"experimental": {"mpa_split": "demand"}, "theta": 0.95}),
    ("py:hcc_mode=pyramid", {"experimental_hcc_mode": "pyramid"}, {"experimental": {"hcc_mode": "pyramid"}}),
    ("f05:experimental_hcc_min_scale=0.5", {"experimental_hcc_min_scale": 0.5}, {"experimental": {"hcc_min_scale": 0.5}}),
    ("ms:hcc_mode=streamed", {"hcc_mode": "streamed"}, {"hcc_mode": "streamed"}),
])
def test_variants_still_run_the_readings_moved_to_the_experimental_block(ev, text, fields, config):
    """The dev-split commands in docs/results.md name the readings as before they moved: a variant
    sets them in the experimental block, as per-request args (vLLM) and as a config (retained mass)."""
    from madakv_vllm.config import MadaKVConfig, resolve

    name, parsed = ev.parse_variant(text)
    assert (name, parsed) == (text.partition(":")[0], {"policy": "madakv", **fields})
    want = MadaKVConfig(policy="madakv", budget=0.2, **config)
    assert MadaKVConfig().with_overrides({**parsed, "budget": 0.2}) == want
    assert resolve(MadaKVConfig(), {"madakv_" + k: v for k, v in {**parsed, "budget": 0.2}.items()}) == want
