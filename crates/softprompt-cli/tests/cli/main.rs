//! The `softprompt` command end to end, on the tiny BERT fixture (no assets needed): training,
//! evaluation, prediction, reproducibility, resume after a kill, and a clear error for bad input.

#[cfg(feature = "mpi")]
mod mpi;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny_model() -> PathBuf {
    fixtures().join("tiny-bert")
}

fn softprompt(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_softprompt"));
    cmd.args(args);
    cmd
}

fn run(args: &[&str]) -> Output {
    softprompt(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "softprompt {args:?} failed:\n{}",
        stderr(&o)
    );
    stdout(&o)
}

/// Runs a command that must fail cleanly: non-zero exit, no panic, and `expected` in the message.
fn fails_with(args: &[&str], expected: &[&str]) {
    let o = run(args);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "softprompt {args:?} should have failed"
    );
    assert!(
        !err.contains("panicked"),
        "softprompt {args:?} panicked:\n{err}"
    );
    for e in expected {
        assert!(
            err.contains(e),
            "softprompt {args:?}: expected {e:?} in:\n{err}"
        );
    }
}

/// Labelled movie-review-like rows, each also named a task ("x" or "y", for `--method multitask`;
/// other methods read no task column).
fn toy_data(dir: &Path) -> (String, String) {
    let pos = ["good", "great", "fun", "wonderful", "moving", "love"];
    let neg = ["bad", "awful", "dull", "boring", "weak", "hate"];
    let filler = ["the", "movie", "film", "plot", "was", "very"];
    let task = |i: usize| if i % 4 < 2 { "x" } else { "y" };
    let mut rows = vec!["text\tlabel\ttask".to_string()];
    for i in 0..48 {
        let (words, label) = if i % 2 == 0 {
            (&pos, "positive")
        } else {
            (&neg, "negative")
        };
        rows.push(format!(
            "{} {} {} {}\t{label}\t{}",
            filler[i % 6],
            words[i % 6],
            filler[(i + 1) % 6],
            words[(i + 3) % 6],
            task(i)
        ));
    }
    rows.push(format!(
        "{}\tpositive\tx",
        vec!["the good movie"; 60].join(" ")
    ));
    let train = dir.join("train.tsv");
    std::fs::write(&train, rows.join("\n") + "\n").unwrap();
    let dev = dir.join("dev.jsonl");
    let dev_rows: Vec<String> = (0..8)
        .map(|i| {
            let (w, l) = if i % 2 == 0 {
                (pos[i % 6], "positive")
            } else {
                (neg[i % 6], "negative")
            };
            let t = task(i);
            format!("{{\"text\": \"a {w} film\", \"label\": \"{l}\", \"task\": \"{t}\"}}")
        })
        .collect();
    std::fs::write(&dev, dev_rows.join("\n") + "\n").unwrap();
    (train.display().to_string(), dev.display().to_string())
}

fn train_args<'a>(
    model: &'a str,
    train: &'a str,
    dev: &'a str,
    out: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--model",
        model,
        "--train",
        train,
        "--dev",
        dev,
        "--output",
        out,
        "--batch-size",
        "8",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn train_then_eval_then_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("adapter").display().to_string();
    ok(&train_args(
        &model,
        &train,
        &dev,
        &out,
        &["--max-steps", "60", "--eval-every", "20", "--lr", "0.05"],
    ));
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "softprompt.json",
        "metrics.jsonl",
    ] {
        assert!(Path::new(&out).join(file).is_file(), "{file} missing");
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&out).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "PROMPT_TUNING");
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["num_virtual_tokens"], 20);
    assert_eq!(config["token_dim"], 16);

    let report: serde_json::Value = eval_json(&model, &out, &dev, &[]);
    let accuracy = report["accuracy"].as_f64().unwrap();
    assert!(
        accuracy >= 0.75,
        "the toy task is separable; dev accuracy {accuracy}"
    );
    assert!(report["macro_f1"].as_f64().is_some());
    assert!(
        ok(&["eval", "--model", &model, "--adapter", &out, "--data", &dev]).contains("confusion")
    );

    let lines = ok(&[
        "predict",
        "--model",
        &model,
        "--adapter",
        &out,
        "--json",
        "a great fun film",
        "a dull boring plot",
    ]);
    let rows: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["text"], "a great fun film");
    let scores = rows[0]["scores"].as_object().unwrap();
    let total: f64 = scores.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-5);
    assert_eq!(rows[0]["logits"].as_array().unwrap().len(), 2);
    assert!(rows
        .iter()
        .all(|r| r["label"] == "positive" || r["label"] == "negative"));
    // predict and eval agree: predict's labels on the dev file give eval's accuracy
    let predicted = ok(&[
        "predict",
        "--model",
        &model,
        "--adapter",
        &out,
        "--json",
        "--input",
        &dev,
    ]);
    let gold: Vec<serde_json::Value> = std::fs::read_to_string(&dev)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let right = predicted
        .lines()
        .zip(&gold)
        .filter(|(p, g)| {
            serde_json::from_str::<serde_json::Value>(p).unwrap()["label"] == g["label"]
        })
        .count();
    assert!((right as f64 / gold.len() as f64 - accuracy).abs() < 1e-9);
    let plain = ok(&[
        "predict",
        "--model",
        &model,
        "--adapter",
        &out,
        "--input",
        &train,
    ]);
    assert_eq!(plain.lines().count(), 49, "one line per input");
}

#[test]
fn same_seed_gives_the_same_adapter_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let bytes = |name: &str, seed: &str| {
        let out = dir.join(name).display().to_string();
        ok(&train_args(
            &model,
            &train,
            &dev,
            &out,
            &["--max-steps", "12", "--eval-every", "6", "--seed", seed],
        ));
        std::fs::read(Path::new(&out).join("adapter_model.safetensors")).unwrap()
    };
    assert_eq!(bytes("a", "7"), bytes("b", "7"));
    assert_ne!(bytes("c", "7"), bytes("d", "8"));
}

/// `--dtype bf16` trains and evaluates with the matrices held in bf16; its adapter is an
/// ordinary one (the f32 model reads it), and the two models score the dev set alike.
#[test]
fn dtype_bf16_trains_and_its_adapter_reads_on_either_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("bf16").display().to_string();
    let extra = [
        "--max-steps",
        "60",
        "--eval-every",
        "20",
        "--lr",
        "0.05",
        "--dtype",
        "bf16",
    ];
    ok(&train_args(&model, &train, &dev, &out, &extra));
    let accuracy = |dtype: &str| {
        let report = ok(&[
            "eval",
            "--model",
            &model,
            "--adapter",
            &out,
            "--data",
            &dev,
            "--json",
            "--dtype",
            dtype,
        ]);
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        report["accuracy"].as_f64().unwrap()
    };
    let (bf16, f32) = (accuracy("bf16"), accuracy("f32"));
    assert!(
        bf16 >= 0.75,
        "the toy task is separable; dev accuracy {bf16}"
    );
    assert!(
        (bf16 - f32).abs() <= 0.125,
        "bf16 {bf16} vs f32 {f32}: at most one of 8 dev rows apart"
    );
    fails_with(
        &train_args(
            &model,
            &train,
            &dev,
            &dir.join("x").display().to_string(),
            &["--dtype", "f16"],
        ),
        &["unknown value 'f16'", "f32, bf16"],
    );
}

/// `--pool pooler` (PEFT's SEQ_CLS head: BERT's pooler on the first position) trains, and its
/// adapter says so; a model without a pooler refuses it before training.
#[test]
fn pool_pooler_trains_through_the_models_pooler() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("pooler").display().to_string();
    let extra = ["--max-steps", "12", "--eval-every", "6", "--pool", "pooler"];
    ok(&train_args(&model, &train, &dev, &out, &extra));
    let saved = std::fs::read_to_string(Path::new(&out).join("softprompt.json")).unwrap();
    assert!(saved.contains("\"pool\": \"pooler\""), "{saved}");
    let decoder = tiny_decoder(dir);
    let other = dir.join("decoder").display().to_string();
    fails_with(
        &train_args(&decoder, &train, &dev, &other, &extra),
        &["--pool pooler needs the checkpoint's pooler.dense weights"],
    );
}

