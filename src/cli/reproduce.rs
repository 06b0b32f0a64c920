//! `stic reproduce`: the paper end to end from one profile.
use std::path::PathBuf;

use stic::reproduce::{reproduce, Launch, ReproduceOptions};

#[derive(clap::Args)]
pub struct Args {
    /// A profile file (e.g. configs/official/reproduce.yaml).
    #[arg(long, conflicts_with = "profile", required_unless_present = "profile")]
    config: Option<PathBuf>,
    /// A shipped profile by name: official (the released code as it ran) or paper (the method as the paper
    /// states it) on LLaVA-v1.6-Mistral-7B, and each on another of the paper's base models
    /// (official-llava-v1.5-7b, paper-llava-v1.6-vicuna-13b, ...); reads configs/NAME/reproduce.yaml.
    #[arg(long, value_parser = super::choices::profile())]
    profile: Option<String>,
    /// Print the steps, what each reads and writes and what is missing, and run nothing.
    #[arg(long)]
    plan: bool,
    /// Stop after this step (the names --plan prints).
    #[arg(long, conflicts_with = "sweep")]
    until: Option<String>,
    /// The quirk sweep: run the profile, then the profile with each switch set as this other profile (a shipped
    /// name or a file) sets it, one switch at a time, sharing every step two runs have in common; writes a table
    /// of each switch's effect beside the report (REPORT_sweep.md/.json/.png).
    #[arg(long, value_name = "PROFILE")]
    sweep: Option<String>,
    /// Only these switches of the sweep (comma-separated, the names `--sweep P --plan` prints).
    #[arg(long, value_delimiter = ',', requires = "sweep")]
    switches: Option<Vec<String>>,
    /// Only these benchmarks (comma-separated, among the profile's eval.benchmarks).
    #[arg(long, value_delimiter = ',', value_parser = super::choices::benchmark())]
    benchmarks: Option<Vec<String>>,
    /// Run the steps that have a data-parallel mode (prefs, describe, train-dpo, train-sft, eval) under torchrun
    /// with this many ranks, one per GPU (cuda:LOCAL_RANK; gloo on the CPU); training divides its config's
    /// grad_accum among them, so that the global batch stays the profile's. 1: every step in one process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    nproc_per_node: u32,
    /// The torchrun to launch the ranks with (default: torchrun on PATH).
    #[arg(long, value_name = "PATH")]
    torchrun: Option<PathBuf>,
    #[command(flatten)]
    summary: super::summary::SummaryArgs,
}

pub fn run(args: Args, cli: &clap::Command) -> anyhow::Result<()> {
    let has_flag = |sub: &str, flag: &str| {
        let long = flag.trim_start_matches("--");
        cli.find_subcommand(sub).is_some_and(|c| c.get_arguments().any(|a| a.get_long() == Some(long)))
    };
    let opts = ReproduceOptions {
        config: args.config,
        profile: args.profile,
        plan_only: args.plan,
        until: args.until,
        benchmarks: args.benchmarks,
        print_summary: args.summary.json,
        sweep: args.sweep,
        switches: args.switches,
        launch: Launch::new(args.nproc_per_node as usize, args.torchrun)?,
    };
    reproduce(&opts, &has_flag)?;
    Ok(())
}
