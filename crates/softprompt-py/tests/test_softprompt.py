"""The Python binding, end to end on the tiny fixture models: what a user does from a notebook."""

import json
import multiprocessing
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import numpy
import pandas
import pytest

import softprompt
from conftest import MINILM, TOY, TOY_FLAGS, adapter_bytes, dev_rows, toy_rows, write_tsv


@pytest.fixture(scope="module")
def model(tiny_bert):
    return softprompt.Model.load(tiny_bert)


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "toy"
    return model.train(toy_rows(), out, dev=dev_rows(), progress=False, **TOY)


def test_train_evaluate_predict_round_trip(model, trained, tmp_path):
    assert model.architecture == "bert"
    assert trained.head == "classify"
    assert trained.labels == ["negative", "positive"]
    prompt = trained.prompt
    assert prompt.shape == (4, model.hidden_size) and prompt.dtype == numpy.float32
    prompt[:] = 0  # a copy: the adapter is unchanged
    assert numpy.abs(trained.prompt).sum() > 0
    assert trained.config["peft_type"] == "PROMPT_TUNING" and trained.config["labels"] == trained.labels

    reloaded = softprompt.Adapter.load(trained.path)
    report = model.evaluate(reloaded, toy_rows())
    assert set(report) >= {"accuracy", "macro_f1", "per_class", "confusion", "labels"}
    assert sum(map(sum, report["confusion"])) == 48
    assert report["accuracy"] > 0.5

    answers = model.predict(reloaded, ["a good film", "an awful film"])
    assert [set(a) for a in answers] == [{"label", "scores", "logits"}] * 2
    for a in answers:
        assert a["label"] in trained.labels
        assert abs(sum(a["scores"].values()) - 1) < 1e-5
        assert len(a["logits"]) == 2
    # an ensemble of two copies answers as one member, with both members' labels
    both = model.predict([reloaded, trained], ["a good film"])[0]
    assert both["members"] == [answers[0]["label"]] * 2
    assert both["scores"] == pytest.approx(answers[0]["scores"])


@pytest.mark.parametrize("method", [{}, {"method": "p-tuning", "encoder_hidden_size": 8}, {"method": "residual"},
                                    {"method": "prefix", "encoder_hidden_size": 8},
                                    {"method": "prefix", "prefix_projection": False}])
def test_the_same_seed_gives_the_cli_adapter_bytes(model, tiny_bert, cli, tmp_path, method):
    train = write_tsv(tmp_path / "train.tsv", toy_rows())
    dev = write_tsv(tmp_path / "dev.tsv", dev_rows())
    flags = [f for k, v in method.items() for f in (f"--{k.replace('_', '-')}", str(v).lower())]
    subprocess.run([cli, "train", "--model", tiny_bert, "--train", train, "--dev", dev,
                    "--output", str(tmp_path / "cli"), *TOY_FLAGS, *flags], check=True, capture_output=True)
    model.train(train, tmp_path / "py", dev=dev, progress=False, **TOY, **method)
    assert adapter_bytes(tmp_path / "py") == adapter_bytes(tmp_path / "cli")
    for f in ["adapter_config.json", "softprompt.json"]:
        assert (tmp_path / "py" / f).read_text() == (tmp_path / "cli" / f).read_text()