/// Options of a toy run long enough to be interrupted: `steps`, evaluated every `eval_every`.
fn long_toy_run<'a>(steps: &'a str, eval_every: &'a str) -> [&'a str; 8] {
    [
        "--max-steps",
        steps,
        "--eval-every",
        eval_every,
        "--patience",
        "0",
        "--num-virtual-tokens",
        "4",
    ]
}

/// The toy data and model, and the run of `extra` trained whole into `dir/whole`: what an
/// interrupted and resumed run must equal. → (model, train, dev, whole)
fn whole_toy_run(dir: &Path, extra: &[&str]) -> (String, String, String, String) {
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let whole = dir.join("whole").display().to_string();
    ok(&train_args(&model, &train, &dev, &whole, extra));
    (model, train, dev, whole)
}

#[test]
fn resume_after_a_kill_gives_the_same_adapter_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let extra = long_toy_run("1500", "25");
    let (model, train, dev, whole) = whole_toy_run(dir, &extra);

    let cut = dir.join("cut").display().to_string();
    let mut child = softprompt(&train_args(&model, &train, &dev, &cut, &extra))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoint = Path::new(&cut).join("checkpoint.safetensors");
    let waiting = std::time::Instant::now();
    while !checkpoint.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("training ended ({status}) before its first checkpoint");
        }
        assert!(
            waiting.elapsed() < std::time::Duration::from_secs(120),
            "no checkpoint after 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(Path::new(&cut).join("metrics.jsonl")).unwrap();
    let last_step = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .max()
        .unwrap();
    assert!(
        last_step < 1500,
        "the run finished before it could be interrupted"
    );

    fails_with(
        &train_args(&model, &train, &dev, &cut, &extra),
        &["already holds a training run", "--resume"],
    );
    let mut resumed = train_args(&model, &train, &dev, &cut, &extra);
    resumed.push("--resume");
    ok(&resumed);
    let read = |d: &str| std::fs::read(Path::new(d).join("adapter_model.safetensors")).unwrap();
    assert!(
        read(&whole) == read(&cut),
        "resumed adapter differs from the uninterrupted run's"
    );

    let mut changed = resumed.clone();
    changed.extend(["--seed", "3"]);
    fails_with(&changed, &["options differ from the interrupted run"]);
}

/// Ctrl-C (SIGINT) ends the step under way, checkpoints there and says so; `--resume` continues
/// from that step, not the last evaluation's, and ends where an uninterrupted run ends.
///
/// For every method: a reparameterised prompt resumes with its encoder's weights and optimizer
/// state (the adapter holds only the encoder's output).
#[test]
fn ctrl_c_checkpoints_at_its_step_and_resume_continues_exactly() {
    let methods: [&[&str]; 6] = [
        &[],
        &["--method", "p-tuning", "--encoder-hidden-size", "8"],
        &[
            "--method",
            "p-tuning",
            "--encoder",
            "lstm",
            "--encoder-hidden-size",
            "4",
        ],
        &["--method", "residual", "--encoder-hidden-size", "8"],
        &["--method", "prefix", "--encoder-hidden-size", "8"],
        &[
            "--method",
            "multitask",
            "--task-column",
            "task",
            "--task-rank",
            "2",
        ],
    ];
    for method in methods {
        ctrl_c_then_resume(method);
    }
}

fn ctrl_c_then_resume(method: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut extra = long_toy_run("3000", "1000").to_vec();
    extra.extend_from_slice(method);
    let (model, train, dev, whole) = whole_toy_run(dir, &extra);

    let cut = dir.join("cut").display().to_string();
    let child = softprompt(&train_args(&model, &train, &dev, &cut, &extra))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = Path::new(&cut).join("metrics.jsonl");
    let waiting = std::time::Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |l| l.lines().count()) < 5 {
        assert!(waiting.elapsed() < std::time::Duration::from_secs(120));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let message = stderr(&output);
    let steps: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    let last = *steps.last().unwrap();
    assert!(last < 3000, "the run finished before the Ctrl-C");
    assert!(
        message.contains(&format!("interrupted at step {last}; checkpointed there")),
        "{message}"
    );
    let mut resumed = train_args(&model, &train, &dev, &cut, &extra);
    resumed.push("--resume");
    let resumed = run(&resumed);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(
        stderr(&resumed).contains(&format!("resumed at step {last}")),
        "{}",
        stderr(&resumed)
    );
    let read = |d: &str| std::fs::read(Path::new(d).join("adapter_model.safetensors")).unwrap();
    assert!(
        read(&whole) == read(&cut),
        "{method:?}: resumed adapter differs from the uninterrupted run's"
    );
}

/// P-tuning, the residual method and prefix tuning (with and without its projection) train on
/// the tiny model and learn the toy task; their adapters say what they are in PEFT's terms
/// (P_TUNING with its encoder's fields; the residual prompt as PROMPT_TUNING; PREFIX_TUNING with
/// the key/value width) and load in eval, predict and inspect like any prompt; the checkpoint
/// keeps the encoder's weights under PEFT's names (an unprojected prefix: the prefix itself).
#[test]
fn every_method_trains_and_its_adapter_loads_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let cases: [(&[&str], &str, &str, &str); 5] = [
        (
            &["--method", "p-tuning", "--encoder-hidden-size", "8"],
            "P_TUNING",
            "p-tuning",
            "prompt_encoder.mlp_head.4.weight",
        ),
        (
            &["--method", "p-tuning", "--encoder", "lstm"],
            "P_TUNING",
            "p-tuning",
            "prompt_encoder.lstm_head.weight_hh_l1_reverse",
        ),
        (
            &["--method", "residual", "--encoder-hidden-size", "8"],
            "PROMPT_TUNING",
            "residual",
            "prompt_encoder.residual_mlp.3.weight",
        ),
        (
            &["--method", "prefix", "--encoder-hidden-size", "8"],
            "PREFIX_TUNING",
            "prefix",
            "prompt_encoder.transform.2.weight",
        ),
        (
            &["--method", "prefix", "--prefix-projection", "false"],
            "PREFIX_TUNING",
            "prefix",
            "prompt",
        ),
    ];
    for (i, (method, peft_type, name, tensor)) in cases.into_iter().enumerate() {
        let out = dir.join(format!("run{i}")).display().to_string();
        let mut extra = vec![
            "--max-steps",
            "150",
            "--eval-every",
            "50",
            "--num-virtual-tokens",
            "4",
        ];
        extra.extend_from_slice(method);
        ok(&train_args(&model, &train, &dev, &out, &extra));
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(&out).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], peft_type, "{method:?}");
        if peft_type == "P_TUNING" {
            let kind = if method.contains(&"lstm") {
                "LSTM"
            } else {
                "MLP"
            };
            assert_eq!(config["encoder_reparameterization_type"], kind);
            let hidden = if kind == "MLP" { 8 } else { 16 };
            assert_eq!(
                config["encoder_hidden_size"], hidden,
                "the default is the model's hidden size"
            );
            assert!(config.get("prompt_tuning_init").is_none(), "{config}");
        }
        if peft_type == "PREFIX_TUNING" {
            // the tiny BERT: 2 layers of 16-wide keys and values, read by PEFT without its projection
            assert_eq!(config["token_dim"], 16, "{config}");
            assert_eq!(config["num_layers"], 2, "{config}");
            assert_eq!(config["prefix_projection"], false, "{config}");
            assert!(config.get("prompt_tuning_init").is_none(), "{config}");
        }
        let extra_file = std::fs::read_to_string(Path::new(&out).join("softprompt.json")).unwrap();
        assert!(
            extra_file.contains(&format!("\"method\": \"{name}\"")),
            "{extra_file}"
        );
        let checkpoint = Path::new(&out).join("checkpoint.safetensors");
        let (tensors, _) =
            softprompt::files::load_tensors(&checkpoint, &candle_core::Device::Cpu).unwrap();
        assert!(
            tensors.contains_key(tensor),
            "{method:?}: {:?}",
            tensors.keys()
        );
        // a prefix without its projection trains its rows, as the shallow prompt does
        let unprojected = tensor == "prompt";
        if unprojected {
            // the prefix itself: every layer's keys and values, 2 · 2 · 16 a position
            assert_eq!(tensors[tensor].dims(), [4, 64], "{method:?}");
        } else {
            assert!(!tensors.contains_key("prompt"), "{:?}", tensors.keys());
        }

        // a prefix trained as it is fits the toy's 48 rows (train loss 0.09) but, on this random
        // tiny BERT, does not carry them to the dev rows (0.375-0.75 by seed and init); on
        // movie reviews it does (DESIGN, decision 18)
        let scored = if unprojected { &train } else { &dev };
        let report = ok(&[
            "eval",
            "--model",
            &model,
            "--adapter",
            &out,
            "--data",
            scored,
            "--json",
        ]);
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        assert!(
            report["accuracy"].as_f64().unwrap() >= 0.75,
            "{method:?}: {report}"
        );
        let inspected = run(&["inspect", "--adapter", &out, "--model", &model]);
        assert!(inspected.status.success(), "{}", stderr(&inspected));
        let said = stderr(&inspected);
        if peft_type == "PREFIX_TUNING" {
            assert!(said.contains("a prefix of 4 positions"), "{said}");
            assert_eq!(stdout(&inspected), "", "no word vectors to show");
        } else {
            assert_eq!(
                stdout(&inspected).lines().count(),
                4,
                "one line per prompt vector"
            );
            assert!(
                said.contains(&format!("trained with --method {name}")),
                "{said}"
            );
        }
    }
}

