//! The JSON summary a command ends with: always written to its output folder, and printed on stdout with `--json`.
use std::path::Path;

use crate::error::Result;
use crate::fsutil::{create_parent, write_atomic};

/// Writes `summary` (pretty-printed) to `path` all or nothing, and prints it on stdout as one line when `print`.
pub fn write_summary(path: &Path, summary: &serde_json::Value, print: bool) -> Result<()> {
    let mut text = serde_json::to_string_pretty(summary).expect("a JSON value serialises");
    text.push('\n');
    create_parent(path)?;
    write_atomic(path, text.as_bytes())?;
    if print {
        println!("{summary}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.json");
        let summary = serde_json::json!({"steps": 3, "outputs": {"adapter": "out"}});
        write_summary(&path, &summary, false).unwrap();
        let back: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, summary);
    }
}