def test_in_memory_data_equals_the_same_rows_from_a_file(model, tmp_path):
    rows, dev = toy_rows(), dev_rows()
    model.train(write_tsv(tmp_path / "t.tsv", rows), tmp_path / "file", dev=write_tsv(tmp_path / "d.tsv", dev),
                progress=False, **TOY)
    expected = adapter_bytes(tmp_path / "file")
    columns = {"text": [t for t, _ in rows], "label": [l for _, l in rows]}

    class Dataset:
        """What a Hugging Face datasets.Dataset looks like to the binding: rows as mappings."""

        def __iter__(self):
            return iter({"text": t, "label": l, "idx": i} for i, (t, l) in enumerate(rows))

    for name, data in [("pairs", rows), ("columns", columns), ("frame", pandas.DataFrame(columns)),
                       ("mappings", Dataset())]:
        model.train(data, tmp_path / name, dev=dev, progress=False, **TOY)
        assert adapter_bytes(tmp_path / name) == expected, name
    # labels that are numbers read as a JSON lines file reads them
    numbered = [(t, 1 if l == "positive" else 0) for t, l in rows]
    frame = pandas.DataFrame({"sentence": [t for t, _ in numbered], "y": [l for _, l in numbered]})
    adapter = model.train(frame, tmp_path / "numbers", text_column="sentence", label_column="y",
                          progress=False, **TOY)
    assert adapter.labels == ["0", "1"]


def test_bad_input_raises_softprompt_error_with_the_message(model, trained, tiny_decoder, tmp_path):
    assert issubclass(softprompt.Error, ValueError)
    cases = [
        (lambda: model.train("/nonexistent/train.tsv", tmp_path / "a"), ["cannot read data file", "/nonexistent/train.tsv"]),
        (lambda: model.train([("good film", "positive"), ("  ", "negative")], tmp_path / "b"),
         ["<train> line 2: field 'text' is empty"]),
        (lambda: model.train({"text": ["a", "b"], "label": ["x"]}, tmp_path / "c"), ["column 'label' has 1 values"]),
        (lambda: model.train({"sentence": ["a"]}, tmp_path / "d"), ["no column 'text'", "sentence"]),
        (lambda: model.train(toy_rows(), tmp_path / "e", pool="median"), ["pool: unknown value 'median'", "mean"]),
        (lambda: model.train(toy_rows(), tmp_path / "f", dev=[("a great film", "neutral")]),
         ["<dev> line 1", "label 'neutral' was never seen in training"]),
        (lambda: model.train([("good", object())], tmp_path / "g"), ["<train> line 1: field 'label' must be a string"]),
        (lambda: model.train(42, tmp_path / "h"), ["data must be a file path"]),
        (lambda: softprompt.Adapter.load(tmp_path / "nowhere"), ["is not an adapter"]),
        (lambda: model.predict(trained, "one text"), ["a list of texts"]),
        (lambda: model.predict("not an adapter", ["x"]), ["softprompt.Adapter"]),
        (lambda: model.generate("the good film"), ["generation needs a decoder", "bert"]),
        (lambda: softprompt.Model.load(tmp_path / "nothing"), ["does not exist"]),
        (lambda: softprompt.Model.load(MINILM).predict(trained, ["x"]), ["hidden size is 384", "another model"]),
    ]
    malformed = tmp_path / "malformed.tsv"
    malformed.write_text("text\tlabel\ngood film\tpositive\nbad film\n")
    cases.append((lambda: model.train(str(malformed), tmp_path / "i"), ["malformed.tsv line 3", "field 'label' is missing"]))
    for call, expected in cases:
        with pytest.raises(softprompt.Error) as raised:
            call()
        for part in expected:
            assert part in str(raised.value), (part, str(raised.value))
    # nothing was written by the runs that failed
    assert not any((tmp_path / d / "adapter_model.safetensors").exists() for d in "abcdefghi")


