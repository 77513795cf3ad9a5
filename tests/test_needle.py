"""`pyllm-kv eval --task needle`: prompt building, scoring and outputs without a model
(a whitespace tokenizer stands in for the model's), then one short real run."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from pyllm_kv import cli
from pyllm_kv import needle as nd
from pyllm_kv import needle_prompt as npm
from pyllm_kv.errors import UnknownCacheFormat


def ws_tokenize(text):
    """One token per whitespace-separated word."""
    return text.split()


def render(user_text):
    return f"<user> {user_text} <assistant> {npm.ANSWER_PREFIX}"


def synthetic_lines(n_lines=400, seed=1):
    """Dictionary-like filler: entries of 1-4 lines of 3-12 words, blank lines between."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while len(out) < n_lines:
        for _ in range(int(rng.integers(1, 5))):
            out.append(" ".join(f"w{i}_{j}" for j in range(int(rng.integers(3, 13)))) + "\n")
        out.append("\n")
        i += 1
    return out


def filler_tokens_around_needle(prompt_text, passkey):
    """(filler words before the needle, filler words after it), counted in the text itself."""
    needle = npm.NEEDLE.format(key=passkey)
    assert prompt_text.count(needle) == 1
    start = prompt_text.index(npm.INSTRUCTION) + len(npm.INSTRUCTION)
    end = prompt_text.index(npm.QUESTION)
    before, after = prompt_text[start:end].split(needle)
    return len(before.split()), len(after.split())


# ---------------------------------------------------------------- prompt building


@pytest.mark.parametrize("length", [120, 400, 1500])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_prompt_reaches_length_with_needle_at_depth(length, depth):
    lines = synthetic_lines()
    starts = npm.paragraph_starts(lines)
    (trial,) = npm.make_trials(length, depth, 1, seed=3, starts=starts)
    p = npm.build_prompt(lines, trial, ws_tokenize, render)
    longest_line = max(len(ln.split()) for ln in lines)
    assert p.n_tokens == len(ws_tokenize(p.text)) <= length
    assert p.n_tokens > length - longest_line - 1  # one more line would not have fit
    before, after = filler_tokens_around_needle(p.text, trial.passkey)
    assert before + after == p.filler_tokens
    assert abs(before / p.filler_tokens - depth) <= longest_line / p.filler_tokens + 1e-9
    assert abs(p.depth_actual - before / p.filler_tokens) < 1e-9
    if depth == 0.0:
        assert before == 0
    if depth == 1.0:
        assert after == 0
    # the filler starts at the trial's paragraph and runs on in corpus order
    first_words = p.text[p.text.index(npm.INSTRUCTION) + len(npm.INSTRUCTION):].split()
    first_filler = next(w for w in first_words if w.startswith("w") and "_" in w)
    assert first_filler == lines[trial.start_line].split()[0] or depth == 0.0


def test_prompt_wraps_around_a_short_corpus():
    lines = synthetic_lines(n_lines=30)
    trial = npm.Trial(length=2000, depth=0.5, index=0, passkey="12345", start_line=10)
    p = npm.build_prompt(lines, trial, ws_tokenize, render)
    assert 2000 - 13 < p.n_tokens <= 2000
    assert p.n_filler_lines > len(lines)


def test_prompt_too_short_for_the_question_fails():
    lines = synthetic_lines()
    trial = npm.Trial(length=30, depth=0.5, index=0, passkey="12345", start_line=0)
    with pytest.raises(ValueError, match="cannot hold"):
        npm.build_prompt(lines, trial, ws_tokenize, render)


def test_filler_of_blank_lines_fails_instead_of_looping():
    trial = npm.Trial(length=500, depth=0.5, index=0, passkey="12345", start_line=0)
    with pytest.raises(ValueError, match="too short"):
        npm.build_prompt(["\n", "\n"], trial, ws_tokenize, render)


def test_trials_are_seeded_per_cell():
    starts = list(range(0, 1000, 7))
    a = npm.make_trials(1024, 0.25, 4, seed=0, starts=starts)
    assert a == npm.make_trials(1024, 0.25, 4, seed=0, starts=starts)  # same for every format
    assert a[:2] == npm.make_trials(1024, 0.25, 2, seed=0, starts=starts)  # more trials extend a cell
    assert [t.passkey for t in a] != [t.passkey for t in npm.make_trials(1024, 0.5, 4, seed=0, starts=starts)]
    assert [t.passkey for t in a] != [t.passkey for t in npm.make_trials(1024, 0.25, 4, seed=1, starts=starts)]
    assert len({t.passkey for t in a}) == 4
    for t in a:
        assert re.fullmatch(r"[1-9]\d{4}", t.passkey) and t.start_line in starts


