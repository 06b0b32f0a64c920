//! Runs a plan: skips the steps done before, checks that everything the others need is there before starting
//! any, runs them in order with one progress line per step (step k/n, what, elapsed, ETA where known), and
//! leaves a marker after each. With `--nproc-per-node N` the steps that have a data-parallel mode run under
//! torchrun, one rank per device.
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::config::{Profile, Subset};
use super::steps::{Action, Plan, Ranks, Step};
use super::{report, ReproduceError};
use crate::error::{Error, Result};
use crate::fsutil::{create_parent, write_atomic};
use crate::progress::{format_duration, Precision};

#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    command: Vec<String>,
    seconds: f64,
    /// The ranks of a step run under torchrun (not part of its identity: the results do not depend on them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ranks: Option<usize>,
}

/// How the steps that have a data-parallel mode run: in one process, or under torchrun with `ranks` processes
/// (`stic reproduce --nproc-per-node N`), each on its own device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    Single,
    Torchrun { torchrun: PathBuf, ranks: usize },
}

impl Launch {
    /// `--nproc-per-node ranks`, with torchrun at `torchrun` or else on `PATH`.
    pub fn new(ranks: usize, torchrun: Option<PathBuf>) -> Result<Launch, ReproduceError> {
        if ranks <= 1 {
            return Ok(Launch::Single);
        }
        let torchrun = match torchrun {
            Some(path) if path.is_file() => path,
            Some(path) => return Err(ReproduceError::TorchrunMissing { path }),
            None => std::env::var_os("PATH")
                .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join("torchrun")).find(|p| p.is_file()))
                .ok_or(ReproduceError::TorchrunNotFound { ranks })?,
        };
        Ok(Launch::Torchrun { torchrun, ranks })
    }

    /// The program and arguments that run subcommand `args` of `binary`: the data-parallel ones as
    /// `torchrun --standalone --nproc-per-node N --no-python BINARY ARGS` (a training step with its share of the
    /// profile's `grad_accum`), the others as they are.
    fn command_line(&self, binary: &Path, args: &[String], ranks: Ranks) -> (PathBuf, Vec<String>) {
        match (self, ranks) {
            (Launch::Torchrun { torchrun, ranks: n }, Ranks::Shards | Ranks::Training { .. }) => {
                let mut line: Vec<String> = vec!["--standalone".into(), "--nproc-per-node".into(), n.to_string()];
                line.extend(["--no-python".to_string(), binary.display().to_string()]);
                line.extend(args.iter().cloned());
                if let Ranks::Training { grad_accum } = ranks {
                    line.extend(["--grad-accum".to_string(), (grad_accum / n).to_string()]);
                }
                (torchrun.clone(), line)
            }
            _ => (binary.to_path_buf(), args.to_vec()),
        }
    }

    /// The ranks `step` runs on under torchrun; None when it runs in one process.
    fn ranks_of(&self, step: &Step) -> Option<usize> {
        match (self, &step.action) {
            (Launch::Torchrun { ranks, .. }, Action::Command { ranks: Ranks::Shards | Ranks::Training { .. }, .. }) => {
                Some(*ranks)
            }
            _ => None,
        }
    }

    /// Why `step` cannot run under this launch: a training step whose `grad_accum` the ranks do not divide.
    fn problem(&self, step: &Step) -> Option<String> {
        let (Launch::Torchrun { ranks, .. }, Action::Command { ranks: Ranks::Training { grad_accum }, .. }) =
            (self, &step.action)
        else {
            return None;
        };
        (grad_accum % ranks != 0).then(|| {
            format!(
                "  {}: grad_accum {grad_accum} of its training config is not a multiple of --nproc-per-node {ranks}, \
                 so the ranks cannot keep the profile's global batch; use a number of ranks that divides it",
                step.name
            )
        })
    }
}

fn marker_path(output: &Path, step: &Step) -> PathBuf {
    output.join(".steps").join(format!("{}.json", step.name))
}