/// `eval --json --task task` of `adapter` over the rows of `data` that `of_task` picks (a TSV's
/// header kept), written into `dir` → the report and the rows it scored.
fn eval_task(
    model: &str,
    adapter: &str,
    data: &str,
    dir: &Path,
    task: &str,
    of_task: &dyn Fn(&str) -> bool,
) -> (serde_json::Value, usize) {
    let text = std::fs::read_to_string(data).unwrap();
    let tsv = data.ends_with(".tsv");
    let mut lines = text.lines();
    let header = if tsv { lines.next() } else { None };
    let own: Vec<&str> = lines.filter(|l| of_task(l)).collect();
    let file = dir.join(format!(
        "{task}-{}",
        Path::new(data).file_name().unwrap().to_string_lossy()
    ));
    let body: Vec<&str> = header.into_iter().chain(own.iter().copied()).collect();
    std::fs::write(&file, body.join("\n") + "\n").unwrap();
    let file = file.display().to_string();
    (
        eval_json(model, adapter, &file, &["--task", task]),
        own.len(),
    )
}

/// `--method multitask`: one adapter, a prompt for each task of `--task-column`, written as PEFT's
/// MULTITASK_PROMPT_TUNING (the shared table and each task's factors); eval, predict, inspect and
/// generate take `--task`; what does not fit is refused by name.
#[test]
fn a_multitask_prompt_serves_each_task_of_its_column() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("multi").display().to_string();
    let multitask = [
        "--method",
        "multitask",
        "--task-column",
        "task",
        "--task-rank",
        "2",
        "--max-steps",
        "150",
        "--eval-every",
        "50",
        "--num-virtual-tokens",
        "4",
        "--lr",
        "0.03",
    ];
    ok(&train_args(&model, &train, &dev, &out, &multitask));
    let read = |file: &str| std::fs::read_to_string(Path::new(&out).join(file)).unwrap();
    let config: serde_json::Value = serde_json::from_str(&read("adapter_config.json")).unwrap();
    assert_eq!(config["peft_type"], "MULTITASK_PROMPT_TUNING", "{config}");
    assert_eq!(
        (config["num_tasks"].as_u64(), config["num_ranks"].as_u64()),
        (Some(2), Some(2))
    );
    let extra: serde_json::Value = serde_json::from_str(&read("softprompt.json")).unwrap();
    assert_eq!(extra["tasks"], serde_json::json!(["x", "y"]), "{extra}");
    let (tensors, _) = softprompt::files::load_tensors(
        &Path::new(&out).join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors["prompt_embeddings"].dims(), [4, 16]);
    assert_eq!(tensors["prefix_task_cols"].dims(), [2, 4, 2]);
    assert_eq!(tensors["prefix_task_rows"].dims(), [2, 2, 16]);

    // each task's dev rows with its own prompt: together, what training scored the kept adapter
    let best = read("metrics.jsonl")
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["dev_accuracy"].as_f64()
        })
        .fold(0.0, f64::max);
    assert!(
        best >= 0.75,
        "the toy task is separable: best dev accuracy {best}"
    );
    let mut correct = 0.0;
    for task in ["x", "y"] {
        let of_task = |l: &str| l.contains(&format!("\"task\": \"{task}\""));
        let (report, rows) = eval_task(&model, &out, &dev, dir, task, &of_task);
        correct += report["accuracy"].as_f64().unwrap() * rows as f64;
    }
    assert!(
        (correct / 8.0 - best).abs() < 1e-9,
        "{correct} of 8 right, training's best {best}"
    );
    let eval = ["eval", "--model", &model, "--adapter", &out, "--data", &dev];
    fails_with(&eval, &["multitask prompt", "name one of its tasks (x, y)"]);
    let unknown_task = [&eval[..], &["--task", "z"]].concat();
    fails_with(&unknown_task, &["no task \"z\" (its tasks: x, y)"]);
    let predicted = ok(&[
        "predict",
        "--model",
        &model,
        "--adapter",
        &out,
        "--task",
        "y",
        "a good film",
    ]);
    assert!(predicted.contains("positive"), "{predicted}");
    let inspected = run(&["inspect", "--model", &model, "--adapter", &out]);
    assert_eq!(stdout(&inspected).lines().count(), 4);
    assert!(stderr(&inspected).contains("the prompt its tasks x, y share"));
    let one = ok(&[
        "inspect",
        "--model",
        &model,
        "--adapter",
        &out,
        "--task",
        "x",
    ]);
    assert_eq!(one.lines().count(), 4);

    let unknown = dir.join("unknown.tsv");
    std::fs::write(&unknown, "text\tlabel\ttask\na good film\tpositive\tz\n").unwrap();
    let unknown = unknown.display().to_string();
    let again = dir.join("again").display().to_string();
    fails_with(
        &train_args(&model, &train, &unknown, &again, &multitask),
        &["unknown.tsv line 2: task 'z' was never seen in training (known tasks: x, y)"],
    );
    fails_with(
        &train_args(&model, &train, &dev, &again, &multitask[..2]),
        &["--method multitask needs --task-column"],
    );
    fails_with(
        &train_args(&model, &train, &dev, &again, &multitask[2..4]),
        &["--task-column is for --method multitask"],
    );

    // a causal LM's prompt per task, on a decoder (each row its own prompt: none shared)
    let decoder = tiny_decoder(dir);
    let writer = dir.join("writer").display().to_string();
    let mut causal = vec!["--task", "causal-lm", "--template", "{text} . it was"];
    causal.extend_from_slice(&multitask[..6]);
    causal.extend_from_slice(&["--max-steps", "6", "--eval-every", "3"]);
    ok(&train_args(&decoder, &train, &dev, &writer, &causal));
    let scored: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        &decoder,
        "--adapter",
        &writer,
        "--data",
        &dev,
        "--task",
        "x",
        "--json",
    ]))
    .unwrap();
    assert_eq!(scored["examples"], 8, "{scored}");
    ok(&[
        "generate",
        "--model",
        &decoder,
        "--adapter",
        &writer,
        "--task",
        "y",
        "a good film",
        "--max-new-tokens",
        "2",
    ]);
}

/// `plot` draws a run's curves (two runs overlaid) as a PNG, and names what is missing.
#[test]
fn plot_draws_runs_as_a_png() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let extra = ["--max-steps", "20", "--eval-every", "5"];
    let runs = ["a", "b"].map(|r| dir.join(r).display().to_string());
    for (run, seed) in runs.iter().zip(["1", "2"]) {
        let args = [&extra[..], &["--seed", seed]].concat();
        ok(&train_args(&model, &train, &dev, run, &args));
    }
    ok(&["plot", &runs[0]]);
    let both = dir.join("both.png").display().to_string();
    ok(&["plot", &runs[0], &runs[1], "--output", &both]);
    for png in [Path::new(&runs[0]).join("curves.png"), both.into()] {
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", png.display());
        // IHDR: width and height, big-endian
        assert_eq!(&bytes[16..24], [0, 0, 5, 120, 0, 0, 2, 48], "1400 × 560");
    }
    fails_with(
        &["plot", &dir.display().to_string()],
        &["cannot read the run's log", "metrics.jsonl"],
    );
}

