//! The reproduction report: four measured rows per benchmark (original, original + DaR, STIC, STIC + DaR) so
//! that the gain of DaR and the gain of training separate, with `eval.stage1_row` a fifth (stage 1 only) before
//! STIC, the paper's numbers beside them, as Markdown, JSON and a PNG bar chart; MMBench's accuracy by category
//! beside it where its summaries have them.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::{json, Value};

use super::config::{BaseModel, Profile};
use super::steps::{eval_dir, image_distribution_dir, Plan, Row};
use super::ReproduceError;
use crate::error::Result;
use crate::eval::benchmarks::{AccuracyBy, Benchmark, BENCHMARKS, CATEGORY_ACCURACY, L2_CATEGORY_ACCURACY};
use crate::eval::image_distribution::PLOT_FILE;
use crate::fsutil::{create_parent, write_atomic};

/// The paper's numbers of one base model, in the order of [`BENCHMARKS`]: original, STIC + DaR.
pub struct PaperNumbers {
    /// Where in the paper (arXiv 2405.19716) they are.
    pub table: &'static str,
    /// `None`: not entered yet (the report says so and leaves the paper's columns empty).
    pub rows: Option<[(f64, f64); 7]>,
}

const MISTRAL_7B: PaperNumbers = PaperNumbers {
    table: "Table 2 (Table 1 prints MM-Vet 45.0 for STIC + DaR)",
    rows: Some([(68.9, 75.3), (60.3, 65.2), (36.4, 41.5), (77.3, 79.2), (63.7, 67.8), (42.2, 45.2), (34.6, 37.0)]),
};
const VICUNA_7B_V15: PaperNumbers = PaperNumbers { table: "Table 1", rows: None };
const VICUNA_13B: PaperNumbers = PaperNumbers { table: "Table 5", rows: None };

pub fn paper_table(base: BaseModel) -> &'static PaperNumbers {
    match base {
        BaseModel::LlavaV16Mistral7b => &MISTRAL_7B,
        BaseModel::LlavaV15Vicuna7b => &VICUNA_7B_V15,
        BaseModel::LlavaV16Vicuna13b => &VICUNA_13B,
    }
}

/// `bench`'s paper numbers for `base`, where they are entered.
pub fn paper_numbers(base: BaseModel, bench: &dyn Benchmark) -> Option<(f64, f64)> {
    let rows = paper_table(base).rows?;
    Some(rows[BENCHMARKS.iter().position(|b| b.name() == bench.name()).expect("every benchmark is in BENCHMARKS")])
}

/// Whether the report has a column of the paper's numbers for `row`, entered or not.
fn in_paper(row: Row) -> bool {
    matches!(row, Row::Original | Row::Stage1 | Row::SticDar)
}

/// The paper's number of `row` on `bench`, where it is entered.
fn paper_value(base: BaseModel, row: Row, bench: &dyn Benchmark) -> Option<f64> {
    let (original, stic_dar) = paper_numbers(base, bench)?;
    match row {
        Row::Original => Some(original),
        Row::SticDar => Some(stic_dar),
        _ => None,
    }
}

/// The measured rows of `profile` and those of them with a paper column.
fn rows_of(profile: &Profile) -> (Vec<Row>, Vec<Row>) {
    let measured = Row::of(&profile.cfg.eval);
    let paper = measured.iter().copied().filter(|row| in_paper(*row)).collect();
    (measured, paper)
}

/// One measured cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Percent.
    Score(f64),
    /// The profile has no such row (the official DaR exists for MMBench only).
    NotInProfile,
    /// Graded by an LLM judge and none was configured: the official graders' files are in the folder.
    NeedsJudge,
    /// Not evaluated yet.
    Pending,
}

impl Cell {
    pub(super) fn value(&self) -> Option<f64> {
        match self {
            Cell::Score(v) => Some(*v),
            _ => None,
        }
    }

    fn text(&self) -> String {
        match self {
            Cell::Score(v) => format!("{v:.1}"),
            Cell::NotInProfile => "n/a".into(),
            Cell::NeedsJudge => "judge".into(),
            Cell::Pending => "–".into(),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Cell::Score(v) => json!((v * 100.0).round() / 100.0),
            Cell::NotInProfile => json!("not in profile"),
            Cell::NeedsJudge => json!("needs a judge"),
            Cell::Pending => Value::Null,
        }
    }
}

/// One measured row of one benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub row: Row,
    pub cell: Cell,
    /// ScienceQA over every question: the accuracy on those with an image.
    pub img_accuracy: Option<f64>,
    /// MMBench: the accuracy per L2 category and per category.
    pub categories: Option<Categories>,
}