/// What identifies a step's work: its command line, or what the internal steps read.
pub(super) fn signature(step: &Step, profile: &Profile) -> Vec<String> {
    match &step.action {
        Action::Command { args, .. } => args.clone(),
        Action::Subset => {
            let s = &profile.cfg.stage2;
            let mut sig = vec![
                "stage2-subset".to_string(),
                format!("{:?}", s.subset),
                profile.cfg.paths.instruction_json.display().to_string(),
            ];
            sig.extend(s.sample.map(|x| format!("size {} seed {}", x.size, x.seed)));
            sig
        }
        Action::Report => Vec::new(),
    }
}

/// Marks `step` done in the profile's output folder, with the command line that did it.
pub(super) fn write_marker(step: &Step, profile: &Profile, seconds: f64, ranks: Option<usize>) -> Result<()> {
    let marker = Marker { command: signature(step, profile), seconds, ranks };
    let path = marker_path(&profile.cfg.paths.output, step);
    create_parent(&path)?;
    write_atomic(&path, serde_json::to_string_pretty(&marker).expect("marker serialises").as_bytes())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Done,
    ToRun,
}

/// The status of every step, and the time each done step took; a step done with another command line is an
/// error (its outputs would not be what the profile says).
pub fn statuses(plan: &Plan, profile: &Profile) -> Result<Vec<(Status, Option<f64>)>> {
    let output = &profile.cfg.paths.output;
    plan.steps
        .iter()
        .map(|step| {
            if step.action == Action::Report {
                return Ok((Status::ToRun, None));
            }
            let path = marker_path(output, step);
            let Ok(marker) = crate::fsutil::read_json::<Marker>(&path) else { return Ok((Status::ToRun, None)) };
            if !step.writes.iter().all(|w| w.exists()) {
                return Ok((Status::ToRun, None));
            }
            if marker.command != signature(step, profile) {
                return Err(ReproduceError::StepChanged {
                    step: step.name.clone(),
                    marker: path,
                    output: step.writes[0].clone(),
                }
                .into());
            }
            Ok((Status::Done, Some(marker.seconds)))
        })
        .collect()
}

/// The index of the last step to run (`until`: its name).
pub fn last_step(plan: &Plan, until: Option<&str>) -> Result<usize> {
    match until {
        None => Ok(plan.steps.len() - 1),
        Some(name) => plan.steps.iter().position(|s| s.name == name).ok_or_else(|| {
            ReproduceError::UnknownStep {
                name: name.to_string(),
                steps: plan.steps.iter().map(|s| s.name.clone()).collect(),
            }
            .into()
        }),
    }
}

/// What stops the steps still to run (up to `last`) from starting: missing inputs, missing flags, and ranks that
/// a training step cannot share its global batch among.
pub fn problems(plan: &Plan, statuses: &[(Status, Option<f64>)], last: usize, launch: &Launch) -> Vec<String> {
    let mut problems: Vec<String> = Vec::new();
    for (step, (status, _)) in plan.steps.iter().zip(statuses).take(last + 1) {
        if *status == Status::Done {
            continue;
        }
        let unsupported = step.unsupported.iter().map(|u| format!("  {u}"));
        for p in step.problems.iter().cloned().chain(unsupported).chain(launch.problem(step)) {
            if !problems.contains(&p) {
                problems.push(p);
            }
        }
    }
    problems
}

/// The remaining time from the mean duration of each kind of step; `None` while a kind to come is unmeasured.
fn eta(plan: &Plan, durations: &[Option<f64>], from: usize, last: usize) -> Option<f64> {
    let mut by_kind: HashMap<&str, (f64, usize)> = HashMap::new();
    for (step, d) in plan.steps.iter().zip(durations) {
        if let Some(d) = d {
            let e = by_kind.entry(step.kind).or_default();
            e.0 += d;
            e.1 += 1;
        }
    }
    plan.steps[from..=last]
        .iter()
        .zip(&durations[from..=last])
        .filter(|(_, d)| d.is_none())
        .map(|(step, _)| by_kind.get(step.kind).map(|(sum, n)| sum / *n as f64))
        .sum()
}

/// One step of a run: run now, or done before (skipped), and how long it took.
#[derive(Debug, serde::Serialize)]
pub struct StepRun {
    pub name: String,
    pub ran: bool,
    pub seconds: Option<f64>,
}