/// `sweep`: a grid of two experiments (a number and a method varied, two seeds) runs, scores
/// each run on the test set, writes results.jsonl and a report with its plots; run again it
/// trains nothing and scores no ensemble again, and a grid with an unknown option is refused
/// before anything trains.
#[test]
fn a_sweep_runs_its_grid_once_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let grid = format!(
        r#"model = "{model}"
train = "{train}"
dev = "{dev}"
test = ["{dev}"]
seeds = [0, 1]

[base]
max_steps = 20
eval_every = 10
num_virtual_tokens = 4

[[experiment]]
name = "length"
title = "Prompt length"
vary = "num_virtual_tokens"
values = [2, 4]
ensemble = true

[[experiment]]
name = "method"
vary = "method"
values = ["residual", "prefix"]
with = {{ encoder_hidden_size = 8, lr = 0.01 }}
seeds = [3]

[[experiment]]
name = "still"
vary = "lr"
values = [1e-12]
seeds = [5]
"#
    );
    let config = dir.join("grid.toml");
    std::fs::write(&config, &grid).unwrap();
    let (config, out) = (config.display().to_string(), dir.join("sweep"));
    let out_s = out.display().to_string();
    let said = stderr(&run(&["sweep", "--config", &config, "--output", &out_s]));
    assert!(said.contains("7 runs: 0 done before, 7 to go"), "{said}");
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7, "{results}");
    // the paper's section 7: how far a prompt moved from its init (replayed from the seed: at a
    // learning rate of 1e-12 not at all), and its vectors' nearest words; none for a prefix
    let still = lines.iter().find(|l| l["experiment"] == "still").unwrap();
    assert!(still["moved"].as_f64().unwrap() < 1e-6, "{still}");
    let moved = lines.iter().find(|l| l["value"] == "4").unwrap();
    assert!(moved["moved"].as_f64().unwrap() > 1e-3, "{moved}");
    assert_eq!(moved["nearest"].as_array().unwrap().len(), 4, "{moved}");
    let prefix = lines.iter().find(|l| l["value"] == "prefix").unwrap();
    let residual = lines.iter().find(|l| l["value"] == "residual").unwrap();
    assert!(
        prefix["trained_values"].as_u64() > residual["trained_values"].as_u64(),
        "{results}"
    );
    assert!(lines.iter().all(|l| l["test"]["dev"]
        .as_f64()
        .is_some_and(|a| (0.0..=1.0).contains(&a))));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("## Prompt length") && report.contains("| 4 | 2 |"),
        "{report}"
    );
    for png in ["length.png", "length-curves.png", "method.png"] {
        assert_eq!(
            &std::fs::read(out.join(png)).unwrap()[..4],
            b"\x89PNG",
            "{png}"
        );
    }
    // each length's two seeds as an ensemble, kept so that the next call reads them: a score
    // changed in the file is what the next report shows
    let ensembles_path = out.join("ensembles.json");
    let ensembles: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ensembles_path).unwrap()).unwrap();
    let ensembles = ensembles.as_array().unwrap();
    assert_eq!(ensembles.len(), 2, "{ensembles:?}");
    assert!(ensembles
        .iter()
        .all(|e| e["members"].as_array().unwrap().len() == 2));
    let mut edited = ensembles.clone();
    edited[0]["test"]["dev"] = serde_json::json!(0.123);
    std::fs::write(&ensembles_path, serde_json::to_string(&edited).unwrap()).unwrap();
    let again = stderr(&run(&["sweep", "--config", &config, "--output", &out_s]));
    assert!(again.contains("7 runs: 7 done before, 0 to go"), "{again}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("**0.1230**"), "{report}");
    assert_eq!(
        std::fs::read_to_string(out.join("results.jsonl")).unwrap(),
        results
    );

    std::fs::write(
        dir.join("bad.toml"),
        grid.replace("eval_every", "eval_evry"),
    )
    .unwrap();
    let bad = dir.join("bad.toml").display().to_string();
    let nowhere = dir.join("nowhere").display().to_string();
    fails_with(
        &["sweep", "--config", &bad, "--output", &nowhere],
        &[
            "experiment \"length\", num_virtual_tokens = 2",
            "no training option 'eval_evry'",
        ],
    );
    assert!(!dir.join("nowhere").exists(), "nothing trained");
}

#[test]
fn resuming_a_run_that_stopped_early_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("early").display().to_string();
    let extra = ["--max-steps", "400", "--eval-every", "2", "--patience", "1"];
    let first = ok(&train_args(&model, &train, &dev, &out, &extra));
    let log = std::fs::read_to_string(Path::new(&out).join("metrics.jsonl")).unwrap();
    let adapter = std::fs::read(Path::new(&out).join("adapter_model.safetensors")).unwrap();
    assert!(
        !log.contains("\"step\":400"),
        "expected an early stop:\n{first}"
    );
    let mut resumed = train_args(&model, &train, &dev, &out, &extra);
    resumed.push("--resume");
    ok(&resumed);
    assert_eq!(
        std::fs::read_to_string(Path::new(&out).join("metrics.jsonl")).unwrap(),
        log
    );
    assert_eq!(
        std::fs::read(Path::new(&out).join("adapter_model.safetensors")).unwrap(),
        adapter
    );
}

