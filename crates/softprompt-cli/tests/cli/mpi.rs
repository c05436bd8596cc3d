//! `mpirun -np 2 softprompt train` on loopback (the `mpi` feature; `make test` installs Open MPI):
//! two ranks train what one process trains, a resumed job continues exactly, and a rank that
//! fails or dies ends the job with an error instead of a hang.
//!
//! Tolerance: each rank sums its share of a batch in f32 and the all-reduce adds the shares, a
//! different order of additions from one process's; that moves the parameters by about 1e-7 of
//! their size a step (5e-7 after 60 AdamW steps here), so they must agree within 1e-5.

use super::{ok, run, stderr, tiny_decoder, tiny_model, toy_data, train_args};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TOLERANCE: f32 = 1e-5;

/// `mpirun` with one `-np 1 softprompt ARGS` per entry of `ranks` (MPMD: each rank its own
/// arguments), each rank on one thread.
fn mpirun(ranks: &[Vec<&str>]) -> Command {
    let mut cmd = Command::new("mpirun");
    // CI runs as root in a container, with more ranks than it may have cores
    cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    for (i, args) in ranks.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args([
            "-np",
            "1",
            env!("CARGO_BIN_EXE_softprompt"),
            "--threads",
            "1",
        ]);
        cmd.args(args);
    }
    cmd
}

fn mpirun_output(ranks: &[Vec<&str>]) -> Output {
    mpirun(ranks)
        .output()
        .expect("mpirun runs (Open MPI: apt-get install openmpi-bin)")
}

fn succeeds(ranks: &[Vec<&str>]) -> String {
    let o = mpirun_output(ranks);
    let err = stderr(&o);
    assert!(o.status.success(), "mpirun {ranks:?} failed:\n{err}");
    err
}

fn tensors(dir: &str) -> std::collections::HashMap<String, Vec<f32>> {
    let path = Path::new(dir).join("adapter_model.safetensors");
    let (tensors, _) = softprompt::files::load_tensors(&path, &candle_core::Device::Cpu).unwrap();
    tensors
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// Every tensor of the two adapters within `TOLERANCE` of its largest value.
fn assert_adapters_agree(a: &str, b: &str) {
    let (a_tensors, b_tensors) = (tensors(a), tensors(b));
    let mut names: Vec<_> = a_tensors.keys().collect();
    names.sort();
    let mut b_names: Vec<_> = b_tensors.keys().collect();
    b_names.sort();
    assert_eq!(names, b_names);
    for name in names {
        let (x, y) = (&a_tensors[name], &b_tensors[name]);
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            worst <= TOLERANCE * scale,
            "{name}: {a} and {b} differ by {worst} (of {scale})"
        );
    }
}

/// (step, dev accuracy, dev loss) of each evaluation in a run's metrics.jsonl.
fn evaluations(dir: &str) -> Vec<(u64, f64, f64)> {
    let text = std::fs::read_to_string(Path::new(dir).join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("dev_loss").is_some())
        .map(|r| {
            let f = |k: &str| r[k].as_f64().unwrap();
            (
                r["step"].as_u64().unwrap(),
                f("dev_accuracy"),
                f("dev_loss"),
            )
        })
        .collect()
}

fn assert_same_evaluations(one: &str, two: &str) {
    let (a, b) = (evaluations(one), evaluations(two));
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for ((step, acc, loss), (step_b, acc_b, loss_b)) in a.iter().zip(&b) {
        assert_eq!(
            (step, acc),
            (step_b, acc_b),
            "{one} and {two} evaluate apart"
        );
        let close = (loss - loss_b).abs() <= TOLERANCE as f64 * loss.abs();
        assert!(close, "step {step}: dev loss {loss} against {loss_b}");
    }
}

/// A global batch of 7 splits 3 + 4, and the 8 dev rows 4 + 4: the ranks' shares weigh by their size, and the dev counts add up to what one
/// process counts.
#[test]
fn two_ranks_train_what_one_process_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let (one, two) = (dir.join("one"), dir.join("two"));
    let (one, two) = (one.to_str().unwrap(), two.to_str().unwrap());
    let args = |out| {
        let data = ["train", "--model", &model, "--train", &train, "--dev", &dev];
        let run = ["--output", out, "--batch-size", "7", "--max-steps", "60"];
        let options = [
            "--eval-every",
            "10",
            "--patience",
            "0",
            "--num-virtual-tokens",
            "4",
        ];
        [&data[..], &run, &options].concat()
    };
    ok(&args(one));
    let args = args(two);
    let said = succeeds(&[args.clone(), args]);
    assert!(
        said.contains("rank 0 of 2 on ") && said.contains("rank 1 of 2 on "),
        "{said}"
    );
    // rank 0 alone speaks for the run: one line per evaluation
    assert_eq!(said.matches("step 60: dev accuracy").count(), 1, "{said}");
    assert_adapters_agree(one, two);
    assert_same_evaluations(one, two);
}