pub struct BenchmarkRows {
    pub bench: &'static dyn Benchmark,
    /// In the order of [`Row::of`] the profile.
    pub measured: Vec<Measured>,
}

impl BenchmarkRows {
    pub(super) fn score(&self, row: Row) -> Option<f64> {
        self.measured.iter().find(|m| m.row == row)?.cell.value()
    }

    /// `row` − `base`, where both are scored.
    fn gain(&self, row: Row, base: Row) -> Option<f64> {
        Some(self.score(row)? - self.score(base)?)
    }
}

/// A summary's accuracy per L2 category and per category (MMBench's `l2_category_accuracy` and
/// `category_accuracy`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Categories {
    pub l2_category: AccuracyBy,
    pub category: AccuracyBy,
}

impl Categories {
    /// From a summary's extras; `None` where it has neither.
    fn from_extra(extra: &Value) -> Option<Self> {
        let read = |key: &str| {
            extra.get(key).and_then(|by| serde_json::from_value::<AccuracyBy>(by.clone()).ok()).unwrap_or_default()
        };
        let categories = Categories { l2_category: read(L2_CATEGORY_ACCURACY), category: read(CATEGORY_ACCURACY) };
        (!categories.l2_category.is_empty() || !categories.category.is_empty()).then_some(categories)
    }

    fn to_json(&self) -> Value {
        json!({ L2_CATEGORY_ACCURACY: self.l2_category, CATEGORY_ACCURACY: self.category })
    }
}

fn read_cell(profile: &Profile, row: Row, bench: &dyn Benchmark) -> Measured {
    let measured = |cell, extra: &Value| Measured {
        row,
        cell,
        img_accuracy: extra["img_accuracy"].as_f64().map(|v| 100.0 * v),
        categories: Categories::from_extra(extra),
    };
    if row.dar() && !profile.cfg.eval.dar.applies_to(bench) {
        return measured(Cell::NotInProfile, &Value::Null);
    }
    let path = eval_dir(&profile.cfg.paths.output, row, bench).join("summary.json");
    let Ok(summary) = crate::fsutil::read_json::<Value>(&path) else { return measured(Cell::Pending, &Value::Null) };
    let extra = &summary["extra"];
    match summary.get("accuracy").and_then(Value::as_f64) {
        Some(v) => measured(Cell::Score(100.0 * v), extra),
        None => measured(Cell::NeedsJudge, extra),
    }
}

pub fn collect(profile: &Profile) -> Vec<BenchmarkRows> {
    let rows = Row::of(&profile.cfg.eval);
    profile
        .benchmarks
        .iter()
        .map(|(bench, _)| BenchmarkRows {
            bench: *bench,
            measured: rows.iter().map(|&row| read_cell(profile, row, *bench)).collect(),
        })
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Empty where there is no number.
fn one_decimal(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v:.1}"))
}

fn signed(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:+.1}"))
}

/// Writes `<report>.md`, `.json` and `.png`; returns the Markdown.
pub fn write_report(profile: &Profile, plan: &Plan) -> Result<String> {
    let rows = collect(profile);
    let figure = image_distribution(profile);
    let base = &profile.cfg.paths.report;
    create_parent(&base.with_extension("md"))?;
    let markdown = markdown(profile, plan, &rows, figure.as_ref());
    write_atomic(&base.with_extension("md"), markdown.as_bytes())?;
    let json = to_json(profile, &rows, figure.as_ref());
    write_atomic(&base.with_extension("json"), serde_json::to_string_pretty(&json).expect("json").as_bytes())?;
    let (measured_rows, _) = rows_of(profile);
    write_chart(&base.with_extension("png"), &profile.cfg.profile, profile.cfg.model.base, &measured_rows, &rows)?;
    Ok(markdown)
}

