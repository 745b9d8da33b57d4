"""MileBench runner: MileBench's scorers (hand-computed values), loader and prompt builder on a
fake dataset in MileBench's layout, the OpenAI-API runner and CLI against a stub server, and one
end-to-end run through the offline LLM path with per-request MadaKV args."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from madakv_eval import milebench as mb

from conftest import load_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("ObjectShuffle", "IEdit", "TextNeedleInAHaystack")
EPS = 1e-8  # the `rouge` package's F denominator term


def _fake_module():
    return load_script("make_fake_milebench")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return _fake_module().make_fake_milebench(tmp_path_factory.mktemp("milebench"), samples=3)


def _perfect(task):
    return [mb.Prediction(task=task.name, sample_id=s.sample_id, pred_response=s.response, gt_response=s.response,
                          n_images=len(s.images), image_quantity_level=s.image_quantity_level) for s in task.samples]


# ------------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("raw, want", [
    ("Hello, World!", "hello world"),            # ", " touches a space -> deleted; "!" -> space, stripped
    ('He said "Yes."', "he said yes"),           # ' "' -> deleted; final period removed
    ("1,000 (approx.)", "1000 approx"),          # a digit,digit group: every punctuation mark deleted
    ("3.5 m.", "3.5 m"),                         # a period before a digit stays
    ("  'Left\tcup'\n", "left cup"),             # tabs/newlines -> spaces, quotes stripped, lower-cased
    ("a-b", "a b"),                              # "-" not touching a space -> space
    ("answer: B", "answer: b"),                  # ":" is not in MileBench's list
])
def test_normalize(raw, want):
    assert mb.normalize(raw) == want


def test_normalize_removes_at_most_32_periods():
    # evaluate.py passes re.UNICODE (32) as the `count` of periodStrip.sub
    assert mb.normalize("a." * 40) == "a" * 32 + "a." * 8


# ------------------------------------------------------------------------------- ROUGE-L
def test_rouge_l_single_sentence():
    # LCS("the cat is on the mat", "the cat sat on the mat") = "the cat on the mat"; distinct words
    # {the, cat, on, mat} = 4; distinct ref words 5, distinct candidate words 5 -> P = R = 0.8
    s = mb.rouge_l("the cat sat on the mat", "the cat is on the mat")
    assert s["p"] == pytest.approx(0.8) and s["r"] == pytest.approx(0.8)
    assert s["f"] == pytest.approx(2 * 0.8 * 0.8 / (0.8 + 0.8 + EPS), abs=1e-15)


def test_rouge_l_union_over_sentences():
    # candidate sentences "a b c" and "d e" against reference "a d e": LCSs "a" and "d e",
    # union {a, d, e} = 3; R = 3/3, P = 3/5 (distinct candidate words a b c d e)
    s = mb.rouge_l("a b c. d e", "a d e")
    assert (s["r"], s["p"]) == (pytest.approx(1.0), pytest.approx(0.6))
    assert s["f"] == pytest.approx(2 * 0.6 / (1.6 + EPS), abs=1e-15)


def test_rouge_l_counts_distinct_words_and_perfect_is_not_exactly_one():
    # "a a a" vs "a": one distinct word on each side -> P = R = 1
    assert mb.rouge_l("a a a", "a")["p"] == 1.0
    assert mb.rouge_l("x y", "x y")["f"] == pytest.approx(1 / (1 + EPS / 2), abs=1e-15)
    assert mb.rouge_l("x y", "x y")["f"] < 1.0
    assert mb.rouge_l("p q", "r s")["f"] == 0.0
    # "b a" vs "a b": LCS length 1 either way -> 0.5
    assert mb.rouge_l("b a", "a b")["f"] == pytest.approx(0.5, abs=1e-8)
    with pytest.raises(ValueError):
        mb.rouge_l("...", "a")


def test_score_open_ended():
    assert mb.score_open_ended("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(0.8, abs=1e-8)
    assert mb.score_open_ended("", "anything") == 0.0
    assert mb.score_open_ended("!!!", "anything") == 0.0  # normalises to ""
    with pytest.raises(ValueError):
        mb.score_open_ended("x", "  ")


# ------------------------------------------------------------------------------- multi-choice
CH = ["red apple", "green pear", "blue berry"]
OPTS = {"A": "red apple", "B": "green pear", "C": "blue berry"}


@pytest.mark.parametrize("pred, letter", [
    ("B", "B"),                                   # rule 3: a lone letter
    ("The answer is B. green pear", "B"),         # rule 1: "b green pear"
    ("I think it is a green pear", "B"),          # rule 2: option text, spaces ignored
    ("greenpear", "B"),
    ("(b)", "B"),                                 # parentheses -> spaces -> "b"
    ("a red apple or b green pear", "A"),         # rule 1: leftmost match wins
    ("", "C"),                                    # MileBench reads an empty answer as C
    ("AB", "AB"),                                 # fallback: every option letter in the text
    ("banana", "BAAA"),
])
def test_match_choice(pred, letter):
    assert mb.match_choice(mb.normalize(pred), OPTS) == letter


def test_score_multi_choice():
    assert mb.score_multi_choice("Answer: B. Green pear", "green pear", CH) == 1
    assert mb.score_multi_choice("green pear", "Green Pear", CH) == 1
    assert mb.score_multi_choice("A", "green pear", CH) == 0
    assert mb.score_multi_choice("banana", "green pear", CH) == 0
    assert mb.score_multi_choice("", "blue berry", CH) == 1  # the empty-answer quirk, mirrored
    with pytest.raises(ValueError):
        mb.score_multi_choice("A", "plum", CH)


def test_score_multi_choice_quirks_mirrored():
    # GPR1200-style, 30 options lettered chr(65 + i): option 2 is "C", option 28 is "]".
    choices = [f"class {i}" for i in range(30)]
    assert mb.score_multi_choice("class 2", "class 2", choices) == 1
    # normalising "] class 28" drops the "]", so rule 1 matches "class 28" and reads its first
    # character as the letter: C. MileBench scores this perfect answer 0, and so do we.
    assert mb.match_choice("class 28", {chr(65 + i): c for i, c in enumerate(choices)}) == "C"
    assert mb.score_multi_choice("class 28", "class 28", choices) == 0
    # rule 2 compares the matched text with the *escaped* option: an option with a "." never matches
    assert mb.score_multi_choice("3.5 kg", "3.5 kg", ["3.5 kg", "7 kg"]) == 0
    assert mb.score_multi_choice("7 kg", "7 kg", ["3.5 kg", "7 kg"]) == 1


def test_score_needle():
    assert mb.score_needle("The password is 7391.", "7391") == 1
    assert mb.score_needle("73912", "7391") == 0                       # needle: whole word only
    assert mb.score_needle("73912", "7391", exact_token=False) == 1     # MMCoQA: containment
    assert mb.score_needle("it is 7391!", "7391") == 1
    assert mb.score_needle("seven", "7391") == 0


def test_eval_type_dispatch():
    assert mb.eval_type("TextNeedleInAHaystack", "open-ended") == "needle"
    assert mb.eval_type("ImageNeedleInAHaystack", "multi-choice") == "needle"
    assert mb.eval_type("MMCoQA", "open-ended") == "contains"
    assert mb.eval_type("IEdit", "open-ended") == "open-ended"
    assert mb.eval_type("ObjectShuffle", "multi-choice") == "multi-choice"
    with pytest.raises(ValueError):
        mb.eval_type("X", "yes-no")


# ------------------------------------------------------------------------------- loader / prompts
def test_fake_dataset_layout_and_loader(data_root):
    assert mb.list_tasks(data_root) == sorted(TASKS)
    for name in TASKS:
        ann = json.loads((data_root / name / f"{name}.json").read_text())
        assert set(ann) == {"meta_data", "data"}
        assert {"task_instruction", "question_type"} <= set(ann["meta_data"])
        for d in ann["data"]:
            assert {"sample_id", "task_instruction_id", "task_instance", "response", "image_quantity_level"} <= set(d)
            assert {"context", "images_path"} <= set(d["task_instance"])
    tasks = {t.name: t for t in mb.load_tasks(data_root, "all")}
    assert {n: (t.eval_type, len(t.samples)) for n, t in tasks.items()} == {
        "ObjectShuffle": ("multi-choice", 3), "IEdit": ("open-ended", 3), "TextNeedleInAHaystack": ("needle", 3)}
    s = tasks["ObjectShuffle"].samples[1]
    assert s.instruction.startswith("Watch the frames")  # task_instruction_id 1
    assert len(s.images) == 4 and all(p.is_file() for p in s.images)
    assert s.images[0] == data_root / "ObjectShuffle" / "images" / "sample_1" / "0.png"
    assert [len(t.samples) for t in mb.load_tasks(data_root, "IEdit,ObjectShuffle", limit=2)] == [2, 2]
    with pytest.raises(FileNotFoundError, match="IEdit"):
        mb.load_task(data_root, "DocVQA")


def test_loader_rejects_response_outside_choices(tmp_path):
    root = _fake_module().make_fake_milebench(tmp_path, samples=1)
    p = root / "ObjectShuffle" / "ObjectShuffle.json"
    ann = json.loads(p.read_text())
    ann["data"][0]["response"] = "under the sofa"
    p.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match="not in choice_list"):
        mb.load_task(root, "ObjectShuffle")


def test_prompt_and_openai_content_interleave_images_in_placeholder_order(data_root):
    s = mb.load_task(data_root, "ObjectShuffle").samples[0]
    text, images = mb.build_prompt(s)
    assert text == (s.instruction + "\nFrame 1: <ImageHere> Frame 2: <ImageHere> Frame 3: <ImageHere> "
                    "After the cups are shuffled, where is the ball?\nChoice list: \nA. left cup\nB. middle box\n"
                    "C. right bowl\nD. back tray\nYour answer is: ")
    assert images == s.images
    content = mb.to_openai_content(text, images, image_url=str)
    assert [c["type"] for c in content] == ["text", "image_url", "text", "image_url", "text", "image_url", "text"]
    assert [c["image_url"]["url"] for c in content if c["type"] == "image_url"] == [str(p) for p in s.images]
    assert content[0]["text"] == s.instruction + "\nFrame 1: "
    assert content[2]["text"] == " Frame 2: "
    # the default: base64 PNG data URLs
    url = mb.build_messages(s)[0]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")


def _sample(context, n_images, choices=None, task="T"):
    return mb.Sample(task=task, sample_id=0, instruction="INS", context=context,
                     images=[Path(f"/i{k}.png") for k in range(n_images)], response="x", choices=choices)


def test_prompt_rules_tables_gpr_extra_and_missing_images():
    # {table#N} is an image slot; {image#N} past the image count stays literal text
    text, _ = mb.build_prompt(_sample("{table#1} and {image#2} then {image#3}", 2))
    assert text == "INS\n<ImageHere> and <ImageHere> then {image#3}"
    # GPR1200 lists its options without letters
    text, _ = mb.build_prompt(_sample("{image#1}", 1, choices=["u", "v"], task="GPR1200"))
    assert text.endswith("\nChoice list: \nu\nv\nYour answer is: ")
    # an image without a placeholder goes right after the instruction
    text, imgs = mb.build_prompt(_sample("look {image#1}", 2))
    content = mb.to_openai_content(text, imgs, image_url=str)
    assert [c.get("text") or c["image_url"]["url"] for c in content] == ["INS\n", "/i0.png", "look ", "/i1.png"]
    # a duplicated placeholder leaves a slot without an image: an error
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        mb.build_messages(_sample("{image#1} {image#1}", 1))


class CharTokenizer:
    """One token per character, so truncation lengths are easy to count by hand."""

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[ord(c) for c in text])

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("max_len, want_text, want_images", [
    (3 + 100, "INS\naaaa<ImageHere>bbbb<ImageHere>cc", 2),     # everything fits
    (3 + 8, "INS\nbbbb<ImageHere>cc", 1),                       # cc(2)+img(2)+bbbb(4)=8; no room for img 1
    (3 + 10, "INS\n<ImageHere>bbbb<ImageHere>cc", 2),           # ... + img 1 = 10; "aaaa" does not fit
    (3 + 1, "INS\nc", 0),                                       # nothing fits: tail of the last fragment
])
def test_left_truncation_like_milebench(max_len, want_text, want_images):
    s = _sample("aaaa{image#1}bbbb{image#2}cc", 2)
    text, images = mb.build_prompt(s, tokenizer=CharTokenizer(), max_context_len=max_len, n_tokens_per_image=2)
    assert text == want_text
    assert images == s.images[len(s.images) - want_images:]


# ------------------------------------------------------------------------------- task scoring
def test_perfect_predictions_score_one_and_summary(data_root):
    tasks = mb.load_tasks(data_root, "all")
    results = [mb.score_task(t, _perfect(t)) for t in tasks]
    for r in results:
        assert r["score"] == pytest.approx(1.0, abs=1e-7)
        assert r[r["metric"]] == r["score"] and r["n"] == 3 and r["n_errors"] == 0
    by = {r["task"]: r for r in results}
    assert by["IEdit"]["metric"] == "Rouge-L f" and by["IEdit"]["score"] < 1.0  # 0.99999999, as rouge gives
    assert by["ObjectShuffle"]["metric"] == "Accuracy" and by["ObjectShuffle"]["score"] == 1.0
    assert by["TextNeedleInAHaystack"]["score"] == 1.0
    assert by["ObjectShuffle"]["image_quantity_level-Accuracy"] == {"Few": 0.0, "Medium": 1.0, "Many": 1.0}
    overall = mb.summarize(results)
    assert overall["score"] == pytest.approx(1.0, abs=1e-7)
    assert set(overall["categories"]) == {"Realistic Temporal", "Realistic Semantic", "Diagnostic"}
    assert (overall["n_tasks"], overall["n_samples"], overall["n_errors"]) == (3, 9, 0)


def test_task_scores_hand_computed_and_errors_score_zero(data_root):
    t = mb.load_task(data_root, "ObjectShuffle")
    preds = _perfect(t)
    preds[0].pred_response = "Z"                         # wrong letter
    preds[1].error, preds[1].pred_response = "BadRequestError: too long", ""
    r = mb.score_task(t, preds)
    assert r["score"] == pytest.approx(1 / 3) and r["n_errors"] == 1
    assert [p.score for p in preds] == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="one to one"):
        mb.score_task(t, preds[:2])
    o = mb.load_task(data_root, "IEdit")
    preds = _perfect(o)
    preds[0].pred_response = "change the red square"     # 4 of 6 distinct words: P=1, R=4/6
    r = mb.score_task(o, preds)
    f0 = 2 * (4 / 6) / (1 + 4 / 6 + EPS)
    assert r["score"] == pytest.approx((f0 + 2 / (1 + EPS / 2)) / 3, abs=1e-12)


def test_request_args_validated_locally():
    assert mb.request_args() == {}
    assert mb.request_args("snapkv", 0.1) == {"madakv_policy": "snapkv", "madakv_budget": 0.1}
    assert mb.request_args(budget=256) == {"madakv_budget": 256}
    with pytest.raises(ValueError, match="budget"):
        mb.request_args("madakv", 1.5)
    with pytest.raises(ValueError, match="policy"):
        mb.request_args("lru")
    assert mb._budget("0.2") == 0.2 and mb._budget("512") == 512


# ------------------------------------------------------------------------------- OpenAI runner + CLI
class _Stub:
    """A minimal OpenAI-compatible server: answers from a first-image-URL -> text map, and 400s
    the requests whose first image is in `reject`. Records every request body."""

    def __init__(self, answers, reject=()):
        self.answers, self.reject, self.bodies = answers, set(reject), []
        stub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "stub-vlm", "object": "model", "created": 0,
                                                              "owned_by": "me"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                first = next(c["image_url"]["url"] for c in body["messages"][0]["content"] if c["type"] == "image_url")
                if first in stub.reject:
                    return self._send(400, {"error": {"message": "prompt too long", "type": "BadRequestError",
                                                      "code": 400}})
                self._send(200, {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": " " + stub.answers[first] + "\n"}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105},
                })

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _first_url(sample):
    return next(c["image_url"]["url"] for c in mb.build_messages(sample)[0]["content"] if c["type"] == "image_url")


def test_openai_runner_sends_xargs_and_scores(data_root):
    tasks = mb.load_tasks(data_root, "all")
    answers = {_first_url(s): s.response for t in tasks for s in t.samples}
    bad = tasks[0].samples[2]
    stub = _Stub(answers, reject={_first_url(bad)})
    try:
        xargs = mb.request_args("madakv", 0.2)
        res = mb.run(tasks, lambda samples: mb.run_openai(samples, api_base=stub.url, xargs=xargs, max_tokens=7,
                                                          concurrency=3))
    finally:
        stub.close()
    assert len(stub.bodies) == 9
    for b in stub.bodies:
        assert b["vllm_xargs"] == {"madakv_policy": "madakv", "madakv_budget": 0.2}
        assert (b["model"], b["max_tokens"], b["temperature"], b["min_tokens"]) == ("stub-vlm", 7, 0, 1)
    preds = res["predictions"][bad.task]
    assert preds[2]["error"].startswith("BadRequestError") and preds[2]["score"] == 0.0
    assert [p["pred_response"] for p in preds[:2]] == [s.response for s in tasks[0].samples[:2]]  # stripped
    assert preds[0]["prompt_tokens"] == 100 and preds[0]["completion_tokens"] == 5
    assert res["tasks"][bad.task]["score"] == pytest.approx(2 / 3)
    assert res["tasks"][bad.task]["n_errors"] == 1
    assert res["overall"]["score"] == pytest.approx((2 / 3 + 1 + 1) / 3, abs=1e-7)


def test_cli_api_mode_writes_results(data_root, tmp_path):
    tasks = mb.load_tasks(data_root, "all")
    stub = _Stub({_first_url(s): s.response for t in tasks for s in t.samples})
    out = tmp_path / "r" / "results.json"
    try:
        rc = mb.main(["--data-root", str(data_root), "--tasks", "IEdit,TextNeedleInAHaystack", "--policy", "snapkv",
                      "--budget", "64", "--api-base", stub.url, "--out", str(out), "--limit", "2"])
    finally:
        stub.close()
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"config", "tasks", "overall", "predictions"}
    assert res["config"]["request_args"] == {"madakv_policy": "snapkv", "madakv_budget": 64}
    assert res["config"]["mode"] == "api"
    assert list(res["tasks"]) == ["IEdit", "TextNeedleInAHaystack"]
    assert [len(v) for v in res["predictions"].values()] == [2, 2]
    assert res["overall"]["n_samples"] == 4 and res["overall"]["score"] == pytest.approx(1.0, abs=1e-7)
    assert all(b["vllm_xargs"] == {"madakv_policy": "snapkv", "madakv_budget": 64} for b in stub.bodies)


def test_fake_dataset_script_cli(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_fake_milebench.py"), str(tmp_path), "--samples", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert mb.list_tasks(tmp_path) == sorted(TASKS)
    assert len(json.loads((tmp_path / "IEdit" / "IEdit.json").read_text())["data"]) == 2


# ------------------------------------------------------------------------------- end to end (offline)
def test_end_to_end_offline_tiny_qwen2vl_with_madakv_request_args(engine, data_root):
    llm = engine("qwen2vl", {"policy": "full"})  # shared engine; per-request args switch it to madakv
    tasks = mb.load_tasks(data_root, "all", limit=2)
    xargs = mb.request_args("madakv", 0.2)
    res = mb.run(tasks, lambda samples: mb.run_offline(samples, llm, xargs=xargs, max_tokens=4, batch_size=4))
    assert list(res["tasks"]) == sorted(TASKS)
    for t in tasks:
        summary, preds = res["tasks"][t.name], res["predictions"][t.name]
        assert summary["n"] == 2 and summary["n_errors"] == 0 and 0.0 <= summary["score"] <= 1.0
        assert [p["sample_id"] for p in preds] == [s.sample_id for s in t.samples]
        for p, s in zip(preds, t.samples):
            assert p["error"] is None and isinstance(p["pred_response"], str)
            assert 1 <= p["completion_tokens"] <= 4
            assert p["n_images"] == len(s.images)
            assert p["prompt_tokens"] > 16 * len(s.images)  # each 48x40 image expands to >= 16 tokens
            assert 0.0 <= p["score"] <= 1.0
        # the same tasks scored with perfect answers
        assert mb.score_task(t, _perfect(t))["score"] == pytest.approx(1.0, abs=1e-7)
    assert res["overall"]["n_samples"] == 6 and res["overall"]["n_tasks"] == 3
    # per-request args reach the engine: an invalid policy is refused per sample, the run goes on
    bad = mb.run_offline(tasks[1].samples, llm, xargs={"madakv_policy": "lru"}, max_tokens=2)
    assert [("madakv_policy" in (p.error or "")) for p in bad] == [True, True]