def test_ctrl_c_stops_at_a_step_and_resume_continues_exactly(model, tmp_path):
    options = dict(TOY, max_steps=3000, eval_every=500)
    model.train(toy_rows(), tmp_path / "whole", dev=dev_rows(), progress=False, **options)

    def interrupt_soon(event):
        # SIGINT from another thread, as a terminal's Ctrl-C: the engine notices at a step's end
        if event["event"] == "step" and event["step"] == 5:
            threading.Timer(0, os.kill, (os.getpid(), signal.SIGINT)).start()

    steps = []
    # a shell starts a background job (`make test &`) with SIGINT ignored, and Python then leaves
    # it so: Ctrl-C's handler is what this test is about, so it is installed for it
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.train(toy_rows(), tmp_path / "cut", dev=dev_rows(), progress=False,
                        on_event=lambda e: (steps.append(e), interrupt_soon(e)), **options)
    finally:
        signal.signal(signal.SIGINT, before)
    last_heard = max(e["step"] for e in steps if e["event"] == "step")
    assert 5 <= last_heard < 3000
    assert (tmp_path / "cut" / "checkpoint.safetensors").exists()
    with pytest.raises(softprompt.Error, match="already holds a training run"):
        model.train(toy_rows(), tmp_path / "cut", dev=dev_rows(), progress=False, **options)

    resumed = []
    model.train(toy_rows(), tmp_path / "cut", dev=dev_rows(), progress=False, resume=True,
                on_event=resumed.append, **options)
    # the step that heard the Ctrl-C ran to its end, and no further
    assert resumed[0] == {"event": "start", "resumed_at": last_heard + 1, "total_steps": 3000,
                          "steps_per_epoch": 6, "train_examples": 48}
    assert adapter_bytes(tmp_path / "cut") == adapter_bytes(tmp_path / "whole")
    # an exception from on_event stops the run the same way, and is what train raises
    def fail(event):
        if event["event"] == "step" and event["step"] == 3:
            raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"):
        model.train(toy_rows(), tmp_path / "failed", progress=False, on_event=fail, **options)
    log = (tmp_path / "failed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in log if "loss" in l] == [1, 2, 3]


def test_events_carry_the_metrics_records(model, tmp_path):
    events = []
    model.train(toy_rows(), tmp_path / "events", dev=dev_rows(), progress=False, on_event=events.append, **TOY)
    log = [json.loads(l) for l in (tmp_path / "events" / "metrics.jsonl").read_text().splitlines()]
    heard = [{k: v for k, v in e.items() if k not in ("event", "improved")} for e in events
             if e["event"] in ("step", "eval")]
    assert heard == log
    assert [e["event"] for e in events].count("eval") == 4
    assert events[0]["event"] == "start" and all("improved" in e for e in events if e["event"] == "eval")


def test_the_gil_is_released_while_the_engine_runs(model, tmp_path):
    ticks = [0]
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.0005)

    counter = threading.Thread(target=count)
    counter.start()
    time.sleep(0.01)
    before = ticks[0]
    started = time.perf_counter()
    model.train(toy_rows(), tmp_path / "gil", progress=False, **dict(TOY, max_steps=1000, eval_every=1000))
    elapsed = time.perf_counter() - started
    during = ticks[0] - before
    done.set()
    counter.join()
    # With the GIL held for the whole call the counter could not tick during it at all; released,
    # it ticks about once per 0.5 ms sleep (a fifth of that allows for a loaded machine). Measured
    # against the call's own length, so that a fast machine passes it as a slow one does.
    assert during > max(20, 0.2 * elapsed / 0.0005), (elapsed, during)


def _predict_in_child(model_path, adapter_path):
    child = softprompt.Model.load(model_path)
    return child.predict(softprompt.Adapter.load(adapter_path), ["a good film"])[0]["logits"]


_forked_model = None


def _predict_with_the_parents_model(adapter_path):
    return _forked_model.predict(softprompt.Adapter.load(adapter_path), ["a good film"])[0]["logits"]


def test_a_forked_child_runs_without_deadlock(model, trained):
    global _forked_model
    _forked_model = model
    expected = model.predict(trained, ["a good film"])[0]["logits"]  # the parent's pool is in use
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_predict_with_the_parents_model, (trained.path,)).get(timeout=120) == expected
        assert pool.apply_async(_predict_in_child, (model.path, trained.path)).get(timeout=120) == expected