fn markdown(profile: &Profile, plan: &Plan, rows: &[BenchmarkRows], figure: Option<&Figure>) -> String {
    let base = profile.cfg.model.base;
    let paper = paper_table(base);
    let (measured_rows, paper_rows) = rows_of(profile);
    let labels = |rows: &[Row], prefix: &str| {
        rows.iter().map(|row| format!("{prefix}{}", row.label())).collect::<Vec<_>>().join(" | ")
    };
    let mut out = vec![
        format!("# STIC reproduction, profile `{}`: {}", profile.cfg.profile, base.title()),
        String::new(),
        format!(
            "Profile {} (stage 1 {}, stage 2 {}); model {}; adapters {} and {}.",
            profile.path.display(),
            profile.cfg.stage1.config.display(),
            profile.cfg.stage2.config.display(),
            profile.cfg.paths.model.display(),
            plan.stage1_adapter.display(),
            plan.stage2_adapter.display()
        ),
        String::new(),
        format!(
            "| benchmark | {} | {} | DaR gain | training gain | measured STIC + DaR − original |",
            labels(&measured_rows, ""),
            labels(&paper_rows, "paper ")
        ),
        format!("|{}", "---|".repeat(1 + measured_rows.len() + paper_rows.len() + 3)),
    ];
    for r in rows {
        let measured: Vec<String> = r.measured.iter().map(|m| m.cell.text()).collect();
        let paper: Vec<String> = paper_rows.iter().map(|&row| one_decimal(paper_value(base, row, r.bench))).collect();
        out.push(format!(
            "| {} | {} | {} | {} | {} | {} |",
            r.bench.name(),
            measured.join(" | "),
            paper.join(" | "),
            signed(r.gain(Row::OriginalDar, Row::Original)),
            signed(r.gain(Row::Stic, Row::Original)),
            signed(r.gain(Row::SticDar, Row::Original))
        ));
    }
    let complete: Vec<&BenchmarkRows> =
        rows.iter().filter(|r| r.score(Row::Original).is_some() && r.score(Row::SticDar).is_some()).collect();
    if !complete.is_empty() {
        // The average is over the benchmarks with both ends of the progression; its other cells stay empty.
        let mean_of = |value: &dyn Fn(&BenchmarkRows) -> Option<f64>| -> Option<f64> {
            let values: Option<Vec<f64>> = complete.iter().map(|r| value(r)).collect();
            values.map(|v| mean(&v))
        };
        let measured: Vec<String> = measured_rows
            .iter()
            .map(|&row| match row {
                Row::Original | Row::SticDar => format!("{} |", one_decimal(mean_of(&|r| r.score(row)))),
                _ => "|".into(),
            })
            .collect();
        let paper_means: Vec<String> =
            paper_rows.iter().map(|&row| one_decimal(mean_of(&|r| paper_value(base, row, r.bench)))).collect();
        out.push(format!(
            "| average of the {} with original and STIC + DaR | {} {} | | | {} |",
            complete.len(),
            measured.join(" "),
            paper_means.join(" | "),
            signed(mean_of(&|r| r.gain(Row::SticDar, Row::Original))),
        ));
    }
    for r in rows {
        if r.measured.iter().any(|m| m.img_accuracy.is_some()) {
            let cells: Vec<String> = r
                .measured
                .iter()
                .map(|m| format!("{} {}", m.row.label(), m.img_accuracy.map_or("–".into(), |v| format!("{v:.1}"))))
                .collect();
            out.push(String::new());
            out.push(format!("{} IMG-Accuracy (the questions with an image): {}.", r.bench.name(), cells.join(", ")));
        }
    }
    out.extend(category_table(rows));
    out.extend(figure.map(image_distribution_section).unwrap_or_default());
    let source = match paper.rows {
        Some(_) => format!("The paper's numbers are its {}.", paper.table),
        None => format!(
            "The paper's columns are empty: paper numbers not entered (for {}, its {}).",
            base.title(),
            paper.table
        ),
    };
    let stage1 = if measured_rows.contains(&Row::Stage1) {
        " Stage 1 only: the stage-1 adapter without DaR; its paper column is empty (the paper's stage-1-only \
         numbers are not entered)."
    } else {
        ""
    };
    out.extend([
        String::new(),
        format!(
            "DaR gain: original + DaR − original; training gain: STIC − original.{stage1} {source} n/a: the profile \
             has no such row (the official code has DaR for MMBench only); judge: graded by an LLM judge and no \
             eval.judge_url was set (the files for the official graders are in the evaluation folder); –: not \
             evaluated yet."
        ),
    ]);
    out.join("\n") + "\n"
}

/// `to` relative to the folder `from` (both made absolute), for the report's links.
fn relative_to(from: &Path, to: &Path) -> PathBuf {
    let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let (from, to) = (absolute(from), absolute(to));
    let common = from.components().zip(to.components()).take_while(|(a, b)| a == b).count();
    let mut relative: PathBuf = std::iter::repeat_n("..", from.components().count() - common).collect();
    relative.extend(to.components().skip(common));
    relative
}

/// Fig. 7: the plot's path relative to the report's folder, and its `summary.json`.
type Figure = (String, Value);

/// Fig. 7 where its step ran.
fn image_distribution(profile: &Profile) -> Option<Figure> {
    let dir = image_distribution_dir(&profile.cfg.paths.output);
    let summary: Value = crate::fsutil::read_json(&dir.join("summary.json")).ok()?;
    let report_dir = profile.cfg.paths.report.parent().unwrap_or(Path::new(""));
    Some((relative_to(report_dir, &dir.join(PLOT_FILE)).display().to_string(), summary))
}

