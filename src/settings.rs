//! Checks on settings: the range a numeric setting must lie in (shared by the command-line parsers and the
//! config checks), and what differs between the settings an output was made with and those of a rerun.
use serde_json::Value;

/// The values a numeric setting accepts; every range excludes NaN and the infinities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// 0 or more: a temperature, a learning rate, a loss weight.
    NonNegative,
    /// More than 0: DPO's β, a number of epochs.
    Positive,
    /// 0 to 1: a ratio.
    Fraction,
    /// More than 0 and at most 1: nucleus sampling's top-p.
    Probability,
}

impl Range {
    fn contains(self, value: f64) -> bool {
        value.is_finite()
            && match self {
                Range::NonNegative => value >= 0.0,
                Range::Positive => value > 0.0,
                Range::Fraction => (0.0..=1.0).contains(&value),
                Range::Probability => value > 0.0 && value <= 1.0,
            }
    }

    pub fn description(self) -> &'static str {
        match self {
            Range::NonNegative => "a finite number, 0 or more",
            Range::Positive => "a finite number above 0",
            Range::Fraction => "a number from 0 to 1",
            Range::Probability => "a number above 0 and at most 1",
        }
    }

    /// `value` when it lies in the range, else why not ("-1 is not a finite number, 0 or more").
    pub fn check(self, value: f64) -> Result<f64, String> {
        if self.contains(value) {
            Ok(value)
        } else {
            Err(format!("{value} is not {}", self.description()))
        }
    }
}

/// Values longer than this (prompt texts) are reported as changed, without quoting them.
const VALUE_SHOWN: usize = 200;

/// One entry per setting whose value differs between `recorded` and `current` (two JSON objects):
/// `seed (42 before, 7 now)`, nested settings by their dotted path (`generation.max_new_tokens (1 before, 2 now)`);
/// long values only by name.
pub fn differences(recorded: &Value, current: &Value) -> Vec<String> {
    let mut found = Vec::new();
    collect_differences("", recorded, current, &mut found);
    found
}

fn collect_differences(prefix: &str, recorded: &Value, current: &Value, found: &mut Vec<String>) {
    let empty = serde_json::Map::new();
    let (before, now) = (recorded.as_object().unwrap_or(&empty), current.as_object().unwrap_or(&empty));
    for key in before.keys().chain(now.keys().filter(|key| !before.contains_key(*key))) {
        let (a, b) = (before.get(key), now.get(key));
        if a == b {
            continue;
        }
        let name = format!("{prefix}{key}");
        if let (Some(a @ Value::Object(_)), Some(b @ Value::Object(_))) = (a, b) {
            collect_differences(&format!("{name}."), a, b, found);
            continue;
        }
        let show = |value: Option<&Value>| value.map_or_else(|| "unset".to_string(), Value::to_string);
        let (a, b) = (show(a), show(b));
        found.push(if a.len().max(b.len()) > VALUE_SHOWN {
            format!("{name} (changed)")
        } else {
            format!("{name} ({a} before, {b} now)")
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ranges_refuse_nan_infinity_and_values_outside() {
        for (range, good, bad) in [
            (Range::NonNegative, [0.0, 2.5], [-1.0, f64::NAN, f64::INFINITY]),
            (Range::Positive, [1e-9, 3.0], [0.0, -0.5, f64::NAN]),
            (Range::Fraction, [0.0, 1.0], [1.5, -0.1, f64::NEG_INFINITY]),
            (Range::Probability, [1.0, 0.5], [0.0, 2.0, f64::NAN]),
        ] {
            for value in good {
                assert_eq!(range.check(value), Ok(value));
            }
            for value in bad {
                let why = range.check(value).unwrap_err();
                assert!(why.ends_with(range.description()), "{why}");
            }
        }
        assert_eq!(Range::NonNegative.check(-1.0).unwrap_err(), "-1 is not a finite number, 0 or more");
    }

    #[test]
    fn differences_name_each_changed_setting() {
        let before = json!({"seed": 42, "model": "/m", "prompts": "x".repeat(300), "top_p": 1.0});
        let now = json!({"seed": 7, "model": "/m", "prompts": "y".repeat(300), "max_new_tokens": 4});
        assert_eq!(
            differences(&before, &now),
            [
                "seed (42 before, 7 now)",
                "prompts (changed)",
                "top_p (1.0 before, unset now)",
                "max_new_tokens (unset before, 4 now)"
            ]
        );
        assert!(differences(&now, &now).is_empty());
    }
}