def test_threads_option_sets_the_pool_and_changes_no_answer(tiny_bert, trained):
    one = softprompt.Model.load(tiny_bert, threads=1)
    assert one.threads == 1
    two = softprompt.Model.load(tiny_bert, threads=2)
    texts = [t for t, _ in toy_rows()]
    a = [p["logits"] for p in one.predict(trained, texts)]
    b = [p["logits"] for p in two.predict(trained, texts)]
    assert numpy.allclose(a, b, atol=1e-6)
    with pytest.raises(softprompt.Error, match="threads must be at least 1"):
        softprompt.Model.load(tiny_bert, threads=0)


def test_bf16_weights_predict_as_f32_within_rounding(tiny_bert, trained):
    f32 = softprompt.Model.load(tiny_bert).predict(trained, ["a good film", "a dull plot"])
    bf16 = softprompt.Model.load(tiny_bert, dtype="bf16").predict(trained, ["a good film", "a dull plot"])
    for a, b in zip(f32, bf16):
        assert a["scores"] == pytest.approx(b["scores"], abs=2e-2)
    with pytest.raises(softprompt.Error, match="dtype: unknown value 'f16'"):
        softprompt.Model.load(tiny_bert, dtype="f16")


def test_progress_prints_lines_where_stderr_is_no_terminal(model, tmp_path, capsys):
    model.train(toy_rows(), tmp_path / "lines", dev=dev_rows(), **TOY)
    err = capsys.readouterr().err
    assert "training on 48 examples: 6 steps an epoch, 40 steps in all" in err
    assert "step 4/40: loss" in err and "step 10: dev accuracy" in err


def test_generation_plain_and_streamed(tiny_decoder, tmp_path):
    decoder = softprompt.Model.load(tiny_decoder)
    assert decoder.architecture == "gpt2"
    text = decoder.generate("the good film", max_new_tokens=8)
    assert isinstance(text, str)
    assert "".join(decoder.generate("the good film", max_new_tokens=8, stream=True)) == text
    pieces = decoder.generate("the good film", max_new_tokens=8, stream=True)
    next(pieces, None)
    del pieces  # stopping early ends the generation
    adapter = decoder.train(toy_rows(), tmp_path / "writer", task="causal-lm", progress=False,
                            **dict(TOY, max_steps=10))
    assert adapter.head == "generation"
    assert isinstance(decoder.generate("the good film", adapter, max_new_tokens=4), str)
    report = decoder.evaluate(adapter, toy_rows())
    assert set(report) == {"examples", "exact_match", "token_accuracy", "token_loss"}
    with pytest.raises(softprompt.Error, match="temperature|top_p|stop"):
        decoder.generate("the good film", stop="")