#[test]
fn a_peft_adapter_loads_in_predict() {
    let model = tiny_model().display().to_string();
    let adapter = fixtures().join("peft-tiny-adapter").display().to_string();
    let out = ok(&[
        "predict",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "a good movie",
    ]);
    assert!(out.starts_with("LABEL_"), "{out}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("out").display().to_string();
    let p = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };

    fails_with(
        &train_args(&model, "/nonexistent/train.tsv", &dev, &out, &[]),
        &["cannot read data file", "/nonexistent/train.tsv"],
    );
    let malformed = p(
        "malformed.tsv",
        "text\tlabel\ngood film\tpositive\nbad film\n",
    );
    fails_with(
        &train_args(&model, &malformed, &dev, &out, &[]),
        &["malformed.tsv line 3", "field 'label' is missing"],
    );
    let empty = p(
        "empty.tsv",
        "text\tlabel\ngood film\tpositive\n \tnegative\n",
    );
    fails_with(
        &train_args(&model, &empty, &dev, &out, &[]),
        &["empty.tsv line 3", "field 'text' is empty"],
    );
    let unseen = p(
        "unseen.tsv",
        "text\tlabel\ngood film\tpositive\nok film\tneutral\n",
    );
    fails_with(
        &train_args(&model, &train, &unseen, &out, &[]),
        &[
            "unseen.tsv line 3",
            "label 'neutral' was never seen in training",
        ],
    );
    let one_label = p("one.tsv", "text\tlabel\ngood film\tpositive\n");
    fails_with(
        &train_args(&model, &one_label, &dev, &out, &[]),
        &["at least two different labels"],
    );
    fails_with(
        &train_args(&model, &train, &dev, &out, &["--init", "text"]),
        &["--init text needs --init-text"],
    );
    fails_with(
        &train_args(&model, &train, &dev, &out, &["--pool", "avg"]),
        &["unknown value 'avg'", "first, pooler, cls, mean"],
    );
    fails_with(
        &train_args(&model, &train, &dev, &out, &["--method", "lora"]),
        &["unknown value 'lora'", "prompt, p-tuning, residual"],
    );
    fails_with(
        &train_args(&model, &train, &dev, &out, &["--encoder", "lstm"]),
        &["--encoder is for --method p-tuning"],
    );
    fails_with(
        &train_args(&model, &train, &dev, &out, &["--encoder-hidden-size", "8"]),
        &["--encoder-hidden-size is for --method p-tuning, residual or prefix"],
    );
    let unprojected = ["--method", "prefix", "--prefix-projection", "false"];
    let t5 = fixtures().join("tiny-t5").display().to_string();
    let verbalizer = ["--task", "verbalizer", "--template", "{text} Sentiment:"];
    let refused: [(&str, Vec<&str>, &str); 3] = [
        (
            &model,
            unprojected[2..].to_vec(),
            "--prefix-projection is for --method prefix",
        ),
        (
            &model,
            [&unprojected[..], &["--encoder-hidden-size", "8"]].concat(),
            "with --prefix-projection false there is none",
        ),
        (
            &t5,
            [&unprojected[..], &verbalizer].concat(),
            "an encoder-decoder's prefix (its decoder's) has none of; use the projection",
        ),
    ];
    for (model, extra, message) in refused {
        fails_with(&train_args(model, &train, &dev, &out, &extra), &[message]);
    }
    fails_with(
        &train_args(
            &model,
            &train,
            &dev,
            &out,
            &["--method", "residual", "--encoder-hidden-size", "0"],
        ),
        &["--encoder-hidden-size must be at least 1"],
    );
    let verbalizer = |extra: &[&'static str]| {
        let mut args = vec!["--task", "verbalizer"];
        args.extend_from_slice(extra);
        args
    };
    fails_with(
        &train_args(&model, &train, &dev, &out, &verbalizer(&[])),
        &["--task verbalizer needs --template"],
    );
    fails_with(
        &train_args(
            &model,
            &train,
            &dev,
            &out,
            &verbalizer(&["--template", "Review:"]),
        ),
        &["has no {text}"],
    );
    fails_with(
        &train_args(
            &model,
            &train,
            &dev,
            &out,
            &verbalizer(&["--template", "{text} is"]),
        ),
        &["needs a language model's output layer", "bert encoder"],
    );
    fails_with(
        &train_args(&model, &train, &dev, &out, &["--task", "causal-lm"]),
        &["--task causal-lm needs a language model's output layer"],
    );

    // model directories: missing files, weights that do not match config.json
    let no_tokenizer = dir.join("no-tokenizer");
    std::fs::create_dir_all(&no_tokenizer).unwrap();
    std::fs::copy(
        tiny_model().join("config.json"),
        no_tokenizer.join("config.json"),
    )
    .unwrap();
    fails_with(
        &train_args(no_tokenizer.to_str().unwrap(), &train, &dev, &out, &[]),
        &["lacks tokenizer.json"],
    );
    let mismatched = dir.join("mismatched");
    std::fs::create_dir_all(&mismatched).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny_model().join(f), mismatched.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(tiny_model().join("config.json"))
        .unwrap()
        .replace("\"hidden_size\": 16", "\"hidden_size\": 32");
    std::fs::write(mismatched.join("config.json"), config).unwrap();
    fails_with(
        &train_args(mismatched.to_str().unwrap(), &train, &dev, &out, &[]),
        &["do not match its config.json", "shape mismatch"],
    );
    fails_with(
        &train_args("/nonexistent/model", &train, &dev, &out, &[]),
        &["model /nonexistent/model does not exist"],
    );

    // an existing adapter is never overwritten by a new run
    let peft_copy = dir.join("peft-copy");
    std::fs::create_dir_all(&peft_copy).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixtures().join("peft-tiny-adapter").join(f),
            peft_copy.join(f),
        )
        .unwrap();
    }
    let before = std::fs::read(peft_copy.join("adapter_model.safetensors")).unwrap();
    fails_with(
        &train_args(&model, &train, &dev, peft_copy.to_str().unwrap(), &[]),
        &["already holds an adapter"],
    );
    assert_eq!(
        std::fs::read(peft_copy.join("adapter_model.safetensors")).unwrap(),
        before
    );

    // adapters that do not fit the model
    let good = dir.join("good").display().to_string();
    ok(&train_args(
        &model,
        &train,
        &dev,
        &good,
        &["--max-steps", "2"],
    ));
    let copy_adapter = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "softprompt.json",
        ] {
            std::fs::copy(Path::new(&good).join(f), d.join(f)).unwrap();
        }
        d
    };
    let wrong_dim = copy_adapter("wrong-dim");
    let cfg = std::fs::read_to_string(wrong_dim.join("adapter_config.json"))
        .unwrap()
        .replace("\"token_dim\": 16", "\"token_dim\": 384");
    std::fs::write(wrong_dim.join("adapter_config.json"), cfg).unwrap();
    fails_with(
        &[
            "predict",
            "--model",
            &model,
            "--adapter",
            wrong_dim.to_str().unwrap(),
            "x",
        ],
        &["token_dim 384", "hidden size is 16"],
    );
    let wrong_labels = copy_adapter("wrong-labels");
    std::fs::write(
        wrong_labels.join("softprompt.json"),
        r#"{"labels": ["a", "b", "c"], "pool": "mean"}"#,
    )
    .unwrap();
    fails_with(
        &[
            "predict",
            "--model",
            &model,
            "--adapter",
            wrong_labels.to_str().unwrap(),
            "x",
        ],
        &["3 label names for a classifier of 2 classes"],
    );
    fails_with(
        &[
            "predict",
            "--model",
            &model,
            "--adapter",
            &dir.display().to_string(),
            "x",
        ],
        &["is not an adapter"],
    );
    fails_with(
        &[
            "eval",
            "--model",
            &model,
            "--adapter",
            &good,
            "--data",
            &unseen,
        ],
        &["unseen.tsv line 3", "never seen in training"],
    );
    fails_with(
        &["predict", "--model", &model, "--adapter", &good],
        &["nothing to label"],
    );
    fails_with(
        &["predict", "--model", &model, "--adapter", &good, "  "],
        &["text 1 is empty"],
    );
}

/// A tiny GPT-2 with the tiny BERT's tokenizer: a decoder that runs without assets.
fn tiny_decoder(dir: &Path) -> String {
    let model = dir.join("tiny-decoder");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-gpt2").join(f), model.join(f)).unwrap();
    }
    std::fs::copy(
        tiny_model().join("tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    model.display().to_string()
}

/// `--task causal-lm` on a tiny decoder: the prompt (and a prefix) learns to write each review's
/// label after it (its dev loss falls), the adapter is PEFT's CAUSAL_LM prompt alone, eval scores
/// it, generate writes with it, and classification refuses it by name.
/// The dev losses of a run's evaluations, in order (its metrics.jsonl).
fn dev_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["dev_loss"].as_f64())
        .collect()
}

#[test]
fn causal_lm_trains_a_prompt_that_writes_targets() {
    for method in [
        &[][..],
        &["--method", "prefix", "--encoder-hidden-size", "8"],
    ] {
        causal_lm_writes_targets(method);
    }
}