/// A causal LM's loss is a mean over target tokens: targets of one to four words make the
/// ranks' shares of a batch hold different numbers of tokens, which the reduction must weigh.
/// 25 rows in batches of 8 end each epoch with a batch of one: rank 0 has no share of it.
#[test]
fn two_ranks_weigh_a_causal_lm_by_its_target_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = tiny_decoder(dir);
    let words = ["good", "bad film", "the dull plot", "a great fun movie"];
    let rows: Vec<String> = (0..25)
        .map(|i| format!("{} film\t{}", words[i % 3], words[(i * 7 + i / 4) % 4]))
        .collect();
    let data = dir.join("pairs.tsv");
    std::fs::write(&data, format!("text\tlabel\n{}\n", rows.join("\n"))).unwrap();
    let data = data.to_str().unwrap();
    let (one, two) = (dir.join("one"), dir.join("two"));
    let (one, two) = (one.to_str().unwrap(), two.to_str().unwrap());
    let extra = [
        "--task",
        "causal-lm",
        "--num-virtual-tokens",
        "4",
        "--lr",
        "0.1",
    ];
    let extra = [
        &extra[..],
        &["--max-steps", "12", "--eval-every", "4", "--patience", "0"],
    ]
    .concat();
    ok(&train_args(&model, data, data, one, &extra));
    let args = train_args(&model, data, data, two, &extra);
    succeeds(&[args.clone(), args]);
    assert_adapters_agree(one, two);
    assert_same_evaluations(one, two);
}

/// The pid of rank `rank` among mpirun's children (Open MPI starts local ranks itself).
fn rank_pid(mpirun: u32, rank: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{mpirun}/task/{mpirun}/children")).ok()?;
    children.split_whitespace().find_map(|pid| {
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
        env.split(|&b| b == 0)
            .any(|var| var == wanted.as_bytes())
            .then(|| pid.parse().ok())?
    })
}

/// Killing one rank ends the whole job with an error within seconds; the same command with
/// `--resume` continues from the last checkpoint to the adapter of a job never interrupted.
#[test]
fn a_killed_rank_ends_the_job_and_resume_continues_it_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let (whole, cut) = (dir.join("whole"), dir.join("cut"));
    let (whole, cut) = (whole.to_str().unwrap(), cut.to_str().unwrap());
    let extra = super::long_toy_run("1500", "25");
    let args = train_args(&model, &train, &dev, whole, &extra);
    succeeds(&[args.clone(), args]);

    let args = train_args(&model, &train, &dev, cut, &extra);
    let mut job = mpirun(&[args.clone(), args.clone()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let checkpoint = Path::new(cut).join("checkpoint.safetensors");
    let waiting = Instant::now();
    let victim = loop {
        if let (true, Some(pid)) = (checkpoint.exists(), rank_pid(job.id(), 1)) {
            break pid;
        }
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before its first checkpoint"
        );
        assert!(
            waiting.elapsed() < Duration::from_secs(120),
            "no checkpoint after 120 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    // SAFETY: kill() with a pid that mpirun started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "rank 0 still runs 20 s after rank 1 died"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success(), "the job succeeded with a rank killed");
    let mut resumed = args.clone();
    resumed.push("--resume");
    let said = succeeds(&[resumed.clone(), resumed]);
    assert!(said.contains("resumed at step"), "{said}");
    let read = |d: &str| std::fs::read(Path::new(d).join("adapter_model.safetensors")).unwrap();
    assert!(
        read(whole) == read(cut),
        "the resumed job's adapter differs from the whole job's"
    );
}

/// A rank whose training file is missing ends the job with its error, naming the rank; a rank
/// given other options is refused at the start by every rank, and says what differs.
#[test]
fn a_failing_or_mismatched_rank_ends_the_job_with_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("out").display().to_string();
    let extra = ["--max-steps", "5"];
    let good = train_args(&model, &train, &dev, &out, &extra);
    let missing = dir.join("nowhere.tsv").display().to_string();
    let bad = train_args(&model, &missing, &dev, &out, &extra);
    let started = Instant::now();
    let o = mpirun_output(&[good.clone(), bad]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 1 of 2: error:") && err.contains("nowhere.tsv"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));

    let other_seed = [&good[..], &["--seed", "7"]].concat();
    let o = mpirun_output(&[good, other_seed]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("rank 1 does not run rank 0's job"), "{err}");
    assert!(
        err.contains("rank 1: seed: 7") && err.contains("rank 0: seed: 0"),
        "{err}"
    );
    assert!(!Path::new(&out).join("adapter_model.safetensors").exists());
}

/// The same binary, started alone, trains alone (MPI is joined only under a launcher).
#[test]
fn a_build_with_mpi_trains_alone_without_a_launcher() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (train, dev) = toy_data(dir);
    let model = tiny_model().display().to_string();
    let out = dir.join("alone").display().to_string();
    let o = run(&train_args(
        &model,
        &train,
        &dev,
        &out,
        &["--max-steps", "3"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("rank 0 of"), "{}", stderr(&o));
}
