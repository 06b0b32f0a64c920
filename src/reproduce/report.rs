//! The reproduction report: four measured rows per benchmark (original, original + DaR, STIC, STIC + DaR) so
//! that the gain of DaR and the gain of training separate, the paper's numbers beside them, as Markdown, JSON
//! and a PNG bar chart; MMBench's accuracy by category beside it where its summaries have them.
use std::collections::BTreeSet;
use std::path::Path;

use plotters::prelude::*;
use serde_json::{json, Value};

use super::config::{BaseModel, Profile};
use super::steps::{eval_dir, Plan, Row};
use super::ReproduceError;
use crate::error::Result;
use crate::eval::benchmarks::{AccuracyBy, Benchmark, BENCHMARKS, CATEGORY_ACCURACY, L2_CATEGORY_ACCURACY};
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
    fn value(&self) -> Option<f64> {
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

pub struct BenchmarkRows {
    pub bench: &'static dyn Benchmark,
    /// In the order of [`Row::ALL`].
    pub cells: [Cell; 4],
    /// ScienceQA over every question: the accuracy on those with an image, by row.
    pub img_accuracy: [Option<f64>; 4],
    /// MMBench: the accuracy per L2 category and per category, by row.
    pub categories: [Option<Categories>; 4],
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

/// A row's cell and its summary's extras (`Null` where there is no summary).
fn read_cell(profile: &Profile, row: Row, bench: &dyn Benchmark) -> (Cell, Value) {
    let dar = matches!(row, Row::OriginalDar | Row::SticDar);
    if dar && !profile.cfg.eval.dar.applies_to(bench) {
        return (Cell::NotInProfile, Value::Null);
    }
    let path = eval_dir(&profile.cfg.paths.output, row, bench).join("summary.json");
    let Ok(mut summary) = crate::fsutil::read_json::<Value>(&path) else { return (Cell::Pending, Value::Null) };
    let extra = summary["extra"].take();
    match summary.get("accuracy").and_then(Value::as_f64) {
        Some(v) => (Cell::Score(100.0 * v), extra),
        None => (Cell::NeedsJudge, extra),
    }
}

pub fn collect(profile: &Profile) -> Vec<BenchmarkRows> {
    profile
        .benchmarks
        .iter()
        .map(|(bench, _)| {
            let read = Row::ALL.map(|row| read_cell(profile, row, *bench));
            BenchmarkRows {
                bench: *bench,
                cells: read.clone().map(|(cell, _)| cell),
                img_accuracy: read.clone().map(|(_, extra)| extra["img_accuracy"].as_f64().map(|v| 100.0 * v)),
                categories: read.map(|(_, extra)| Categories::from_extra(&extra)),
            }
        })
        .collect()
}

fn difference(a: &Cell, b: &Cell) -> Option<f64> {
    Some(a.value()? - b.value()?)
}

fn signed(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:+.1}"))
}

/// Writes `<report>.md`, `.json` and `.png`; returns the Markdown.
pub fn write_report(profile: &Profile, plan: &Plan) -> Result<String> {
    let rows = collect(profile);
    let base = &profile.cfg.paths.report;
    create_parent(&base.with_extension("md"))?;
    let markdown = markdown(profile, plan, &rows);
    write_atomic(&base.with_extension("md"), markdown.as_bytes())?;
    let json = to_json(profile, &rows);
    write_atomic(&base.with_extension("json"), serde_json::to_string_pretty(&json).expect("json").as_bytes())?;
    write_chart(&base.with_extension("png"), &profile.cfg.profile, profile.cfg.model.base, &rows)?;
    Ok(markdown)
}

fn markdown(profile: &Profile, plan: &Plan, rows: &[BenchmarkRows]) -> String {
    let base = profile.cfg.model.base;
    let paper = paper_table(base);
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
        "| benchmark | original | original + DaR | STIC | STIC + DaR | paper original | paper STIC + DaR | DaR gain | training gain | measured STIC + DaR − original |".into(),
        "|---|---|---|---|---|---|---|---|---|---|".into(),
    ];
    for r in rows {
        let (po, ps) = match paper_numbers(base, r.bench) {
            Some((po, ps)) => (format!("{po:.1}"), format!("{ps:.1}")),
            None => (String::new(), String::new()),
        };
        let [o, od, s, sd] = &r.cells;
        out.push(format!(
            "| {} | {} | {} | {} | {} | {po} | {ps} | {} | {} | {} |",
            r.bench.name(),
            o.text(),
            od.text(),
            s.text(),
            sd.text(),
            signed(difference(od, o)),
            signed(difference(s, o)),
            signed(difference(sd, o))
        ));
    }
    let complete: Vec<&BenchmarkRows> =
        rows.iter().filter(|r| r.cells[0].value().is_some() && r.cells[3].value().is_some()).collect();
    if !complete.is_empty() {
        let mean =
            |f: &dyn Fn(&BenchmarkRows) -> f64| complete.iter().map(|r| f(r)).sum::<f64>() / complete.len() as f64;
        let paper_means = match paper.rows {
            Some(_) => format!(
                "{:.1} | {:.1}",
                mean(&|r| paper_numbers(base, r.bench).map_or(0.0, |p| p.0)),
                mean(&|r| paper_numbers(base, r.bench).map_or(0.0, |p| p.1))
            ),
            None => " | ".into(),
        };
        out.push(format!(
            "| average of the {} with original and STIC + DaR | {:.1} | | | {:.1} | {paper_means} | | | {:+.1} |",
            complete.len(),
            mean(&|r| r.cells[0].value().unwrap()),
            mean(&|r| r.cells[3].value().unwrap()),
            mean(&|r| r.cells[3].value().unwrap() - r.cells[0].value().unwrap())
        ));
    }
    for r in rows {
        if r.img_accuracy.iter().any(Option::is_some) {
            let cells: Vec<String> = Row::ALL
                .iter()
                .zip(&r.img_accuracy)
                .map(|(row, v)| format!("{} {}", row.label(), v.map_or("–".into(), |v| format!("{v:.1}"))))
                .collect();
            out.push(String::new());
            out.push(format!("{} IMG-Accuracy (the questions with an image): {}.", r.bench.name(), cells.join(", ")));
        }
    }
    out.extend(category_table(rows));
    let source = match paper.rows {
        Some(_) => format!("The paper's numbers are its {}.", paper.table),
        None => format!(
            "The paper's columns are empty: paper numbers not entered (for {}, its {}).",
            base.title(),
            paper.table
        ),
    };
    out.extend([
        String::new(),
        format!(
            "DaR gain: original + DaR − original; training gain: STIC − original. {source} n/a: the profile has no \
             such row (the official code has DaR for MMBench only); judge: graded by an LLM judge and no \
             eval.judge_url was set (the files for the official graders are in the evaluation folder); –: not \
             evaluated yet."
        ),
    ]);
    out.join("\n") + "\n"
}