def test_a_t5_prompt_writes_its_targets_as_the_cli_does(cli, tmp_path):
    t5 = softprompt.Model.load(str(pathlib.Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "tiny-t5"))
    assert t5.architecture == "t5"
    rows = [(f"the movie was {w}", "good" if i % 2 == 0 else "bad film")
            for i, w in enumerate(["good", "bad", "fun", "dull"] * 6)]
    flags = dict(task="seq2seq", num_virtual_tokens=4, lr=0.1, max_steps=12, eval_every=6, batch_size=8)
    adapter = t5.train(rows, tmp_path / "py", dev=rows[:8], progress=False, **flags)
    assert adapter.head == "generation"
    assert adapter.config["task_type"] == "SEQ_2_SEQ_LM"
    report = t5.evaluate(adapter, rows[:8])
    assert set(report) == {"examples", "exact_match", "token_accuracy", "token_loss"}
    train = write_tsv(tmp_path / "train.tsv", rows)
    dev = write_tsv(tmp_path / "dev.tsv", rows[:8])
    subprocess.run([str(cli), "train", "--model", str(t5.path), "--train", train, "--dev", dev, "--output",
                    str(tmp_path / "cli"), "--task", "seq2seq", "--num-virtual-tokens", "4", "--lr", "0.1",
                    "--max-steps", "12", "--eval-every", "6", "--batch-size", "8"], check=True, capture_output=True)
    assert adapter_bytes(tmp_path / "py") == adapter_bytes(tmp_path / "cli")
    assert t5.generate("the movie was good", adapter, max_new_tokens=3) == json.loads(subprocess.run(
        [str(cli), "generate", "--model", str(t5.path), "--adapter", str(tmp_path / "py"), "--json",
         "--max-new-tokens", "3", "the movie was good"], check=True, capture_output=True, text=True).stdout)["text"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_python_adapter_loads_in_the_cli_and_in_serve(model, trained, tiny_bert, cli, tmp_path):
    texts = ["a good film", "an awful film"]
    ours = model.predict(trained, texts)
    out = subprocess.run([cli, "predict", "--model", tiny_bert, "--adapter", trained.path, "--json", *texts],
                         check=True, capture_output=True, text=True).stdout
    theirs = [json.loads(l) for l in out.splitlines()]
    assert [t["label"] for t in theirs] == [o["label"] for o in ours]
    assert numpy.allclose([t["logits"] for t in theirs], [o["logits"] for o in ours], atol=1e-6)

    port = _free_port()
    served = pathlib.Path(trained.path).parent
    server = subprocess.Popen([cli, "serve", "--model", tiny_bert, "--adapters", str(served), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        name = pathlib.Path(trained.path).name
        request = urllib.request.Request(url + "/v1/classify", method="POST",
                                         data=json.dumps({"adapter": name, "inputs": texts}).encode(),
                                         headers={"Content-Type": "application/json"})
        results = json.load(urllib.request.urlopen(request, timeout=30))["results"]
        assert [r["label"] for r in results] == [o["label"] for o in ours]
        for r, o in zip(results, ours):
            assert r["scores"] == pytest.approx(o["scores"], abs=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_peft_adapter_loads_and_predicts(model, tiny_bert):
    from conftest import FIXTURES
    peft = softprompt.Adapter.load(FIXTURES / "peft-tiny-adapter")
    assert peft.config["peft_type"] == "PROMPT_TUNING"
    assert len(model.predict(peft, ["a good film"])[0]["logits"]) == len(peft.labels)


def test_a_multitask_prompt_from_a_frame_equals_the_cli_one(model, tiny_bert, cli, tmp_path):
    rows = [(t, l, "x" if i % 4 < 2 else "y") for i, (t, l) in enumerate(toy_rows())]
    dev = [(t, l, "x" if i % 4 < 2 else "y") for i, (t, l) in enumerate(dev_rows())]
    for name, data in [("train", rows), ("dev", dev)]:
        (tmp_path / f"{name}.tsv").write_text("text\tlabel\ttask\n" + "".join(f"{t}\t{l}\t{k}\n" for t, l, k in data))
    flags = ["--method", "multitask", "--task-column", "task", "--task-rank", "2"]
    subprocess.run([cli, "train", "--model", tiny_bert, "--train", str(tmp_path / "train.tsv"), "--dev",
                    str(tmp_path / "dev.tsv"), "--output", str(tmp_path / "cli"), *TOY_FLAGS, *flags],
                   check=True, capture_output=True)
    frame = pandas.DataFrame({"text": [r[0] for r in rows], "label": [r[1] for r in rows],
                              "task": [r[2] for r in rows]})
    adapter = model.train(frame, tmp_path / "py", dev=str(tmp_path / "dev.tsv"), progress=False, method="multitask",
                          task_column="task", task_rank=2, **TOY)
    assert adapter_bytes(tmp_path / "py") == adapter_bytes(tmp_path / "cli")
    assert adapter.tasks == ["x", "y"]
    assert model.predict(adapter, ["a good film"], task="y")[0]["label"] in ("positive", "negative")
    report = model.evaluate(adapter, str(tmp_path / "dev.tsv"), task="x")
    assert 0.0 <= report["accuracy"] <= 1.0
    with pytest.raises(softprompt.Error, match=r"name one of its tasks \(x, y\)"):
        model.predict(adapter, ["a good film"])
    with pytest.raises(softprompt.Error, match=r"no task \"z\""):
        model.predict(adapter, ["a good film"], task="z")
