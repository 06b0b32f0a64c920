use std::io::{BufRead, Write};
use std::path::PathBuf;

use super::model_args::ProcessingArg;
use stic::model::LlavaConfig;
use stic::text::TextTokenizer;
use stic::Error;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (its tokenizer files and config.json; without config.json, give --processing), or its hub
    /// id in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_args::hub_path)]
    model: PathBuf,
    #[command(flatten)]
    processing: ProcessingArg,
    /// Leave out BOS (and EOS where the tokenizer adds it).
    #[arg(long)]
    no_special: bool,
}

/// Reads one JSON string per line on stdin and prints the ids stic feeds the model for it, one JSON array per
/// line (-200 where an `<image>` goes).
pub fn run(args: Args) -> anyhow::Result<()> {
    let processing = match args.processing.processing {
        Some(p) => p,
        None if args.model.join("config.json").is_file() => LlavaConfig::from_dir(&args.model, None)?.image.processing,
        None => {
            return Err(Error::Input(format!(
                "{} has no config.json: give --processing llava or transformers",
                args.model.display()
            ))
            .into())
        }
    };
    let tokenizer = TextTokenizer::from_dir(&args.model, processing)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line?;
        let text: String = serde_json::from_str(&line)
            .map_err(|e| Error::Input(format!("stdin line {}: expected a JSON string: {e}", i + 1)))?;
        writeln!(out, "{}", serde_json::to_string(&tokenizer.encode(&text, !args.no_special)?)?)?;
    }
    Ok(())
}
