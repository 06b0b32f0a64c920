//! Progress of long work: a bar on a terminal; elsewhere (nohup, SLURM, a pipe) plain lines on stderr, the first,
//! then one every `STIC_PROGRESS_SECONDS` seconds (default 30), and the last:
//! `step 12/300 (4%) · 0.85 steps/s · loss 0.6931 · ETA 5m38s`.
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

const INTERVAL_ENV: &str = "STIC_PROGRESS_SECONDS";
const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

enum Output {
    Bar(ProgressBar),
    /// `printed`: when the last line was printed, and at which position.
    Lines {
        every: Duration,
        printed: Option<(Instant, u64)>,
    },
    Hidden,
}

pub struct Progress {
    output: Output,
    /// What one position counts, as lines name it: "step" gives "step 3/10 … steps/s", "items" "items 3/10 … items/s".
    label: String,
    rate_unit: String,
    position: u64,
    total: u64,
    /// Where this run started (a resumed run counts its rate from there).
    start_position: u64,
    started: Instant,
    message: String,
}

impl Progress {
    /// `label` names the position ("step", "items"), `rate_unit` the rate ("steps", "items"); `visible` false
    /// shows nothing (the ranks other than 0 under torchrun).
    pub fn new(total: u64, start_position: u64, label: &str, rate_unit: &str, visible: bool) -> Self {
        let output = if !visible {
            Output::Hidden
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total).with_position(start_position);
            let template =
                format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {rate_unit}, {{per_sec}}, ETA {{eta}} {{msg}}");
            bar.set_style(ProgressStyle::with_template(&template).expect("template"));
            Output::Bar(bar)
        } else {
            Output::Lines { every: line_interval(), printed: None }
        };
        let mut progress = Progress {
            output,
            label: label.into(),
            rate_unit: rate_unit.into(),
            position: start_position,
            total,
            start_position,
            started: Instant::now(),
            message: String::new(),
        };
        progress.maybe_print(false);
        progress
    }

    /// Text shown after the rate (the loss of the last step, the shard).
    pub fn set_message(&mut self, message: String) {
        if let Output::Bar(bar) = &self.output {
            bar.set_message(message.clone());
        }
        self.message = message;
    }

    pub fn inc(&mut self, delta: u64) {
        self.position += delta;
        if let Output::Bar(bar) = &self.output {
            bar.inc(delta);
        }
        self.maybe_print(false);
    }

    pub fn finish(&mut self) {
        match &self.output {
            Output::Bar(bar) => bar.finish(),
            Output::Lines { .. } => self.maybe_print(true),
            Output::Hidden => {}
        }
    }

    fn maybe_print(&mut self, last: bool) {
        let Output::Lines { every, printed } = &mut self.output else { return };
        let now = Instant::now();
        let due = match *printed {
            None => true,
            Some((_, position)) if last => position != self.position,
            Some((at, _)) => now.duration_since(at) >= *every,
        };
        if !due {
            return;
        }
        *printed = Some((now, self.position));
        let line = self.line(now.duration_since(self.started));
        eprintln!("{line}");
    }

    /// The plain line after `elapsed` seconds of this run.
    fn line(&self, elapsed: Duration) -> String {
        let done = self.position.saturating_sub(self.start_position);
        let rate = if elapsed.as_secs_f64() > 0.0 { done as f64 / elapsed.as_secs_f64() } else { 0.0 };
        let percent = (100 * self.position).checked_div(self.total).unwrap_or(100);
        let mut parts = vec![
            format!("{} {}/{} ({percent}%)", self.label, self.position, self.total),
            format!("{} {}/s", format_rate(rate), self.rate_unit),
        ];
        if !self.message.is_empty() {
            parts.push(self.message.clone());
        }
        let remaining = self.total.saturating_sub(self.position);
        parts.push(match remaining {
            0 => format!("done in {}", format_duration(elapsed.as_secs_f64(), Precision::Coarse)),
            _ if rate > 0.0 => format!("ETA {}", format_duration(remaining as f64 / rate, Precision::Coarse)),
            _ => "ETA ?".into(),
        });
        parts.join(" · ")
    }
}

fn line_interval() -> Duration {
    std::env::var(INTERVAL_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(DEFAULT_INTERVAL, Duration::from_secs_f64)
}

fn format_rate(rate: f64) -> String {
    if rate >= 100.0 {
        format!("{rate:.0}")
    } else if rate >= 0.1 {
        format!("{rate:.2}")
    } else {
        format!("{rate:.3}")
    }
}

/// How much of a duration [`format_duration`] shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// The seconds only under ten minutes: 38s, 5m38s, 54m, 2h05m.
    Coarse,
    /// Always to the second: 38s, 54m07s, 2h05m07s.
    Seconds,
}

pub fn format_duration(seconds: f64, precision: Precision) -> String {
    let s = seconds.round() as u64;
    let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
    let coarse = precision == Precision::Coarse && s >= 600;
    match (h, m) {
        (0, 0) => format!("{sec}s"),
        (0, _) if coarse => format!("{m}m"),
        (0, _) => format!("{m}m{sec:02}s"),
        _ if coarse => format!("{h}h{m:02}m"),
        _ => format!("{h}h{m:02}m{sec:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_has_position_rate_message_and_eta() {
        let mut p = Progress {
            output: Output::Hidden,
            label: "step".into(),
            rate_unit: "steps".into(),
            position: 12,
            total: 300,
            start_position: 0,
            started: Instant::now(),
            message: String::new(),
        };
        p.set_message("loss 0.6931".into());
        assert_eq!(
            p.line(Duration::from_secs_f64(12.0 / 0.85)),
            "step 12/300 (4%) · 0.85 steps/s · loss 0.6931 · ETA 5m39s"
        );
        p.position = 300;
        assert_eq!(
            p.line(Duration::from_secs(4000)),
            "step 300/300 (100%) · 0.075 steps/s · loss 0.6931 · done in 1h06m"
        );
        assert_eq!(format_duration(54.0 * 60.0 + 7.0, Precision::Coarse), "54m");
    }

    #[test]
    fn durations_at_each_precision() {
        for (seconds, coarse, to_the_second) in [
            (38.4, "38s", "38s"),
            (338.0, "5m38s", "5m38s"),
            (599.0, "9m59s", "9m59s"),
            (600.0, "10m", "10m00s"),
            (3247.0, "54m", "54m07s"),
            (7507.0, "2h05m", "2h05m07s"),
        ] {
            assert_eq!(format_duration(seconds, Precision::Coarse), coarse);
            assert_eq!(format_duration(seconds, Precision::Seconds), to_the_second);
        }
    }
}
