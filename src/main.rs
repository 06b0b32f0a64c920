//! The `stic` command line: one subcommand per job.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cli;

#[derive(Parser)]
#[command(name = "stic", version, about = "STIC self-training for LLaVA-v1.6-Mistral on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a response for an image and a prompt.
    Generate(cli::generate::Args),
    /// Log-probabilities of a response (and optionally the full logits) for an image and a prompt.
    Score(cli::score::Args),
    /// Apply one of STIC's image corruptions (what the dispreferred responses are generated from).
    Corrupt(cli::corrupt::Args),
    /// Train a LoRA adapter with the STIC stage-1 objective (DPO + chosen-likelihood term).
    TrainDpo(cli::train_dpo::Args),
    /// Write a small random LLaVA-NeXT-Mistral checkpoint (llava-hf layout) with the shipped tokenizer.
    InitTiny(cli::init_tiny::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => cli::generate::run(args),
        Command::Score(args) => cli::score::run(args),
        Command::InitTiny(args) => cli::init_tiny::run(args),
        Command::TrainDpo(args) => cli::train_dpo::run(args),
        Command::Corrupt(args) => cli::corrupt::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            let internal = err.downcast_ref::<stic::Error>().is_some_and(|e| !e.is_user_error());
            ExitCode::from(if internal { 1 } else { 2 })
        }
    }
}
