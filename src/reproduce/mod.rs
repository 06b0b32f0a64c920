//! `stic reproduce`: the STIC paper end to end from one profile (`configs/<profile>/reproduce.yaml`) — stage-1
//! preferences, DPO, the stage-2 subset, descriptions, infusion, SFT, then every benchmark for the original model
//! and for STIC, each with and without describe-and-respond (with `eval.stage1_row` also for the stage-1 adapter
//! alone), and a report beside the paper's numbers.
//!
//! Every step is a run of this same binary's subcommands (or, for the subset and the report, a function here),
//! so the pipeline needs nothing else at run time. A finished step leaves a marker with its command line: a rerun
//! skips it, a killed step is rerun and continues where its command left off (the generation jobs and evaluation
//! resume their JSONL outputs, training resumes from its latest checkpoint). With `--nproc-per-node N` the steps
//! that have a data-parallel mode (prefs, describe, train-dpo, train-sft, eval) run under torchrun, one rank per
//! device; the rest, and the decisions (skip, resume, mark), stay in this one process.
pub mod config;
pub mod error;
pub mod report;
pub mod runner;
pub mod steps;
pub mod sweep;

use std::path::{Path, PathBuf};

pub use config::{Profile, ReproduceConfig};
pub use error::ReproduceError;
pub use runner::{run_steps, Launch};
pub use steps::{plan, Plan, Step};

use crate::error::{Error, Result};
use steps::FlagSupport;

/// What `stic reproduce` is asked to do.
pub struct ReproduceOptions {
    /// A profile file.
    pub config: Option<PathBuf>,
    /// A shipped profile by name (configs/NAME/reproduce.yaml), when `config` is not given.
    pub profile: Option<String>,
    /// Print the plan and run nothing.
    pub plan_only: bool,
    /// Stop after this step.
    pub until: Option<String>,
    /// Only these benchmarks (among the profile's).
    pub benchmarks: Option<Vec<String>>,
    /// Print the JSON summary on stdout too.
    pub print_summary: bool,
    /// Sweep the switches where this profile (a shipped name, or a file) differs, one at a time.
    pub sweep: Option<String>,
    /// Only these switches of the sweep.
    pub switches: Option<Vec<String>>,
    /// How the data-parallel steps run: in one process, or under torchrun on the devices of the node.
    pub launch: Launch,
}

/// Runs (or with `plan_only` prints) the steps of the profile with this binary, and writes the run's summary to
/// `reproduce_summary.json` in the profile's output folder.
pub fn reproduce(opts: &ReproduceOptions, has_flag: FlagSupport) -> Result<()> {
    let path = match (&opts.config, &opts.profile) {
        (Some(path), _) => path.clone(),
        (None, Some(name)) => Profile::path_of(Path::new(""), name)?,
        (None, None) => return Err(Error::Input("give --config FILE or --profile NAME".into())),
    };
    let profile = Profile::load(&path, |var| std::env::var(var).ok(), opts.benchmarks.as_deref())?;
    if let Some(other) = &opts.sweep {
        return quirk_sweep(&path, profile, other, opts, has_flag);
    }
    let plan = plan(&profile, has_flag);
    if opts.plan_only {
        return runner::print_plan(&profile, &plan, &opts.launch, opts.until.as_deref());
    }
    let binary = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", e))?;
    let started = std::time::Instant::now();
    let steps = run_steps(&plan, &profile, &binary, &opts.launch, opts.until.as_deref())?;
    let output = &profile.cfg.paths.output;
    let path = output.join("reproduce_summary.json");
    let report = &profile.cfg.paths.report;
    let reports: Vec<PathBuf> =
        ["md", "json", "png"].iter().map(|ext| report.with_extension(ext)).filter(|p| p.is_file()).collect();
    let summary = serde_json::json!({
        "profile": profile.cfg.profile,
        "config": profile.path,
        "output": output,
        "summary": path,
        "seconds": started.elapsed().as_secs_f64(),
        "steps_run": steps.iter().filter(|s| s.ran).count(),
        "steps_skipped": steps.iter().filter(|s| !s.ran).count(),
        "steps": steps,
        "reports": reports,
    });
    crate::summary::write_summary(&path, &summary, opts.print_summary)
}

/// `--sweep`: the profile, then the profile with each switch set as `other` sets it, sharing their common steps.
fn quirk_sweep(
    path: &Path,
    profile: Profile,
    other: &str,
    opts: &ReproduceOptions,
    has_flag: FlagSupport,
) -> Result<()> {
    let other = if Path::new(other).is_file() { PathBuf::from(other) } else { Profile::path_of(Path::new(""), other)? };
    let mut switches = sweep::Switches::between(path, &other)?;
    if let Some(only) = &opts.switches {
        switches.keep(only)?;
    }
    let variants = sweep::variants(profile, &switches, |var| std::env::var(var).ok(), opts.benchmarks.as_deref())?;
    if opts.plan_only {
        return sweep::print_sweep_plan(&switches, &variants, has_flag);
    }
    let binary = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", e))?;
    let started = std::time::Instant::now();
    let runs = sweep::run_sweep(&variants, has_flag, &binary, &opts.launch)?;
    println!("{}", sweep::write_sweep_report(&variants)?);
    let count = |f: &dyn Fn(&runner::StepRun) -> bool| runs.iter().flat_map(|r| &r.steps).filter(|s| f(s)).count();
    let shared: usize = runs.iter().map(|r| r.shared.len()).sum();
    let path = variants[0].profile.cfg.paths.output.join("sweep").join("sweep_summary.json");
    let summary = serde_json::json!({
        "profile": variants[0].profile.cfg.profile,
        "against": other,
        "seconds": started.elapsed().as_secs_f64(),
        "runs": runs.len(),
        "steps_run": count(&|s| s.ran),
        "steps_shared": shared,
        "steps_skipped": count(&|s| !s.ran) - shared,
        "not_swept": switches.not_swept.iter().map(|(k, why)| serde_json::json!({ "switch": k, "why": why })).collect::<Vec<_>>(),
        "sweep": runs,
    });
    crate::summary::write_summary(&path, &summary, opts.print_summary)
}