/// "MMBench by category": one line per L2 category, then one per category, one column per row with them.
fn category_table(rows: &[BenchmarkRows]) -> Vec<String> {
    let Some(bench_rows) = rows.iter().find(|r| r.categories.iter().any(Option::is_some)) else { return Vec::new() };
    let evaluated: Vec<(Row, &Categories)> =
        Row::ALL.iter().zip(&bench_rows.categories).filter_map(|(row, c)| Some((*row, c.as_ref()?))).collect();
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

fn to_json(profile: &Profile, rows: &[BenchmarkRows]) -> Value {
    let benchmarks: serde_json::Map<String, Value> = rows
        .iter()
        .map(|r| {
            let paper = paper_numbers(profile.cfg.model.base, r.bench);
            let mut measured = serde_json::Map::new();
            for (row, cell) in Row::ALL.iter().zip(&r.cells) {
                measured.insert(row.name().into(), cell.to_json());
            }
            let mut v = json!({
                "measured": measured,
                "paper": paper.map(|(po, ps)| json!({"original": po, "stic_dar": ps})),
                "dar_gain": difference(&r.cells[1], &r.cells[0]),
                "training_gain": difference(&r.cells[2], &r.cells[0]),
                "stic_dar_gain": difference(&r.cells[3], &r.cells[0]),
            });
            if r.img_accuracy.iter().any(Option::is_some) {
                v["img_accuracy"] = Row::ALL
                    .iter()
                    .zip(&r.img_accuracy)
                    .map(|(row, a)| (row.name().to_string(), json!(a)))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            if r.categories.iter().any(Option::is_some) {
                v["categories"] = Row::ALL
                    .iter()
                    .zip(&r.categories)
                    .filter_map(|(row, c)| Some((row.name().to_string(), c.as_ref()?.to_json())))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            (r.bench.name().to_string(), v)
        })
        .collect();
    json!({
        "profile": profile.cfg.profile,
        "config": profile.path,
        "model": profile.cfg.paths.model,
        "checkpoint": profile.cfg.model.hub_name(),
        "base_model": profile.cfg.model.base.title(),
        "paper_table": paper_table(profile.cfg.model.base).table,
        "benchmarks": benchmarks,
    })
}

/// Grouped bars per benchmark: the four measured rows, then the paper's two.
fn write_chart(path: &Path, profile: &str, base_model: BaseModel, rows: &[BenchmarkRows]) -> Result<()> {
    let (width, height) = (1400u32, 640u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    let failed = |e: &dyn std::fmt::Display| ReproduceError::Chart { path: path.to_owned(), reason: e.to_string() };
    let series: [(&str, RGBColor); 6] = [
        ("original", RGBColor(158, 158, 158)),
        ("original + DaR", RGBColor(100, 149, 237)),
        ("STIC", RGBColor(255, 165, 79)),
        ("STIC + DaR", RGBColor(214, 39, 40)),
        ("paper original", RGBColor(90, 90, 90)),
        ("paper STIC + DaR", RGBColor(120, 20, 20)),
    ];
    {
        let font = crate::plot::font();
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        let groups = rows.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("STIC reproduction (profile {profile}): measured against the paper"), (font, 24))
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..groups, 0f64..100f64)
            .map_err(|e| failed(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_desc("score (%)")
            .label_style((font, 16))
            .draw()
            .map_err(|e| failed(&e))?;
        let bar = 0.8 / series.len() as f64;
        for (s, (name, colour)) in series.iter().enumerate() {
            let bars: Vec<Rectangle<(f64, f64)>> = rows
                .iter()
                .enumerate()
                .filter_map(|(g, r)| {
                    let value = if s < 4 {
                        r.cells[s].value()?
                    } else if s == 4 {
                        paper_numbers(base_model, r.bench)?.0
                    } else {
                        paper_numbers(base_model, r.bench)?.1
                    };
                    let x0 = g as f64 + 0.1 + s as f64 * bar;
                    Some(Rectangle::new([(x0, 0.0), (x0 + bar * 0.9, value)], colour.filled()))
                })
                .collect();
            let colour = *colour;
            chart
                .draw_series(bars)
                .map_err(|e| failed(&e))?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
        }
        for (g, r) in rows.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
            let style = TextStyle::from((font, 18).into_font()).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ));
            root.draw(&Text::new(r.bench.name().to_string(), (x, y + 8), style)).map_err(|e| failed(&e))?;
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
        let text = markdown(&profile, &plan, &collect(&profile));
        assert!(text.starts_with("# STIC reproduction, profile `official-llava-v1.5-7b`: LLaVA-v1.5-7B"), "{text}");
        assert!(text.contains("paper numbers not entered (for LLaVA-v1.5-7B, its Table 1)"), "{text}");
        assert!(text.contains("| scienceqa | – | n/a | – | n/a |  |  |"), "{text}");
        assert_eq!(to_json(&profile, &collect(&profile))["benchmarks"]["scienceqa"]["paper"], Value::Null);
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
        let text = markdown(&profile, &plan, &rows);
        assert!(text.contains("scienceqa IMG-Accuracy (the questions with an image): original 65.0,"), "{text}");
        assert!(text.contains("## MMBench by category"), "{text}");
        assert!(text.contains("| level | ability | questions | original | STIC + DaR |"), "{text}");
        assert!(text.contains("| L2 | coarse_perception | 4 | 75.0 | 100.0 |"), "{text}");
        assert!(text.contains("| category | image_scene | 2 | 100.0 | – |"), "{text}");
        assert!(text.contains("| category | ocr | 2 | 50.0 | 100.0 |"), "{text}");

        let json = to_json(&profile, &rows);
        let categories = &json["benchmarks"]["mmbench"]["categories"];
        assert_eq!(categories.as_object().unwrap().keys().collect::<Vec<_>>(), ["original", "stic_dar"]);
        assert_eq!(categories["stic_dar"]["category_accuracy"]["ocr"]["correct"], 2);
        assert_eq!(json["benchmarks"]["scienceqa"].get("categories"), None);
    }

    #[test]
    fn chart_is_a_png_of_the_chart_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let rows = vec![
            BenchmarkRows {
                bench: find("scienceqa"),
                cells: [Cell::Score(60.0), Cell::Score(62.0), Cell::Pending, Cell::Score(70.0)],
                img_accuracy: [None; 4],
                categories: Default::default(),
            },
            BenchmarkRows {
                bench: find("mm-vet"),
                cells: [Cell::NeedsJudge, Cell::NotInProfile, Cell::Pending, Cell::Pending],
                img_accuracy: [None; 4],
                categories: Default::default(),
            },
        ];
        write_chart(&path, "test", BaseModel::LlavaV15Vicuna7b, &rows).unwrap();
        let image = ::image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (1400, 640));
        // Bars and text were drawn: the measured STIC + DaR red is there.
        assert!(image.pixels().any(|p| p.0 == [214, 39, 40]));
    }
}