fn causal_lm_writes_targets(method: &[&'static str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_decoder(dir);
    let out = dir.join("writer").display().to_string();
    let mut task = vec![
        "--task",
        "causal-lm",
        "--template",
        "{text} . it was",
        "--num-virtual-tokens",
        "4",
        "--lr",
        "0.1",
        "--max-steps",
        "24",
        "--eval-every",
        "6",
        "--patience",
        "0",
    ];
    task.extend_from_slice(method);
    ok(&train_args(&model, &train, &dev, &out, &task));

    let dev_loss = dev_losses(&dir.join("writer"));
    assert_eq!(dev_loss.len(), 4, "{dev_loss:?}");
    assert!(
        dev_loss[3] < dev_loss[0],
        "the dev loss of the targets should fall: {dev_loss:?}"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("writer/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["task_type"], "CAUSAL_LM");
    let (tensors, _) = softprompt::files::load_tensors(
        &dir.join("writer/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors.keys().collect::<Vec<_>>(), ["prompt_embeddings"]);

    let eval: serde_json::Value = eval_json(&model, &out, &dev, &[]);
    assert_eq!(eval["examples"], 8, "{eval}");
    let token_loss = eval["token_loss"].as_f64().unwrap();
    assert!(
        (token_loss - dev_loss.iter().copied().fold(f64::INFINITY, f64::min)).abs() < 1e-3,
        "eval {eval} should score the kept (best) adapter as training did: {dev_loss:?}"
    );
    let left: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        &model,
        "--adapter",
        &out,
        "--data",
        &dev,
        "--json",
        "--padding-side",
        "left",
    ]))
    .unwrap();
    assert_eq!(left["exact_match"], eval["exact_match"], "{left} vs {eval}");
    let left_loss = left["token_loss"].as_f64().unwrap();
    assert!(
        (left_loss - token_loss).abs() < 1e-5,
        "left padding scores as right padding does: {left} vs {eval}"
    );
    // several texts are written together, each as it is written alone
    let generate = |texts: &[&str]| {
        let args = ["generate", "--model", &model, "--adapter", &out, "--json"];
        let args = [&args[..], &["--max-new-tokens", "3"], texts].concat();
        ok(&args)
    };
    let texts = ["the good movie", "a dull and boring plot film"];
    let together = generate(&texts);
    assert_eq!(together.lines().count(), 2, "{together}");
    for (line, text) in together.lines().zip(texts) {
        assert_eq!(line, generate(&[text]).trim_end(), "{text}");
    }
    fails_with(
        &[
            "predict",
            "--model",
            &model,
            "--adapter",
            &out,
            "the good movie",
        ],
        &["generation adapter"],
    );
    let nearest = ok(&["inspect", "--model", &model, "--adapter", &out]);
    let vectors = if method.is_empty() { 4 } else { 0 };
    assert_eq!(
        nearest.lines().count(),
        vectors,
        "one line per prompt vector, none for a prefix:\n{nearest}"
    );
    // a target too long to fit beside the prompt
    let long = dir.join("long.tsv");
    std::fs::write(
        &long,
        format!("text\tlabel\nshort\t{}\n", vec!["good"; 600].join(" ")),
    )
    .unwrap();
    let long = long.display().to_string();
    let out = dir.join("never").display().to_string();
    fails_with(
        &train_args(&model, &long, &long, &out, &task),
        &["long.tsv line 2", "the target has"],
    );
}

#[test]
fn verbalizer_trains_only_the_prompt_of_a_decoder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_decoder(dir);
    let out = dir.join("verbalizer").display().to_string();
    let task = [
        "--task",
        "verbalizer",
        "--template",
        "{text} it was",
        "--label-words",
        "bad,good",
        "--num-virtual-tokens",
        "4",
    ];
    let mut args = task.to_vec();
    args.extend(["--max-steps", "4"]);
    ok(&train_args(&model, &train, &dev, &out, &args));

    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("verbalizer/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["task_type"], "CAUSAL_LM");
    let extra: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("verbalizer/softprompt.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(extra["label_words"], serde_json::json!(["bad", "good"]));
    assert_eq!(extra["template"], "{text} it was");
    let (tensors, _) = softprompt::files::load_tensors(
        &dir.join("verbalizer/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let names: Vec<&String> = tensors.keys().collect();
    assert_eq!(
        names,
        ["prompt_embeddings"],
        "a verbalizer stores the prompt only"
    );

    // the adapter reads its template and words back: eval and predict agree
    let eval: serde_json::Value = eval_json(&model, &out, &dev, &[]);
    let accuracy = eval["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));
    let zero_shot: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        &model,
        "--zero-shot",
        "--template",
        "{text} it was",
        "--label-words",
        "bad,good",
        "--data",
        &dev,
        "--json",
    ]))
    .unwrap();
    assert!(zero_shot["accuracy"].as_f64().is_some());
    fails_with(
        &[
            "eval",
            "--model",
            &model,
            "--zero-shot",
            "--label-words",
            "bad,good",
            "--data",
            &dev,
        ],
        &["--zero-shot needs --template"],
    );

    // label words the LM head cannot score
    let bad_words = |words: &'static str, expected: &[&str]| {
        let mut args = vec![
            "--task",
            "verbalizer",
            "--template",
            "{text} it was",
            "--label-words",
            words,
        ];
        args.extend(["--max-steps", "1"]);
        let out = dir.join("never").display().to_string();
        fails_with(&train_args(&model, &train, &dev, &out, &args), expected);
    };
    bad_words(
        "good,good",
        &["both start with the token", "differ in their first token"],
    );
    bad_words("bad, ", &["tokenizes to nothing"]);
    bad_words("bad", &["1 label words for 2 labels"]);
}

/// Every free-text flag reads `\n` and `\t` as the characters, as --template always did.
#[test]
fn free_text_flags_unescape_the_same_way() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_decoder(dir);
    let out = dir.join("escaped").display().to_string();
    let flags = [
        "--task",
        "verbalizer",
        "--template",
        "{text}\\nit was",
        "--label-words",
        "bad\\t,good",
        "--init",
        "text",
        "--init-text",
        "a good\\nfilm",
        "--num-virtual-tokens",
        "2",
        "--max-steps",
        "1",
    ];
    ok(&train_args(&model, &train, &dev, &out, &flags));
    let (_, metadata) = softprompt::files::load_tensors(
        &dir.join("escaped/checkpoint.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let config: serde_json::Value = serde_json::from_str(&metadata["config"]).unwrap();
    assert_eq!(config["template"], "{text}\nit was");
    assert_eq!(config["label_words"], serde_json::json!(["bad\t", "good"]));
    assert_eq!(config["init_text"], "a good\nfilm");
}

/// Hostile options and races (issue 13, items 2, 5, 6, 7 and 10): each of these was accepted,
/// panicked, or wrote something it should not have.
#[test]
fn hostile_options_get_a_clear_error_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("out").display().to_string();
    let bad = [
        (vec!["--lr", "1e30"], "became NaN or infinite"),
        (vec!["--weight-decay=-1"], "--weight-decay must be"),
        (vec!["--weight-decay", "NaN"], "--weight-decay must be"),
        (vec!["--max-grad-norm", "NaN"], "--max-grad-norm must be"),
        (vec!["--max-grad-norm=-2"], "--max-grad-norm must be"),
        (vec!["--max-tokens", "0"], "--max-tokens must be at least 1"),
    ];
    for (i, (flags, expected)) in bad.into_iter().enumerate() {
        let mut flags = flags.clone();
        flags.extend(["--max-steps", "3"]);
        let out = format!("{out}{i}");
        fails_with(&train_args(&model, &train, &dev, &out, &flags), &[expected]);
        // what an earlier evaluation kept as the best is finite: it loads
        if Path::new(&out).join("adapter_model.safetensors").exists() {
            softprompt::adapter::Adapter::load(Path::new(&out), 16, &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("{flags:?} wrote an adapter that does not load: {e:#}"));
        }
    }
    let good = dir.join("good").display().to_string();
    ok(&train_args(
        &model,
        &train,
        &dev,
        &good,
        &["--max-steps", "2"],
    ));
    for command in ["eval", "predict"] {
        let mut args = vec![
            command,
            "--model",
            &model,
            "--adapter",
            &good,
            "--batch-size",
            "0",
        ];
        if command == "eval" {
            args.extend(["--data", &dev]);
        } else {
            args.push("a text");
        }
        fails_with(&args, &["must be at least 1"]);
    }
    // a text with a line break stays on its line
    let answer = ok(&[
        "predict",
        "--model",
        &model,
        "--adapter",
        &good,
        "a good\nfilm",
    ]);
    assert_eq!(answer.lines().count(), 1, "{answer}");
    assert!(answer.contains("a good\\nfilm"), "{answer}");
    for (flag, value) in [("--duration", "1.8e19"), ("--rate", "1e-300")] {
        fails_with(
            &["loadgen", "--adapter", "a", "--data", &dev, flag, value],
            &[flag],
        );
    }
}

/// Two trainings into one --output: the second is refused while the first runs (before, both
/// could exit 0 and one run's adapter replaced the other's).
#[test]
fn a_second_training_into_the_same_output_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("out").display().to_string();
    let extra = [
        "--max-steps",
        "100000",
        "--eval-every",
        "50",
        "--patience",
        "0",
    ];
    let mut first = softprompt(&train_args(&model, &train, &dev, &out, &extra))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // the holder writes its pid once it has the lock
    let lock = Path::new(&out).join(".lock");
    let waiting = std::time::Instant::now();
    while std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended early"
        );
        assert!(waiting.elapsed().as_secs() < 60, "no lock after 60 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    fails_with(
        &train_args(&model, &train, &dev, &out, &extra),
        &["is in use by another training run", "process"],
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // the killed run's lock is stale: resuming takes it over
    let mut resume = train_args(
        &model,
        &train,
        &dev,
        &out,
        &["--max-steps", "60", "--eval-every", "50", "--patience", "0"],
    );
    resume.push("--resume");
    let o = run(&resume);
    assert!(
        !stderr(&o).contains("in use"),
        "a dead run's lock must not hold: {}",
        stderr(&o)
    );
}

/// kill -9 at moments spread over a run (20 trials, some inside a checkpoint or adapter write),
/// then --resume until it finishes: the adapter is byte-identical to an uninterrupted run's every
/// time, and no trial leaves a directory that a rerun refuses.
#[test]
fn chaos_kills_then_resume_give_the_uninterrupted_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let extra = [
        "--max-steps",
        "300",
        "--eval-every",
        "10",
        "--patience",
        "0",
        "--num-virtual-tokens",
        "4",
    ];
    let whole = dir.join("whole").display().to_string();
    let started = std::time::Instant::now();
    ok(&train_args(&model, &train, &dev, &whole, &extra));
    let run_ms = started.elapsed().as_millis() as u64;
    let expected = std::fs::read(Path::new(&whole).join("adapter_model.safetensors")).unwrap();
    for trial in 0..20u64 {
        let out = dir.join(format!("trial{trial}")).display().to_string();
        // spread over the run, with the process start-up in front
        let delay = 20 + (trial * 7919 % 20) * run_ms / 20;
        let mut child = softprompt(&train_args(&model, &train, &dev, &out, &extra))
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay));
        child.kill().unwrap();
        child.wait().unwrap();
        let checkpoint = Path::new(&out).join("checkpoint.safetensors");
        let mut again = train_args(&model, &train, &dev, &out, &extra);
        if checkpoint.exists() {
            again.push("--resume");
        }
        let o = run(&again);
        assert!(
            o.status.success(),
            "trial {trial} (killed after {delay} ms): the rerun {again:?} failed:\n{}",
            stderr(&o)
        );
        let got = std::fs::read(Path::new(&out).join("adapter_model.safetensors")).unwrap();
        assert!(
            got == expected,
            "trial {trial} (killed after {delay} ms): the adapter differs from the uninterrupted run's"
        );
    }
}