def test_paragraph_starts():
    lines = ["A, n. one\n", "more\n", "\n", "B, v. two\n", "\n", "\n", "C\n"]
    assert npm.paragraph_starts(lines) == [0, 3, 6]


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("answer,ok", [
    (" 58213.", True),
    ("58213", True),
    (" 58213. Remember it.", True),
    ("The secret passkey is 58213", True),
    (" 5821", False),  # partial
    (" 582134", False),  # longer
    (" 58,213", False),  # not the number as given
    (" 12345, or 58213", False),  # the first number counts
    (" 85213", False),
    ("", False),
    (" I don't know.", False),
])
def test_scoring(answer, ok):
    assert npm.is_correct(answer, "58213") is ok


def test_extract_answer():
    assert npm.extract_answer(" 58213.") == "58213"
    assert npm.extract_answer("is 0042 and 7") == "0042"
    assert npm.extract_answer("none") is None


# ---------------------------------------------------------------- settings


def test_parse_lengths_and_depths():
    assert nd.parse_lengths("2k, 1k,4096,1k") == [1024, 2048, 4096]
    assert nd.parse_lengths([512]) == [512]
    assert nd.parse_lengths("0.5k") == [512]
    assert nd.parse_depths("1,0,0.25") == [0.0, 0.25, 1.0]
    for bad in ("", "abc", "10"):
        with pytest.raises(nd.NeedleError):
            nd.parse_lengths(bad)
    for bad in ("", "x", "1.5", "-0.1", "nan"):
        with pytest.raises(nd.NeedleError):
            nd.parse_depths(bad)


