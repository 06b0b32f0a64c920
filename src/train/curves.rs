//! `train_curves.png`: one panel per curve of the log history (loss, reward margins and accuracy for DPO, the
//! learning rate), train values as a line and eval values as points on top. Drawn with `plotters` into a pixel
//! buffer, with the DejaVu Sans font embedded in the binary: no Python, no system fonts.
use plotters::prelude::*;
use serde_json::{Map, Value};
use std::path::Path;

use crate::error::{Error, Result};

pub const FILE: &str = "train_curves.png";
pub const PANEL_WIDTH: u32 = 600;
pub const PANEL_HEIGHT: u32 = 400;

/// (title, train key, eval key) of each panel that the history has values for.
const PANELS: [(&str, &str, Option<&str>); 4] = [
    ("loss", "loss", Some("eval_loss")),
    ("reward margin", "rewards/margins", Some("eval_rewards/margins")),
    ("reward accuracy", "rewards/accuracies", Some("eval_rewards/accuracies")),
    ("learning rate", "learning_rate", None),
];

fn points(history: &[Map<String, Value>], key: &str) -> Vec<(f64, f64)> {
    history
        .iter()
        .filter_map(|e| Some((e.get("step")?.as_f64()?, e.get(key)?.as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// The size of the picture for `panels` panels: two per row.
pub fn size(panels: usize) -> (u32, u32) {
    (2 * PANEL_WIDTH, PANEL_HEIGHT * panels.div_ceil(2).max(1) as u32)
}

/// Draws the curves of `history` (trainer_state.json's log_history) to `path`, all or nothing.
pub fn draw(path: &Path, history: &[Map<String, Value>]) -> Result<()> {
    let panels: Vec<_> = PANELS
        .iter()
        .map(|&(title, train, eval)| {
            (title, points(history, train), eval.map(|k| points(history, k)).unwrap_or_default())
        })
        .filter(|(_, train, _)| !train.is_empty())
        .collect();
    let (width, height) = size(panels.len());
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    let failed = |e: &dyn std::fmt::Display| Error::Training(format!("drawing {}: {e}", path.display()));
    {
        let font = crate::plot::font();
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        let areas = root.split_evenly((panels.len().div_ceil(2).max(1), 2));
        for ((title, train, eval), area) in panels.iter().zip(&areas) {
            let all = train.iter().chain(eval);
            let (x_max, (y_min, y_max)) =
                all.clone().fold((1.0f64, (f64::INFINITY, f64::NEG_INFINITY)), |(x, (lo, hi)), &(s, v)| {
                    (x.max(s), (lo.min(v), hi.max(v)))
                });
            let pad = ((y_max - y_min).abs() * 0.05).max(y_max.abs() * 1e-3).max(1e-12);
            let mut chart = ChartBuilder::on(area)
                .caption(*title, (font, 20))
                .margin(12)
                .x_label_area_size(30)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))
                .map_err(|e| failed(&e))?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_label_formatter(&|v| {
                    if v.abs() < 1e-2 && *v != 0.0 {
                        format!("{v:.1e}")
                    } else {
                        format!("{v:.3}")
                    }
                })
                .label_style((font, 13))
                .draw()
                .map_err(|e| failed(&e))?;
            let blue = RGBColor(31, 119, 180);
            chart
                .draw_series(LineSeries::new(train.iter().copied(), blue.stroke_width(2)))
                .map_err(|e| failed(&e))?
                .label("train")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], blue.stroke_width(2)));
            if !eval.is_empty() {
                let red = RGBColor(214, 39, 40);
                chart
                    .draw_series(eval.iter().map(|&p| Circle::new(p, 4, red.filled())))
                    .map_err(|e| failed(&e))?
                    .label("eval")
                    .legend(move |(x, y)| Circle::new((x + 8, y), 4, red.filled()));
            }
            crate::plot::draw_legend(&mut chart, 13).map_err(|e| failed(&e))?;
        }
        root.present().map_err(|e| failed(&e))?;
    }
    crate::plot::save_png(path, width, height, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curves_of_a_history_draw_with_text() {
        let history: Vec<Map<String, Value>> = (1..=5)
            .map(|s| serde_json::json!({"step": s, "loss": 1.0 / s as f64, "learning_rate": 1e-5, "rewards/margins": 0.1 * s as f64}).as_object().unwrap().clone())
            .chain([serde_json::json!({"step": 5, "eval_loss": 0.3}).as_object().unwrap().clone()])
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        draw(&path, &history).unwrap();
        let image = ::image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), size(3));
        let colours: std::collections::HashSet<_> = image.pixels().collect();
        assert!(colours.len() > 10, "{} colours", colours.len());
    }
}