/// Runs the steps up to `last` that are not done, with `binary` for the subcommands.
pub fn run_steps(
    plan: &Plan,
    profile: &Profile,
    binary: &Path,
    launch: &Launch,
    until: Option<&str>,
) -> Result<Vec<StepRun>> {
    let last = last_step(plan, until)?;
    let statuses = statuses(plan, profile)?;
    let problems = problems(plan, &statuses, last, launch);
    if !problems.is_empty() {
        return Err(ReproduceError::NotReady { problems }.into());
    }
    let mut durations: Vec<Option<f64>> = statuses.iter().map(|(_, d)| *d).collect();
    let n = plan.steps.len();
    let started = Instant::now();
    let mut runs = Vec::new();
    for (k, step) in plan.steps.iter().enumerate().take(last + 1) {
        if statuses[k].0 == Status::Done {
            eprintln!("[{}/{n}] {}: done before, skipped", k + 1, step.name);
            runs.push(StepRun { name: step.name.clone(), ran: false, seconds: statuses[k].1 });
            continue;
        }
        let eta = eta(plan, &durations, k, last).map_or_else(
            || "ETA unknown until each kind of step has run once".to_string(),
            |s| format!("ETA {}", format_duration(s, Precision::Seconds)),
        );
        eprintln!(
            "[{}/{n}] {}: {} (elapsed {}, {eta})",
            k + 1,
            step.name,
            step.what,
            format_duration(started.elapsed().as_secs_f64(), Precision::Seconds)
        );
        let t = Instant::now();
        match &step.action {
            Action::Command { args, resume_from, ranks } => {
                let (program, args) = launch.command_line(binary, args, *ranks);
                let under_torchrun = launch.ranks_of(step).is_some();
                run_command(step, &program, &args, resume_from.as_deref(), under_torchrun)?
            }
            Action::Subset => write_subset(profile, &step.writes[0])?,
            Action::Report => {
                let written = report::write_report(profile, plan)?;
                println!("{written}");
            }
        }
        let seconds = t.elapsed().as_secs_f64();
        durations[k] = Some(seconds);
        if step.action != Action::Report {
            write_marker(step, profile, seconds, launch.ranks_of(step))?;
        }
        eprintln!("[{}/{n}] {} done in {}", k + 1, step.name, format_duration(seconds, Precision::Seconds));
        runs.push(StepRun { name: step.name.clone(), ran: true, seconds: Some(seconds) });
    }
    Ok(runs)
}

fn run_command(
    step: &Step,
    program: &Path,
    args: &[String],
    resume_from: Option<&Path>,
    under_torchrun: bool,
) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mut args = args.to_vec();
    if resume_from.is_some_and(|dir| dir.join("checkpoints/latest").is_file()) {
        args.push("--resume".into());
    }
    let _ = std::io::stderr().flush();
    // The subcommand's stdout (summaries) goes to stderr with its progress; stdout is left for the report.
    let stdout = std::io::stderr().lock();
    let stdout = std::os::fd::AsFd::as_fd(&stdout)
        .try_clone_to_owned()
        .map_err(|source| ReproduceError::Spawn { step: step.name.clone(), source })?;
    let mut command = std::process::Command::new(program);
    command.args(&args).stdout(stdout);
    // A killed `stic reproduce` takes its running step with it, so that a rerun can take over its outputs:
    // torchrun gets the signal it answers by stopping its ranks.
    let signal = if under_torchrun { libc::SIGTERM } else { libc::SIGKILL };
    unsafe {
        command.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, signal);
            Ok(())
        });
    }
    let status = command.status().map_err(|source| ReproduceError::Spawn { step: step.name.clone(), source })?;
    if !status.success() {
        let mut status = status.code().map_or_else(|| "killed by a signal".to_string(), |c| format!("exit code {c}"));
        if under_torchrun {
            status.push_str(" of torchrun, whose report above names the rank that failed first");
        }
        return Err(
            ReproduceError::StepFailed { step: step.name.clone(), status, output: step.writes[0].clone() }.into()
        );
    }
    Ok(())
}