def test_bad_settings_fail_before_any_model_run(monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(nd, "_load", no_model)
    with pytest.raises(UnknownCacheFormat):
        nd.evaluate(formats="f16,q9_9")
    with pytest.raises(nd.NeedleError):
        nd.evaluate(formats="f16", lengths="1k", trials=0)
    # (the model's header is read by a stub: gguf-py takes seconds over a 152k vocabulary)
    monkeypatch.setattr(nd, "_model_info", lambda model: fake_info("m.gguf", 8192))
    with pytest.raises(nd.NeedleError, match="trained context of 8192"):
        nd.evaluate(formats="f16", lengths="1k,8k")
    # through the CLI: one line, exit code 2
    assert cli.main(["eval", "--task", "needle", "--formats", "f16,bogus", "--no-progress"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["eval", "--task", "nope"])


def test_eval_task_switch_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--task", "needle", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--lengths" in out and "--depths" in out and "--ngl" in out and "--task" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--help"])  # the default task keeps its options, and lists --task
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--chunks" in out and "needle" in out and "--lengths" not in out


# ---------------------------------------------------------------- the runner loop, outputs


def fake_info(path, n_ctx_train):
    """What nd._model_info reads from a GGUF header, for a model that does not exist."""
    return SimpleNamespace(path=path, name=path.split(".")[0], n_ctx_train=n_ctx_train,
                           head_dim_k=64, head_dim_v=64)


class FakeModel:
    def close(self):
        pass


class FakeRunner:
    """Whitespace tokens; answers right unless the needle sits deep in a long prompt
    (so the per-depth and per-length summaries have something to tell apart)."""

    chat = True

    def __init__(self, model, max_new_tokens):
        self.model = model

    tokenize = staticmethod(ws_tokenize)
    render = staticmethod(render)

    def answer(self, tokens):
        text = " ".join(tokens)
        key = re.search(r"passkey is (\d+)\. Remember", text).group(1)
        before = text.index(key) / len(text)
        wrong = len(tokens) > 300 and 0.3 < before < 0.7
        return (f" {int(key) + 1 if wrong else key}.", 0.5, 0.1, 3)


@pytest.fixture
def fake_run(monkeypatch):
    loads = []

    def fake_load(model, k, v, *a, **kw):
        loads.append((k, v))
        return FakeModel()

    monkeypatch.setattr(nd, "_Runner", FakeRunner)
    monkeypatch.setattr(nd, "_load", fake_load)
    monkeypatch.setattr(nd, "_check_available", lambda pairs: None)
    monkeypatch.setattr(nd, "_bits_record", lambda *a: {"bits_per_value": 4.5})
    monkeypatch.setattr(nd, "_model_info", lambda model: fake_info("fake.gguf", 32768))

    monkeypatch.setattr(nd.corpus, "load_text", lambda: "".join(synthetic_lines(2000)))
    return loads


def test_evaluate_writes_json_after_every_cell_and_resumes(fake_run, tmp_path):
    out = tmp_path / "needle.json"
    seen = []

    def on_cell(cell):
        # the file on disk already holds this cell
        data = json.loads(out.read_text())
        seen.append(sum(len(r["cells"]) for r in data["results"]))

    res = nd.evaluate(formats="f16,q4_0", lengths="200,600", depths="0,0.5,1", trials=2,
                      json_out=out, progress=False, on_cell=on_cell)
    assert seen == list(range(1, 13))
    assert fake_run == [("f16", "f16"), ("q4_0", "q4_0")]  # one load per format
    assert res["complete"] and json.loads(out.read_text())["complete"]
    f16 = res["results"][0]
    assert f16["accuracy_by_length"] == {"200": 1.0, "600": pytest.approx(4 / 6)}
    assert f16["accuracy_by_depth"] == {"0": 1.0, "0.5": 0.5, "1": 1.0}
    cell = next(c for c in f16["cells"] if c["length"] == 600 and c["depth"] == 0.5)
    assert cell["correct"] == 0 and cell["n"] == 2 and not cell["trials"][0]["correct"]
    # both formats saw the same prompts
    keys = [[t["passkey"] for c in r["cells"] for t in c["trials"]] for r in res["results"]]
    assert keys[0] == keys[1]

    # resume: nothing left to run, no model loaded
    fake_run.clear()
    again = nd.evaluate(formats="f16,q4_0", lengths="200,600", depths="0,0.5,1", trials=2,
                        json_out=out, resume=True, progress=False)
    assert fake_run == [] and again["results"][0]["cells"] == f16["cells"]
    assert again["results"][0]["bits_per_value"] == 4.5  # kept from the first run
    # a new length: only its cells run
    more = nd.evaluate(formats="f16,q4_0", lengths="200,600,800", depths="0,0.5,1", trials=2,
                       json_out=out, resume=True, progress=False)
    assert fake_run == [("f16", "f16"), ("q4_0", "q4_0")]
    assert sum(len(r["cells"]) for r in more["results"]) == 18
    with pytest.raises(nd.NeedleError, match="other settings"):
        nd.evaluate(formats="f16", lengths="200", depths="0", trials=3, json_out=out, resume=True, progress=False)


def test_table_and_heatmap(fake_run, tmp_path):
    res = nd.evaluate(formats="f16,q4_0,kv4,kv3", lengths="200,600", depths="0,0.5,1", trials=2,
                      progress=False)
    table = nd.format_table(res)
    assert "| f16 | 4.5 | 100% (6/6) | 67% (4/6) | 83% (10/12) |" in table
    assert "| kv3 | 0.5 | 100% (2/2) | 0% (0/2) |" in table
    png = nd.plot(res, tmp_path / "sub" / "heat.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    # --report redraws from a JSON without running anything
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert cli.main(["eval", "--task", "needle", "--report", str(tmp_path / "r.json"),
                     "--plot", str(tmp_path / "r.png"), "--markdown", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").read_text() == table + "\n" and (tmp_path / "r.png").stat().st_size > 1000
    # a partial result (one format unfinished) still draws
    res["results"][1]["cells"] = res["results"][1]["cells"][:2]
    nd.plot(res, tmp_path / "partial.png")
    assert "–" in nd.format_table(res)


# ---------------------------------------------------------------- real run


def test_real_run_smollm2(lib_dir, model_path, tmp_path):
    """SmolLM2-135M-Instruct, f16, ~512-token prompts, needle first and last: the
    pipeline end to end (template, prefill, greedy answer, JSON, plot)."""
    from pyllm_kv import corpus

    try:
        corpus.load_text()
    except corpus.CorpusNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "n.json"
    rc = cli.main(["eval", "--task", "needle", "--formats", "f16", "--lengths", "512", "--depths", "0,1",
                   "--trials", "1", "--json", str(out), "--plot", str(tmp_path / "n.png"), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["complete"] and res["settings"]["chat_template"] is True
    (rec,) = res["results"]
    assert [(c["length"], c["depth"]) for c in rec["cells"]] == [(512, 0.0), (512, 1.0)]
    for c in rec["cells"]:
        (t,) = c["trials"]
        assert 480 <= t["prompt_tokens"] <= 512
        assert t["new_tokens"] >= 1 and t["prefill_s"] > 0
    # SmolLM2 finds a needle placed right before the question
    assert rec["cells"][1]["correct"] == 1, rec["cells"][1]["trials"][0]["answer"]
    assert (tmp_path / "n.png").stat().st_size > 1000