/// The Fig. 7 section: the plot, then each set's count and the t-SNE's fit.
fn image_distribution_section((plot, summary): &Figure) -> Vec<String> {
    let sets: Vec<String> = summary["sets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|set| format!("{} {} of {} images", set["name"].as_str().unwrap_or("?"), set["images"], set["pool"]))
        .collect();
    let kl = summary["kl_divergence"].as_f64().map_or("–".into(), |kl| format!("{kl:.4}"));
    vec![
        String::new(),
        "## Fig. 7: image distribution".into(),
        String::new(),
        format!("![t-SNE of the CLIP image features](<{plot}>)"),
        String::new(),
        format!(
            "t-SNE of the CLIP features (`stic image-distribution`): {}; perplexity {}, KL divergence {kl} after {} \
             steps.",
            sets.join(", "),
            summary["perplexity"],
            summary["iterations"]
        ),
    ]
}

/// "MMBench by category": one line per L2 category, then one per category, one column per row with them.
fn category_table(rows: &[BenchmarkRows]) -> Vec<String> {
    let Some(bench_rows) = rows.iter().find(|r| r.measured.iter().any(|m| m.categories.is_some())) else {
        return Vec::new();
    };
    let evaluated: Vec<(Row, &Categories)> =
        bench_rows.measured.iter().filter_map(|m| Some((m.row, m.categories.as_ref()?))).collect();
    let labels: Vec<&str> = evaluated.iter().map(|(row, _)| row.label()).collect();
    let mut out = vec![
        String::new(),
        "## MMBench by category".into(),
        String::new(),
        format!("| level | ability | questions | {} |", labels.join(" | ")),
        format!("|---|---|---|{}", "---|".repeat(labels.len())),
    ];
    type Level = fn(&Categories) -> &AccuracyBy;
    let levels: [(&str, Level); 2] = [("L2", |c| &c.l2_category), ("category", |c| &c.category)];
    for (level, of) in levels {
        let names: BTreeSet<&String> = evaluated.iter().flat_map(|(_, c)| of(c).keys()).collect();
        for name in names {
            let found: Vec<_> = evaluated.iter().map(|(_, c)| of(c).get(name)).collect();
            let total = found.iter().flatten().map(|a| a.total).max().unwrap_or_default();
            let cells: Vec<String> =
                found.iter().map(|a| a.map_or("–".into(), |a| format!("{:.1}", 100.0 * a.accuracy))).collect();
            out.push(format!("| {level} | {name} | {total} | {} |", cells.join(" | ")));
        }
    }
    out.extend([
        String::new(),
        "Circular accuracy, as VLMEvalKit's `report_acc` groups it: each question once, right only when every \
         variant of it is; questions: the most any row graded."
            .into(),
    ]);
    out
}

fn to_json(profile: &Profile, rows: &[BenchmarkRows], figure: Option<&Figure>) -> Value {
    let base = profile.cfg.model.base;
    let (_, paper_rows) = rows_of(profile);
    let benchmarks: serde_json::Map<String, Value> = rows
        .iter()
        .map(|r| {
            let by_row = |value: &dyn Fn(&Measured) -> Value| -> Value {
                r.measured
                    .iter()
                    .map(|m| (m.row.name().to_string(), value(m)))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            };
            let paper = paper_numbers(base, r.bench).map(|_| {
                paper_rows
                    .iter()
                    .map(|&row| (row.name().to_string(), json!(paper_value(base, row, r.bench))))
                    .collect::<serde_json::Map<_, _>>()
            });
            let mut v = json!({
                "measured": by_row(&|m| m.cell.to_json()),
                "paper": paper,
                "dar_gain": r.gain(Row::OriginalDar, Row::Original),
                "training_gain": r.gain(Row::Stic, Row::Original),
                "stic_dar_gain": r.gain(Row::SticDar, Row::Original),
            });
            if r.measured.iter().any(|m| m.img_accuracy.is_some()) {
                v["img_accuracy"] = by_row(&|m| json!(m.img_accuracy));
            }
            if r.measured.iter().any(|m| m.categories.is_some()) {
                v["categories"] = r
                    .measured
                    .iter()
                    .filter_map(|m| Some((m.row.name().to_string(), m.categories.as_ref()?.to_json())))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            (r.bench.name().to_string(), v)
        })
        .collect();
    let mut report = json!({
        "profile": profile.cfg.profile,
        "config": profile.path,
        "model": profile.cfg.paths.model,
        "checkpoint": profile.cfg.model.hub_name(),
        "base_model": profile.cfg.model.base.title(),
        "paper_table": paper_table(profile.cfg.model.base).table,
        "benchmarks": benchmarks,
    });
    if let Some((plot, summary)) = figure {
        report["image_distribution"] = json!({
            "plot": plot,
            "sets": summary["sets"],
            "perplexity": summary["perplexity"],
            "kl_divergence": summary["kl_divergence"],
            "iterations": summary["iterations"],
        });
    }
    report
}

/// The bar colour of each measured row.
fn colour(row: Row) -> RGBColor {
    match row {
        Row::Original => RGBColor(158, 158, 158),
        Row::OriginalDar => RGBColor(100, 149, 237),
        Row::Stage1 => RGBColor(60, 170, 113),
        Row::Stic => RGBColor(255, 165, 79),
        Row::SticDar => RGBColor(214, 39, 40),
    }
}

/// The paper's numbers the chart draws, with their colours.
const PAPER_SERIES: [(Row, RGBColor); 2] =
    [(Row::Original, RGBColor(90, 90, 90)), (Row::SticDar, RGBColor(120, 20, 20))];

/// Grouped bars per benchmark: the measured rows, then the paper's two.
fn write_chart(
    path: &Path,
    profile: &str,
    base_model: BaseModel,
    measured_rows: &[Row],
    rows: &[BenchmarkRows],
) -> Result<()> {
    // Each series: its legend, colour, and value per benchmark.
    let mut series: Vec<Series> = measured_rows
        .iter()
        .map(|&row| (row.label().to_string(), colour(row), rows.iter().map(|r| r.score(row)).collect()))
        .collect();
    series.extend(PAPER_SERIES.iter().map(|&(row, colour)| {
        let values = rows.iter().map(|r| paper_value(base_model, row, r.bench)).collect();
        (format!("paper {}", row.label()), colour, values)
    }));
    let groups: Vec<&str> = rows.iter().map(|r| r.bench.name()).collect();
    let caption = format!("STIC reproduction (profile {profile}): measured against the paper");
    write_grouped_bars(path, &caption, "score (%)", 0.0..100.0, &groups, &series)
}

/// One bar chart series: its legend, colour, and value per group (none: no bar).
pub(super) type Series = (String, RGBColor, Vec<Option<f64>>);

/// A PNG of bars grouped by `groups` (named under the axis), one bar per series in each group, with a legend.
pub(super) fn write_grouped_bars(
    path: &Path,
    caption: &str,
    y_desc: &str,
    y_range: std::ops::Range<f64>,
    groups: &[&str],
    series: &[Series],
) -> Result<()> {
    let (width, height) = (1400u32, 640u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    let failed = |e: &dyn std::fmt::Display| ReproduceError::Chart { path: path.to_owned(), reason: e.to_string() };
    {
        let font = crate::plot::font();
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, (font, 24))
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..groups.len().max(1) as f64, y_range)
            .map_err(|e| failed(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_desc(y_desc)
            .label_style((font, 16))
            .draw()
            .map_err(|e| failed(&e))?;
        let bar = 0.8 / series.len().max(1) as f64;
        for (s, (name, colour, values)) in series.iter().enumerate() {
            let bars: Vec<Rectangle<(f64, f64)>> = values
                .iter()
                .enumerate()
                .filter_map(|(g, value)| {
                    let value = (*value)?;
                    let x0 = g as f64 + 0.1 + s as f64 * bar;
                    Some(Rectangle::new([(x0, 0.0), (x0 + bar * 0.9, value)], colour.filled()))
                })
                .collect();
            let colour = *colour;
            chart
                .draw_series(bars)
                .map_err(|e| failed(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
        }
        let below_axis = chart.y_range().start;
        for (g, name) in groups.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(g as f64 + 0.5, below_axis));
            let style = TextStyle::from((font, 18).into_font()).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ));
            root.draw(&Text::new(name.to_string(), (x, y + 8), style)).map_err(|e| failed(&e))?;
        }
        crate::plot::draw_legend(&mut chart, 15).map_err(|e| failed(&e))?;
        root.present().map_err(|e| failed(&e))?;
    }
    crate::plot::save_png(path, width, height, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(name: &str) -> &'static dyn Benchmark {
        crate::eval::benchmarks::find(name).unwrap()
    }

    #[test]
    fn paper_numbers_are_table_2() {
        let mistral = BaseModel::LlavaV16Mistral7b;
        assert_eq!(paper_numbers(mistral, find("scienceqa")), Some((68.9, 75.3)));
        assert_eq!(paper_numbers(mistral, find("mm-vet")), Some((42.2, 45.2)));
        assert_eq!(paper_numbers(mistral, find("mathvista")), Some((34.6, 37.0)));
        let rows = paper_table(mistral).rows.unwrap();
        let mean = |f: fn(&(f64, f64)) -> f64| rows.iter().map(f).sum::<f64>() / 7.0;
        assert!((mean(|p| p.0) - 54.8).abs() < 0.05 && (mean(|p| p.1) - 58.7).abs() < 0.05);
    }

    #[test]
    fn the_other_base_models_cite_their_tables_and_enter_no_unread_numbers() {
        for (base, table) in [(BaseModel::LlavaV15Vicuna7b, "Table 1"), (BaseModel::LlavaV16Vicuna13b, "Table 5")] {
            assert_eq!(paper_table(base).table, table);
            assert_eq!(paper_numbers(base, find("scienceqa")), None);
        }
    }

    #[test]
    fn a_report_without_paper_numbers_says_so_and_names_its_model() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let path = Profile::path_of(&root, "official-llava-v1.5-7b").unwrap();
        let out = dir.path().to_string_lossy().to_string();
        let profile = Profile::load(&path, |var| (var == "STIC_OUTPUT").then(|| out.clone()), None).unwrap();
        let plan = super::super::steps::plan(&profile, &|_, _| true);
        let text = markdown(&profile, &plan, &collect(&profile), None);
        assert!(text.starts_with("# STIC reproduction, profile `official-llava-v1.5-7b`: LLaVA-v1.5-7B"), "{text}");
        assert!(text.contains("paper numbers not entered (for LLaVA-v1.5-7B, its Table 1)"), "{text}");
        assert!(text.contains("| scienceqa | – | n/a | – | n/a |  |  |"), "{text}");
        assert_eq!(to_json(&profile, &collect(&profile), None)["benchmarks"]["scienceqa"]["paper"], Value::Null);
    }

    /// The shipped `paper` profile on ScienceQA and TextVQA, writing to `out`, with these evaluations done: (row,
    /// benchmark, accuracy, img_accuracy).
    fn paper_profile_with(out: &Path, stage1_row: bool, done: &[(Row, &str, f64, Option<f64>)]) -> Profile {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let path = Profile::path_of(&root, "paper").unwrap();
        let out_text = out.to_string_lossy().to_string();
        let only = ["scienceqa".to_string(), "textvqa".to_string()];
        let mut profile =
            Profile::load(&path, |var| (var == "STIC_OUTPUT").then(|| out_text.clone()), Some(&only)).unwrap();
        profile.cfg.eval.stage1_row = stage1_row;
        for &(row, bench, accuracy, img_accuracy) in done {
            let dir = eval_dir(out, row, find(bench));
            std::fs::create_dir_all(&dir).unwrap();
            let summary = json!({"accuracy": accuracy, "extra": {"img_accuracy": img_accuracy}});
            std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
        }
        profile
    }

    const DONE: [(Row, &str, f64, Option<f64>); 7] = [
        (Row::Original, "scienceqa", 0.6, Some(0.5)),
        (Row::OriginalDar, "scienceqa", 0.62, None),
        (Row::Stage1, "scienceqa", 0.63, None),
        (Row::Stic, "scienceqa", 0.65, None),
        (Row::SticDar, "scienceqa", 0.7, None),
        (Row::Original, "textvqa", 0.5, None),
        (Row::SticDar, "textvqa", 0.6, None),
    ];

    fn report_of(profile: &Profile) -> (Vec<String>, Value) {
        let plan = super::super::steps::plan(profile, &|_, _| true);
        let rows = collect(profile);
        let figure = image_distribution(profile);
        let text = markdown(profile, &plan, &rows, figure.as_ref());
        (text.lines().map(String::from).collect(), to_json(profile, &rows, figure.as_ref()))
    }

    #[test]
    fn without_the_stage1_row_the_report_is_the_four_row_table() {
        let dir = tempfile::tempdir().unwrap();
        let (lines, json) = report_of(&paper_profile_with(dir.path(), false, &DONE));
        let expected = [
            "| benchmark | original | original + DaR | STIC | STIC + DaR | paper original | paper STIC + DaR | DaR gain \
             | training gain | measured STIC + DaR − original |",
            "|---|---|---|---|---|---|---|---|---|---|",
            "| scienceqa | 60.0 | 62.0 | 65.0 | 70.0 | 68.9 | 75.3 | +2.0 | +5.0 | +10.0 |",
            "| textvqa | 50.0 | – | – | 60.0 | 60.3 | 65.2 | – | – | +10.0 |",
            "| average of the 2 with original and STIC + DaR | 55.0 | | | 65.0 | 64.6 | 70.2 | | | +10.0 |",
            "",
            "scienceqa IMG-Accuracy (the questions with an image): original 50.0, original + DaR –, STIC –, \
             STIC + DaR –.",
        ];
        assert_eq!(lines[4..11], expected, "{lines:#?}");
        assert!(lines[12].starts_with("DaR gain: original + DaR − original; training gain: STIC − original. The"));
        let scienceqa = &json["benchmarks"]["scienceqa"];
        assert_eq!(
            scienceqa["measured"],
            json!({"original": 60.0, "original_dar": 62.0, "stic": 65.0, "stic_dar": 70.0})
        );
        assert_eq!(scienceqa["paper"], json!({"original": 68.9, "stic_dar": 75.3}));
        assert_eq!(
            scienceqa["img_accuracy"],
            json!({"original": 50.0, "original_dar": null, "stic": null, "stic_dar": null})
        );
        assert_eq!(scienceqa["training_gain"], json!(5.0));
    }

    #[test]
    fn the_stage1_row_stands_between_original_dar_and_stic_with_an_empty_paper_column() {
        let dir = tempfile::tempdir().unwrap();
        let (lines, json) = report_of(&paper_profile_with(dir.path(), true, &DONE));
        let expected = [
            "| benchmark | original | original + DaR | stage 1 only | STIC | STIC + DaR | paper original | paper stage 1 \
             only | paper STIC + DaR | DaR gain | training gain | measured STIC + DaR − original |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            "| scienceqa | 60.0 | 62.0 | 63.0 | 65.0 | 70.0 | 68.9 |  | 75.3 | +2.0 | +5.0 | +10.0 |",
            "| textvqa | 50.0 | – | – | – | 60.0 | 60.3 |  | 65.2 | – | – | +10.0 |",
            "| average of the 2 with original and STIC + DaR | 55.0 | | | | 65.0 | 64.6 |  | 70.2 | | | +10.0 |",
            "",
            "scienceqa IMG-Accuracy (the questions with an image): original 50.0, original + DaR –, stage 1 only –, \
             STIC –, STIC + DaR –.",
        ];
        assert_eq!(lines[4..11], expected, "{lines:#?}");
        assert!(lines[12].contains("Stage 1 only: the stage-1 adapter without DaR; its paper column is empty"));
        let scienceqa = &json["benchmarks"]["scienceqa"];
        let measured: Vec<(&String, &Value)> = scienceqa["measured"].as_object().unwrap().iter().collect();
        let names: Vec<&str> = measured.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["original", "original_dar", "stage1", "stic", "stic_dar"]);
        assert_eq!(scienceqa["measured"]["stage1"], json!(63.0));
        assert_eq!(scienceqa["paper"], json!({"original": 68.9, "stage1": null, "stic_dar": 75.3}));
    }

    #[test]
    fn summaries_extras_give_img_accuracy_and_mmbench_categories() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let path = Profile::path_of(&root, "official-llava-v1.5-7b").unwrap();
        let out = dir.path().to_string_lossy().to_string();
        let profile = Profile::load(&path, |var| (var == "STIC_OUTPUT").then(|| out.clone()), None).unwrap();
        let write_summary = |row: Row, bench: &str, summary: Value| {
            let path = eval_dir(&profile.cfg.paths.output, row, find(bench)).join("summary.json");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, summary.to_string()).unwrap();
        };
        let by = |entries: &[(&str, f64, usize, usize)]| -> Value {
            entries
                .iter()
                .map(|(name, accuracy, correct, total)| {
                    (name.to_string(), json!({"accuracy": accuracy, "correct": correct, "total": total}))
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        write_summary(Row::Original, "scienceqa", json!({"accuracy": 0.7, "extra": {"img_accuracy": 0.65}}));
        write_summary(
            Row::Original,
            "mmbench",
            json!({"accuracy": 0.5, "extra": {
                "l2_category_accuracy": by(&[("coarse_perception", 0.75, 3, 4)]),
                "category_accuracy": by(&[("image_scene", 1.0, 2, 2), ("ocr", 0.5, 1, 2)]),
            }}),
        );
        write_summary(
            Row::SticDar,
            "mmbench",
            json!({"accuracy": 0.6, "extra": {
                "l2_category_accuracy": by(&[("coarse_perception", 1.0, 4, 4)]),
                "category_accuracy": by(&[("ocr", 1.0, 2, 2)]),
            }}),
        );
        // An older summary without the categories: no column.
        write_summary(Row::Stic, "mmbench", json!({"accuracy": 0.55, "extra": {"plain_accuracy": 0.6}}));

        let rows = collect(&profile);
        let plan = super::super::steps::plan(&profile, &|_, _| true);
        let text = markdown(&profile, &plan, &rows, None);
        assert!(text.contains("scienceqa IMG-Accuracy (the questions with an image): original 65.0,"), "{text}");
        assert!(text.contains("## MMBench by category"), "{text}");
        assert!(text.contains("| level | ability | questions | original | STIC + DaR |"), "{text}");
        assert!(text.contains("| L2 | coarse_perception | 4 | 75.0 | 100.0 |"), "{text}");
        assert!(text.contains("| category | image_scene | 2 | 100.0 | – |"), "{text}");
        assert!(text.contains("| category | ocr | 2 | 50.0 | 100.0 |"), "{text}");

        let json = to_json(&profile, &rows, None);
        let categories = &json["benchmarks"]["mmbench"]["categories"];
        assert_eq!(categories.as_object().unwrap().keys().collect::<Vec<_>>(), ["original", "stic_dar"]);
        assert_eq!(categories["stic_dar"]["category_accuracy"]["ocr"]["correct"], 2);
        assert_eq!(json["benchmarks"]["scienceqa"].get("categories"), None);
    }

    #[test]
    fn fig_7_is_in_the_report_when_its_step_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let profile = paper_profile_with(dir.path(), false, &DONE);
        let (lines, json) = report_of(&profile);
        assert!(!lines.iter().any(|l| l.contains("Fig. 7")) && json.get("image_distribution").is_none());
        let figure = image_distribution_dir(dir.path());
        std::fs::create_dir_all(&figure).unwrap();
        let sets = json!([{"name": "stage1", "path": "s.json", "images": 3, "pool": 5},
                          {"name": "scienceqa", "path": "sqa", "images": 2, "pool": 2}]);
        let summary = json!({"sets": sets, "perplexity": 2.0, "kl_divergence": 0.123456, "iterations": 300});
        std::fs::write(figure.join("summary.json"), summary.to_string()).unwrap();
        let (lines, json) = report_of(&profile);
        let at = lines.iter().position(|l| l == "## Fig. 7: image distribution").unwrap();
        let relative = relative_to(profile.cfg.paths.report.parent().unwrap(), &figure.join(PLOT_FILE));
        assert_eq!(lines[at + 2], format!("![t-SNE of the CLIP image features](<{}>)", relative.display()));
        assert_eq!(
            lines[at + 4],
            "t-SNE of the CLIP features (`stic image-distribution`): stage1 3 of 5 images, scienceqa 2 of 2 images; \
             perplexity 2.0, KL divergence 0.1235 after 300 steps."
        );
        assert_eq!(json["image_distribution"]["sets"], sets);
        assert_eq!(json["image_distribution"]["kl_divergence"], json!(0.123456));
    }

    #[test]
    fn relative_paths_climb_to_the_common_folder() {
        let path = relative_to(Path::new("/a/report"), Path::new("/a/run/analysis/plot.png"));
        assert_eq!(path, PathBuf::from("../run/analysis/plot.png"));
        assert_eq!(relative_to(Path::new("/a"), Path::new("/a/b.png")), PathBuf::from("b.png"));
    }

    #[test]
    fn chart_is_a_png_of_the_chart_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let measured = |cells: [Cell; 4]| -> Vec<Measured> {
            let rows = [Row::Original, Row::OriginalDar, Row::Stic, Row::SticDar];
            rows.into_iter()
                .zip(cells)
                .map(|(row, cell)| Measured { row, cell, img_accuracy: None, categories: None })
                .collect()
        };
        let rows = vec![
            BenchmarkRows {
                bench: find("scienceqa"),
                measured: measured([Cell::Score(60.0), Cell::Score(62.0), Cell::Pending, Cell::Score(70.0)]),
            },
            BenchmarkRows {
                bench: find("mm-vet"),
                measured: measured([Cell::NeedsJudge, Cell::NotInProfile, Cell::Pending, Cell::Pending]),
            },
        ];
        let with_stage1 = [Row::Original, Row::OriginalDar, Row::Stage1, Row::Stic, Row::SticDar];
        write_chart(&path, "test", BaseModel::LlavaV15Vicuna7b, &with_stage1, &rows).unwrap();
        let image = ::image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (1400, 640));
        // Bars and text were drawn: the measured STIC + DaR red is there, and the stage-1 legend entry.
        assert!(image.pixels().any(|p| p.0 == [214, 39, 40]));
        assert!(image.pixels().any(|p| p.0 == [60, 170, 113]));
    }
}