/// --resume with other data (or another model) than the interrupted run's is refused, naming it.
#[test]
fn resume_checks_the_model_and_data_it_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("out").display().to_string();
    let extra = ["--max-steps", "20", "--eval-every", "10"];
    ok(&train_args(&model, &train, &dev, &out, &extra));
    let mut text = std::fs::read_to_string(&train).unwrap();
    text.push_str("one more good film\tpositive\n");
    std::fs::write(&train, text).unwrap();
    let mut resumed = train_args(&model, &train, &dev, &out, &extra);
    resumed.push("--resume");
    fails_with(
        &resumed,
        &["the training data differ from the interrupted run's"],
    );
}

/// `--profile`: the matmul spans declare exactly the FLOPs the bench counts as done (the reference's
/// formulas less the last layer's skipped rows, and less the classifier head's, which candle's
/// autograd computes outside any span), every layer's matmuls are there, and training prints the
/// same table.
#[test]
fn profile_counts_the_flops_of_the_formulas_and_where_the_time_went() {
    let out = ok(&[
        "bench",
        "train",
        "--arch",
        "minilm-l6",
        "--batch",
        "2",
        "--seq",
        "12",
        "--num-virtual-tokens",
        "4",
        "--steps",
        "2",
        "--profile",
        "--fma-peak",
        "100",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = r["profile"]["rows"].as_array().unwrap();
    let declared: f64 = rows.iter().map(|row| row["gflop"].as_f64().unwrap()).sum();
    let (b, d) = (2.0, 384.0);
    // two steps of the head's train FLOPs, less the pooler's forward (a span): the pooler's
    // backward and the classifier run on candle's autograd
    let head_outside_spans = 2.0 * (2.0 * 2.0 * b * (d * d + 2.0 * d) - 2.0 * b * d * d) / 1e9;
    let formulas = 2.0 * r["gflop"].as_f64().unwrap();
    assert!(
        (formulas - declared - head_outside_spans).abs() < 1e-9,
        "spans {declared} GFLOP, formulas {formulas} GFLOP over 2 steps"
    );
    let calls = |span: &str, detail: &str| {
        rows.iter()
            .find(|row| row["span"] == span && row["detail"] == detail)
            .map(|row| row["calls"].as_u64().unwrap())
    };
    for shape in ["384→1152", "384→384", "384→1536", "1536→384"] {
        assert_eq!(calls("linear.backward", shape), Some(2 * 6), "{shape}");
    }
    assert_eq!(calls("attention.forward", ""), Some(2 * 6));
    // the last layer's MLP on the pooled rows only: five layers of 2 × 16 rows, then 2 rows
    let up = rows
        .iter()
        .find(|row| row["span"] == "linear.forward" && row["detail"] == "384→1536")
        .unwrap();
    let expected = 2.0 * (5.0 * 32.0 + 2.0) * 2.0 * 384.0 * 1536.0 / 1e9;
    assert!(
        (up["gflop"].as_f64().unwrap() - expected).abs() < 1e-12,
        "{up}"
    );
    assert_eq!(calls("backward", "layer 5"), Some(2));
    let shares: f64 = rows.iter().map(|row| row["share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 1e-9, "shares add up to {shares}");
    let matmul = rows
        .iter()
        .find(|row| row["span"] == "linear.forward")
        .unwrap();
    let rate = matmul["gflop_per_s"].as_f64().unwrap();
    assert!((matmul["share_of_peak"].as_f64().unwrap() - rate / 100.0).abs() < 1e-9);

    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = toy_data(tmp.path());
    let model = tiny_model().display().to_string();
    let adapter = tmp.path().join("adapter").display().to_string();
    let o = run(&train_args(
        &model,
        &train,
        &dev,
        &adapter,
        &["--max-steps", "3", "--profile"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    for span in [
        "step",
        "optimizer",
        "evaluate",
        "linear.forward",
        "attention.backward",
        "profiled",
    ] {
        assert!(stderr(&o).contains(span), "no {span} in:\n{}", stderr(&o));
    }
}

/// `--task seq2seq` on a tiny T5: the prompt in front of the encoder learns to make the decoder
/// write each review's label (its dev loss falls), the adapter is PEFT's SEQ_2_SEQ_LM prompt of
/// one submodule, eval scores the kept adapter as training did, generate writes with it, and
/// what does not fit is refused by name.
/// Reviews in the tiny T5's words, every other one positive, labelled with a task's first target
/// (positive) or its second: 32 training rows and 8 dev rows, as TSV files in `dir` → (train,
/// dev). With more than one task, each row names its task ("x" for the first, "y" for the
/// second, ...) in a `task` column, the tasks taking turns in pairs.
fn t5_task_reviews(dir: &Path, tasks: &[(&str, &str)]) -> (String, String) {
    let (pos, neg) = (
        ["good", "great", "fun", "love"],
        ["bad", "awful", "dull", "boring"],
    );
    let names = ["x", "y", "z"];
    let row = |i: usize| {
        let task = (i / 2) % tasks.len();
        let labels = tasks[task];
        let (words, target) = if i.is_multiple_of(2) {
            (&pos, labels.0)
        } else {
            (&neg, labels.1)
        };
        let row = format!(
            "the movie was {} and {}\t{target}",
            words[i % 4],
            words[(i + 1) % 4]
        );
        match tasks.len() {
            1 => row,
            _ => format!("{row}\t{}", names[task]),
        }
    };
    let header = match tasks.len() {
        1 => "text\tlabel",
        _ => "text\tlabel\ttask",
    };
    let write = |name: &str, rows: std::ops::Range<usize>| {
        let path = dir.join(name);
        let lines: Vec<String> = rows.map(row).collect();
        std::fs::write(&path, format!("{header}\n{}\n", lines.join("\n"))).unwrap();
        path.display().to_string()
    };
    (write("train.tsv", 0..32), write("dev.tsv", 32..40))
}

/// `softprompt eval --json` of `adapter` on `model` over `data`, with `options`.
fn eval_json(model: &str, adapter: &str, data: &str, options: &[&str]) -> serde_json::Value {
    let args = [
        "eval",
        "--model",
        model,
        "--adapter",
        adapter,
        "--data",
        data,
        "--json",
    ];
    serde_json::from_str(&ok(&[&args[..], options].concat())).unwrap()
}

/// A 4-vector prompt trained 24 steps with `task` on the tiny T5 over `t5_task_reviews(tasks)`
/// into `dir/name`, its dev loss falling over the 4 evaluations → (model, train, dev, output).
fn t5_trained(
    dir: &Path,
    tasks: &[(&str, &str)],
    name: &str,
    task: &[&str],
) -> (String, String, String, String) {
    let (train, dev) = t5_task_reviews(dir, tasks);
    let model = fixtures().join("tiny-t5").display().to_string();
    let out = dir.join(name).display().to_string();
    let mut args = task.to_vec();
    args.extend([
        "--num-virtual-tokens",
        "4",
        "--lr",
        "0.1",
        "--max-steps",
        "24",
        "--eval-every",
        "6",
        "--patience",
        "0",
    ]);
    ok(&train_args(&model, &train, &dev, &out, &args));
    let dev_loss = dev_losses(&dir.join(name));
    assert_eq!(dev_loss.len(), 4, "{dev_loss:?}");
    assert!(
        dev_loss[3] < dev_loss[0],
        "{task:?}: the dev loss should fall: {dev_loss:?}"
    );
    (model, train, dev, out)
}

/// `--task seq2seq` with `method` on the tiny T5 into `dir/name`: trained (its dev loss falling),
/// scored by eval as training scored the kept adapter, and writing with generate → (model, train,
/// dev, output, its adapter_config.json).
fn t5_writer(
    dir: &Path,
    name: &str,
    method: &str,
) -> (String, String, String, String, serde_json::Value) {
    let (model, train, dev, out) = t5_trained(
        dir,
        &[("good", "bad film")],
        name,
        &["--task", "seq2seq", "--method", method],
    );
    let dev_loss = dev_losses(&dir.join(name));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(name).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["task_type"], "SEQ_2_SEQ_LM");
    let eval: serde_json::Value = eval_json(&model, &out, &dev, &[]);
    assert_eq!(eval["examples"], 8, "{eval}");
    for key in ["exact_match", "token_accuracy", "token_loss"] {
        assert!(eval[key].is_f64(), "{key} in {eval}");
    }
    let best = dev_loss.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        (eval["token_loss"].as_f64().unwrap() - best).abs() < 1e-3,
        "eval {eval} should score the kept adapter as training did: {dev_loss:?}"
    );
    writes_tokens(&model, &out, &[]);
    (model, train, dev, out, config)
}

/// `generate --json` with `adapter` and `options` writes tokens for a review.
fn writes_tokens(model: &str, adapter: &str, options: &[&str]) {
    let args = ["generate", "--model", model, "--adapter", adapter, "--json"];
    let args = [
        &args[..],
        options,
        &["--max-new-tokens", "3", "the movie was good"],
    ]
    .concat();
    let written = ok(&args);
    let line: serde_json::Value = serde_json::from_str(written.trim()).unwrap();
    assert!(!line["tokens"].as_array().unwrap().is_empty(), "{written}");
}

/// A T5 prefix is its decoder's past, saved as PEFT's SEQ_2_SEQ_LM PREFIX_TUNING says it (two
/// submodules, keys and values H·K wide at each of the encoder's layers).
#[test]
fn seq2seq_trains_a_t5_prefix_that_writes_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let (.., config) = t5_writer(tmp.path(), "t5-prefix", "prefix");
    assert_eq!(config["peft_type"], "PREFIX_TUNING");
    assert_eq!(config["num_transformer_submodules"], 2);
    assert_eq!(config["num_layers"], 2);
    assert_eq!(config["token_dim"], 12);
}

/// A multitask prompt on T5 as PEFT's SEQ_2_SEQ_LM trains one: two submodules, each task's 2M
/// rows half in front of the encoder and half in front of the decoder; each task's own rows scored
/// by eval as training scored them, generate writing for a task, a missing task refused by name.
#[test]
fn seq2seq_trains_a_t5_multitask_prompt_for_encoder_and_decoder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // the tasks' targets are as many tokens, row for row
    let tasks = [("good", "bad film"), ("great", "dull film")];
    let multitask = [
        "--task",
        "seq2seq",
        "--method",
        "multitask",
        "--task-column",
        "task",
    ];
    let (model, _, dev, out) = t5_trained(dir, &tasks, "multi", &multitask);
    let dev_loss = dev_losses(&dir.join("multi"));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("multi").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "MULTITASK_PROMPT_TUNING");
    assert_eq!(config["num_transformer_submodules"], 2);
    assert_eq!(config["num_virtual_tokens"], 4);
    let (tensors, _) = softprompt::files::load_tensors(
        &dir.join("multi").join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors["prompt_embeddings"].dims(), [8, 16]);
    assert_eq!(tensors["prefix_task_cols"].dims(), [2, 8, 1]);

    // each task's dev rows with its own prompt, as many target tokens as the other's: the mean
    // of their token losses is training's dev loss of the kept adapter
    let mut losses = Vec::new();
    for task in ["x", "y"] {
        let of_task = |l: &str| l.ends_with(&format!("\t{task}"));
        let (report, rows) = eval_task(&model, &out, &dev, dir, task, &of_task);
        assert_eq!(rows, 4);
        losses.push(report["token_loss"].as_f64().unwrap());
    }
    let loss = (losses[0] + losses[1]) / 2.0;
    let best = dev_loss.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        (loss - best).abs() < 1e-3,
        "the tasks' token loss {loss} against training's best {best}: {dev_loss:?}"
    );
    writes_tokens(&model, &out, &["--task", "y"]);
    fails_with(
        &["eval", "--model", &model, "--adapter", &out, "--data", &dev],
        &["multitask prompt", "name one of its tasks (x, y)"],
    );
}

#[test]
fn seq2seq_trains_a_t5_prompt_that_writes_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (model, train, dev, out, config) = t5_writer(dir, "t5-writer", "prompt");
    assert_eq!(config["num_transformer_submodules"], 1);

    // what does not fit
    let never = dir.join("never").display().to_string();
    fails_with(
        &train_args(&model, &train, &dev, &never, &["--task", "classify"]),
        &[
            "encoder-decoder (T5)",
            "use --task seq2seq or verbalizer, not classify",
        ],
    );
    let bert = tiny_model().display().to_string();
    fails_with(
        &train_args(&bert, &train, &dev, &never, &["--task", "seq2seq"]),
        &["--task seq2seq needs an encoder-decoder (T5)", "bert"],
    );
    let decoder = tiny_decoder(dir);
    fails_with(
        &[
            "eval",
            "--model",
            &decoder,
            "--adapter",
            &out,
            "--data",
            &dev,
        ],
        &["SEQ_2_SEQ_LM prompt, for an encoder-decoder (T5)", "gpt2"],
    );
    let classifier = fixtures().join("peft-tiny-adapter").display().to_string();
    fails_with(
        &[
            "eval",
            "--model",
            &model,
            "--adapter",
            &classifier,
            "--data",
            &dev,
        ],
        &[
            "encoder-decoder (T5), which reads SEQ_2_SEQ_LM adapters",
            "SEQ_CLS",
        ],
    );
    let unlabelled = dir.join("inputs.tsv");
    std::fs::write(&unlabelled, "text\nthe movie was good\n").unwrap();
    let unlabelled = unlabelled.display().to_string();
    fails_with(
        &train_args(&model, &unlabelled, &dev, &never, &["--task", "seq2seq"]),
        &["inputs.tsv", "label"],
    );
}

