//! `stic reproduce`: the paper end to end from one profile.
use std::path::PathBuf;

use stic::stic::reproduce::runner::{last_step, problems, statuses, Status};
use stic::stic::reproduce::steps::Action;
use stic::stic::reproduce::{plan, run_steps, Profile};

#[derive(clap::Args)]
pub struct Args {
    /// A profile file (e.g. configs/official/reproduce.yaml).
    #[arg(long, conflicts_with = "profile", required_unless_present = "profile")]
    config: Option<PathBuf>,
    /// A shipped profile by name: official (the released code as it ran) or paper (the method as the paper
    /// states it); reads configs/NAME/reproduce.yaml.
    #[arg(long, value_parser = super::choices::profile())]
    profile: Option<String>,
    /// Print the steps, what each reads and writes and what is missing, and run nothing.
    #[arg(long)]
    plan: bool,
    /// Stop after this step (the names --plan prints).
    #[arg(long)]
    until: Option<String>,
    /// Only these benchmarks (comma-separated, among the profile's eval.benchmarks).
    #[arg(long, value_delimiter = ',', value_parser = super::choices::benchmark())]
    benchmarks: Option<Vec<String>>,
    #[command(flatten)]
    summary: super::summary::SummaryArgs,
}

pub fn run(args: Args, cli: &clap::Command) -> anyhow::Result<()> {
    let path = match (&args.config, &args.profile) {
        (Some(path), _) => path.clone(),
        (None, Some(name)) => Profile::path_of(std::path::Path::new(""), name)?,
        (None, None) => unreachable!("clap requires --config or --profile"),
    };
    let profile = Profile::load(&path, |var| std::env::var(var).ok(), args.benchmarks.as_deref())?;
    let has_flag = |sub: &str, flag: &str| {
        let long = flag.trim_start_matches("--");
        cli.find_subcommand(sub).is_some_and(|c| c.get_arguments().any(|a| a.get_long() == Some(long)))
    };
    let plan = plan(&profile, &has_flag);
    if args.plan {
        print_plan(&profile, &plan, args.until.as_deref())?;
        return Ok(());
    }
    let binary = std::env::current_exe()?;
    let started = std::time::Instant::now();
    let steps = run_steps(&plan, &profile, &binary, args.until.as_deref())?;
    let output = &profile.cfg.paths.output;
    let path = output.join("reproduce_summary.json");
    let report = &profile.cfg.paths.report;
    let reports: Vec<PathBuf> = ["md", "json", "png"].iter().map(|ext| report.with_extension(ext)).filter(|p| p.is_file()).collect();
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
    args.summary.emit(&path, &summary)?;
    Ok(())
}

fn print_plan(profile: &Profile, plan: &stic::stic::reproduce::Plan, until: Option<&str>) -> stic::Result<()> {
    let last = last_step(plan, until)?;
    let statuses = statuses(plan, profile)?;
    let list = |paths: &[PathBuf]| paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    println!("profile {} ({}): {} steps", profile.cfg.profile, profile.path.display(), plan.steps.len());
    for (k, (step, (status, _))) in plan.steps.iter().zip(&statuses).enumerate() {
        let state = match (status, k > last) {
            (Status::Done, _) => "done",
            (_, true) => "after --until",
            _ => "to run",
        };
        println!("{:>3}. {} [{state}]: {}", k + 1, step.name, step.what);
        match &step.action {
            Action::Command { args, .. } => println!("       command: stic {}", args.join(" ")),
            Action::Subset => println!("       built in: writes the subset"),
            Action::Report => println!("       built in: writes the report"),
        }
        println!("       reads:  {}", list(&step.reads));
        println!("       writes: {}", list(&step.writes));
    }
    let problems = problems(plan, &statuses, last);
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
