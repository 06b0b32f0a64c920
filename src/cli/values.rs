//! Parsers of the numeric flags that have a range: clap refuses a value outside it (exit 2), naming the flag.
use stic::settings::Range;

fn number(text: &str, range: Range) -> Result<f64, String> {
    let value: f64 = text.trim().parse().map_err(|_| format!("'{text}' is not a number"))?;
    range.check(value)
}

/// A sampling temperature: 0 (greedy) or more.
pub fn temperature(text: &str) -> Result<f64, String> {
    number(text, Range::NonNegative)
}

/// Nucleus sampling's top-p: above 0, at most 1 (1 keeps every token).
pub fn top_p(text: &str) -> Result<f64, String> {
    number(text, Range::Probability)
}