/// The stage-2 instruction subset: STIC's 5k file as it is, or a seeded sample of the entries with an image.
pub fn write_subset(profile: &Profile, out: &Path) -> Result<()> {
    let source = &profile.cfg.paths.instruction_json;
    let entries = crate::method::infuse::load_instruction_data(source)?;
    let with_images: Vec<_> = entries.iter().filter(|e| e.image.is_some()).collect();
    if with_images.is_empty() {
        return Err(Error::Input(format!(
            "{}: no entry has an image, nothing to describe in stage 2",
            source.display()
        )));
    }
    let subset = match (profile.cfg.stage2.subset, profile.cfg.stage2.sample) {
        (Subset::SeededSample, Some(sample)) => {
            let picked = crate::method::sample::seeded_sample(with_images, sample.size, sample.seed);
            if picked.len() < sample.size {
                eprintln!(
                    "{} has {} entries with an image, fewer than stage2.sample.size {}: taking them all",
                    source.display(),
                    picked.len(),
                    sample.size
                );
            }
            picked.into_iter().cloned().collect()
        }
        _ => entries,
    };
    create_parent(out)?;
    write_atomic(out, serde_json::to_string(&subset).expect("entries serialise").as_bytes())?;
    eprintln!("{}: {} entries", out.display(), subset.len());
    Ok(())
}

/// Prints the steps of `plan` up to `until`, what each reads and writes, and what is missing (`stic reproduce --plan`).
pub fn print_plan(profile: &Profile, plan: &Plan, launch: &Launch, until: Option<&str>) -> Result<()> {
    let last = last_step(plan, until)?;
    let statuses = statuses(plan, profile)?;
    let list = |paths: &[PathBuf]| paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    println!(
        "profile {} ({}, {}): {} steps",
        profile.cfg.profile,
        profile.path.display(),
        profile.cfg.model.base.title(),
        plan.steps.len()
    );
    println!("fetch (each path can also come from its environment variable):");
    for (key, place, source) in super::steps::fetch_list(profile) {
        println!("  {key}: {place}: {source}");
    }
    for (k, (step, (status, _))) in plan.steps.iter().zip(&statuses).enumerate() {
        let state = match (status, k > last) {
            (Status::Done, _) => "done",
            (_, true) => "after --until",
            _ => "to run",
        };
        println!("{:>3}. {} [{state}]: {}", k + 1, step.name, step.what);
        match &step.action {
            Action::Command { args, ranks, .. } => {
                let (program, args) = launch.command_line(Path::new("stic"), args, *ranks);
                println!("       command: {} {}", program.display(), args.join(" "))
            }
            Action::Subset => println!("       built in: writes the subset"),
            Action::Report => println!("       built in: writes the report"),
        }
        println!("       reads:  {}", list(&step.reads));
        println!("       writes: {}", list(&step.writes));
    }
    let problems = problems(plan, &statuses, last, launch);
    if problems.is_empty() {
        println!("nothing is missing");
    } else {
        println!("missing (a run stops at the start until these are there):");
        for p in problems {
            println!("{p}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchrun_runs_the_data_parallel_steps_and_divides_grad_accum() {
        let binary = Path::new("/bin/stic");
        let args: Vec<String> = ["train-dpo", "--config", "c.yaml"].map(String::from).to_vec();
        let launch = Launch::Torchrun { torchrun: PathBuf::from("/usr/bin/torchrun"), ranks: 2 };
        let (program, line) = launch.command_line(binary, &args, Ranks::Training { grad_accum: 8 });
        assert_eq!(program, PathBuf::from("/usr/bin/torchrun"));
        let expected = "--standalone --nproc-per-node 2 --no-python /bin/stic train-dpo --config c.yaml --grad-accum 4";
        assert_eq!(line.join(" "), expected);
        let (_, line) = launch.command_line(binary, &args, Ranks::Shards);
        assert_eq!(line.join(" "), "--standalone --nproc-per-node 2 --no-python /bin/stic train-dpo --config c.yaml");
        for (launch, ranks) in [(&launch, Ranks::One), (&Launch::Single, Ranks::Training { grad_accum: 8 })] {
            assert_eq!(launch.command_line(binary, &args, ranks), (binary.to_path_buf(), args.clone()));
        }
    }

    #[test]
    fn one_rank_needs_no_torchrun() {
        assert_eq!(Launch::new(1, Some(PathBuf::from("/nonexistent/torchrun"))).unwrap(), Launch::Single);
        assert!(matches!(
            Launch::new(2, Some(PathBuf::from("/nonexistent/torchrun"))),
            Err(ReproduceError::TorchrunMissing { .. })
        ));
    }
}
