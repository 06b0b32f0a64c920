//! Hidden: conversations rendered with a template, for the test that compares them with LLaVA's `get_prompt()`.
use std::io::{BufRead, Write};

use stic::text::Template;
use stic::Error;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_parser = super::choices::value_enum::<Template>())]
    template: Template,
}

/// Reads one JSON array of messages per line on stdin (strings, `null` for the open assistant turn) and prints
/// each rendering as a JSON string.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let messages: Vec<Option<String>> = serde_json::from_str(&line?).map_err(|e| {
            Error::Input(format!("stdin line {}: expected a JSON array of strings and nulls: {e}", i + 1))
        })?;
        let messages: Vec<Option<&str>> = messages.iter().map(Option::as_deref).collect();
        writeln!(out, "{}", serde_json::to_string(&args.template.render(&messages))?)?;
    }
    Ok(())
}