/// `--task verbalizer` on a tiny T5, the paper's rank classification: no template is needed (T5
/// writes the label word first thing in its decoder), the prompt learns to make the decoder
/// prefer each review's word (the dev loss falls), the adapter is a SEQ_2_SEQ_LM prompt with its
/// label words beside it, and eval and predict score the labels with it; the zero-shot
/// verbalizer works on T5 too.
#[test]
fn t5_verbalizer_trains_a_prompt_that_ranks_label_words() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let task = ["--task", "verbalizer", "--label-words", "good,bad"];
    let (model, _, dev, out) = t5_trained(dir, &[("positive", "negative")], "t5-ranker", &task);
    let read = |file: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("t5-ranker").join(file)).unwrap())
            .unwrap()
    };
    assert_eq!(read("adapter_config.json")["task_type"], "SEQ_2_SEQ_LM");
    assert_eq!(
        read("softprompt.json")["label_words"],
        serde_json::json!(["good", "bad"])
    );
    let eval: serde_json::Value = eval_json(&model, &out, &dev, &[]);
    assert_eq!(eval["examples"], 8, "{eval}");
    let accuracy = eval["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "{eval}");
    let predicted = ok(&[
        "predict",
        "--model",
        &model,
        "--adapter",
        &out,
        "--json",
        "--input",
        &dev,
    ]);
    let gold: Vec<&str> = std::fs::read_to_string(&dev)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            if l.ends_with("positive") {
                "positive"
            } else {
                "negative"
            }
        })
        .collect();
    let right = predicted
        .lines()
        .zip(&gold)
        .filter(|(p, &g)| serde_json::from_str::<serde_json::Value>(p).unwrap()["label"] == g)
        .count();
    assert_eq!(
        right as f64 / 8.0,
        accuracy,
        "predict's labels give eval's accuracy"
    );
    let zero_shot: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        &model,
        "--zero-shot",
        "--label-words",
        "good,bad",
        "--data",
        &dev,
        "--json",
    ]))
    .unwrap();
    assert!(zero_shot["accuracy"].as_f64().is_some(), "{zero_shot}");
}
