//! The quirk sweep (`stic reproduce --profile A --sweep B`): profile A as it is, then A with one switch at a time
//! set as profile B sets it, every run a full reproduction, and a table of how much each switch moves each
//! benchmark.
//!
//! Runs share every step they have in common. A step's identity is its command line with the run's own output
//! folder left out, the contents of the stage configs it reads, and the identities of the steps whose outputs it
//! reads; a step another run has done is linked into the later run (its outputs as symbolic links, its marker
//! written) instead of being run again. So a training switch reuses the stage-1 generation, and the base model is
//! evaluated once for every switch that does not change the evaluation.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::{json, Value};
use serde_yaml::Value as Yaml;

use super::config::{read_profile_yaml, read_yaml, Profile};
use super::report::{self, BenchmarkRows};
use super::runner::{self, Status};
use super::steps::{plan, Action, FlagSupport, Plan, Row};
use super::ReproduceError;
use crate::error::{Error, Result};
use crate::fsutil::{create_parent, write_atomic};

/// Keys that are not switches: where the files are, and the profile's name.
const NOT_SWITCHES: [&str; 2] = ["profile", "paths"];

/// Switches that are not swept, with why.
const NOT_SWEPT: [(&str, &str); 1] =
    [("model.checkpoint", "needs the other release's model files (paths.model); compare the two profiles' reports")];

/// Keys that only make sense together: swept as one switch.
const TOGETHER: [[&str; 2]; 2] =
    [["stage2.subset", "stage2.sample"], ["stage2.config.loss_weighting", "stage2.config.device_batch"]];

/// The stage configs, whose own keys are switches (`stage1.config.max_length`).
const STAGE_CONFIGS: [&str; 2] = ["stage1", "stage2"];

/// One switch: the keys it sets and the values it sets them to, and what the base profile had.
#[derive(Debug, Clone, PartialEq)]
pub struct Switch {
    /// The dotted key (keys joined by `+` when several move together).
    pub name: String,
    pub from: Vec<(String, Yaml)>,
    pub to: Vec<(String, Yaml)>,
}

/// The base profile, and the switches where the other differs.
pub struct Switches {
    pub base: Yaml,
    pub stages: BTreeMap<&'static str, Yaml>,
    pub switches: Vec<Switch>,
    pub not_swept: Vec<(String, &'static str)>,
}

fn get<'a>(value: &'a Yaml, key: &str) -> Option<&'a Yaml> {
    key.split('.').try_fold(value, |v, part| v.get(part))
}

fn set(value: &mut Yaml, key: &str, to: Yaml) {
    let mut slot = value;
    for part in key.split('.') {
        if !slot.is_mapping() {
            *slot = Yaml::Mapping(Default::default());
        }
        let map = slot.as_mapping_mut().expect("a mapping");
        slot = map.entry(Yaml::String(part.to_string())).or_insert(Yaml::Null);
    }
    *slot = to;
}

/// The dotted keys of the leaves where `a` and `b` differ (a key absent on one side reads as null).
fn differing_leaves(a: &Yaml, b: &Yaml, prefix: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Yaml::Mapping(x), Yaml::Mapping(y)) => {
            let mut keys: Vec<&Yaml> = x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))).collect();
            keys.sort_by_key(|k| yaml_text(k));
            for key in keys {
                let name = format!("{prefix}{}", yaml_text(key));
                let (left, right) = (x.get(key).unwrap_or(&Yaml::Null), y.get(key).unwrap_or(&Yaml::Null));
                differing_leaves(left, right, &format!("{name}."), out);
            }
        }
        _ if a != b => out.push(prefix.trim_end_matches('.').to_string()),
        _ => {}
    }
}

/// A stage config's key (`stage1.config.max_length`) as its stage and its key in the stage's file.
fn stage_key(key: &str) -> Option<(&str, &str)> {
    key.split_once(".config.").filter(|(stage, _)| STAGE_CONFIGS.contains(stage))
}

/// A YAML value on one line.
pub fn yaml_text(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap_or_default().trim().replace('\n', ", "),
    }
}

impl Switches {
    /// The switches of `base` that `other` sets differently.
    pub fn between(base_path: &Path, other_path: &Path) -> Result<Self, ReproduceError> {
        let base = read_profile_yaml(base_path, &mut Vec::new())?;
        let other = read_profile_yaml(other_path, &mut Vec::new())?;
        let (mut stages, mut their_stages) = (BTreeMap::new(), BTreeMap::new());
        let mut keys = Vec::new();
        for stage in STAGE_CONFIGS {
            let file = |profile: &Yaml, path: &Path| -> Result<Yaml, ReproduceError> {
                let named = get(profile, &format!("{stage}.config")).and_then(Yaml::as_str).ok_or_else(|| {
                    ReproduceError::BadConfig { path: path.to_owned(), reason: format!("{stage}.config is missing") }
                })?;
                read_yaml(Path::new(named))
            };
            let (mine, theirs) = (file(&base, base_path)?, file(&other, other_path)?);
            let mut differing = Vec::new();
            differing_leaves(&mine, &theirs, &format!("{stage}.config."), &mut differing);
            keys.extend(differing);
            stages.insert(stage, mine);
            their_stages.insert(stage, theirs);
        }
        let mut differing = Vec::new();
        differing_leaves(&base, &other, "", &mut differing);
        let is_stage_file = |key: &str| STAGE_CONFIGS.iter().any(|s| key == format!("{s}.config"));
        keys.extend(
            differing.into_iter().filter(|k| {
                !is_stage_file(k) && !NOT_SWITCHES.iter().any(|n| k == n || k.starts_with(&format!("{n}.")))
            }),
        );
        let value_of = |key: &str| -> (Yaml, Yaml) {
            let (mine, theirs, key) = match stage_key(key) {
                Some((stage, rest)) => (&stages[stage], &their_stages[stage], rest),
                None => (&base, &other, key),
            };
            (get(mine, key).cloned().unwrap_or(Yaml::Null), get(theirs, key).cloned().unwrap_or(Yaml::Null))
        };
        let mut switches: Vec<Switch> = Vec::new();
        let mut not_swept = Vec::new();
        for key in keys {
            if let Some((_, why)) = NOT_SWEPT.iter().find(|(k, _)| *k == key) {
                not_swept.push((key, *why));
                continue;
            }
            let (from, to) = value_of(&key);
            let name = TOGETHER.iter().find(|g| g.contains(&key.as_str())).map_or_else(|| key.clone(), |g| g.join("+"));
            match switches.iter_mut().find(|s| s.name == name) {
                Some(switch) => {
                    switch.from.push((key.clone(), from));
                    switch.to.push((key, to));
                }
                None => switches.push(Switch { name, from: vec![(key.clone(), from)], to: vec![(key, to)] }),
            }
        }
        Ok(Switches { base, stages, switches, not_swept })
    }

    /// Keeps the switches named in `only` (each must be one of them).
    pub fn keep(&mut self, only: &[String]) -> Result<(), ReproduceError> {
        for name in only {
            if !self.switches.iter().any(|s| &s.name == name) {
                return Err(ReproduceError::UnknownSwitch {
                    name: name.clone(),
                    known: self.switches.iter().map(|s| s.name.clone()).collect(),
                });
            }
        }
        self.switches.retain(|s| only.contains(&s.name));
        Ok(())
    }
}

/// One run of the sweep: the base profile (no switch) or the base with one switch flipped.
pub struct Variant {
    pub switch: Option<Switch>,
    pub profile: Profile,
}

impl Variant {
    pub fn label(&self) -> String {
        match &self.switch {
            None => "base".to_string(),
            Some(s) => s.name.clone(),
        }
    }
}

fn slug(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect()
}

/// The runs: the base profile as loaded, then one per switch, each with its own output folder under
/// `<output>/sweep/` and its profile and changed stage configs written to `<output>/sweep/configs/`.
pub fn variants(
    base: Profile,
    switches: &Switches,
    env: impl Fn(&str) -> Option<String> + Copy,
    only: Option<&[String]>,
) -> Result<Vec<Variant>> {
    let root = base.cfg.paths.output.join("sweep");
    let mut out = Vec::new();
    for switch in &switches.switches {
        let name = slug(&switch.name);
        let configs = root.join("configs").join(&name);
        let mut yaml = switches.base.clone();
        let mut stages = switches.stages.clone();
        for (key, value) in &switch.to {
            match stage_key(key) {
                Some((stage, rest)) => set(stages.get_mut(stage).expect("a stage config"), rest, value.clone()),
                None => set(&mut yaml, key, value.clone()),
            }
        }
        for (stage, config) in &stages {
            if config != &switches.stages[stage] {
                let path = configs.join(format!("{stage}.yaml"));
                write_yaml(&path, config)?;
                set(&mut yaml, &format!("{stage}.config"), Yaml::String(path.display().to_string()));
            }
        }
        set(&mut yaml, "profile", Yaml::String(format!("{}+{}", base.cfg.profile, switch.name)));
        let output = root.join(&name);
        set(&mut yaml, "paths.output", Yaml::String(output.display().to_string()));
        set(&mut yaml, "paths.report", Yaml::String(output.join("reproduce").display().to_string()));
        let path = configs.join("reproduce.yaml");
        write_yaml(&path, &yaml)?;
        // The run's own folders come from its file: the environment's output and report are the base run's.
        let env = |var: &str| if matches!(var, "STIC_OUTPUT" | "STIC_REPORT") { None } else { env(var) };
        let profile = Profile::load(&path, env, only)?;
        out.push(Variant { switch: Some(switch.clone()), profile });
    }
    out.insert(0, Variant { switch: None, profile: base });
    Ok(out)
}

fn write_yaml(path: &Path, value: &Yaml) -> Result<()> {
    let text = serde_yaml::to_string(value).expect("YAML serialises");
    create_parent(path)?;
    write_atomic(path, text.as_bytes())
}

/// Each step's identity (see the module comment); the report's is empty: every run writes its own.
pub fn step_keys(plan: &Plan, profile: &Profile) -> Vec<String> {
    let output = profile.cfg.paths.output.display().to_string();
    let mut keys: Vec<String> = Vec::with_capacity(plan.steps.len());
    for (i, step) in plan.steps.iter().enumerate() {
        if step.action == Action::Report {
            keys.push(String::new());
            continue;
        }
        let signature = runner::signature(step, profile);
        // The profile's name is provenance only (recorded in summaries), and each run of a sweep has its own.
        let mut identity: Vec<String> = signature
            .iter()
            .enumerate()
            .map(|(k, arg)| match k.checked_sub(1).map(|p| signature[p].as_str()) {
                Some("--profile") => "$PROFILE".to_string(),
                _ => arg.replace(&output, "$OUT"),
            })
            .collect();
        for arg in &signature {
            if arg.ends_with(".yaml") {
                if let Ok(bytes) = std::fs::read(arg) {
                    identity.push(crate::eval::provenance::sha256_hex(&bytes));
                }
            }
        }
        for (j, earlier) in plan.steps[..i].iter().enumerate() {
            let reads_it = earlier.writes.iter().any(|w| {
                let w_text = w.display().to_string();
                step.reads.contains(w) || signature.iter().any(|arg| arg.contains(&w_text))
            });
            if reads_it {
                identity.push(keys[j].clone());
            }
        }
        keys.push(crate::eval::provenance::sha256_hex(identity.join("\0").as_bytes()));
    }
    keys
}

/// A done step of an earlier run: where its outputs are, and how long it took.
struct Produced {
    run: String,
    writes: Vec<PathBuf>,
    seconds: f64,
}

/// How one run of the sweep went.
#[derive(Debug, serde::Serialize)]
pub struct VariantRun {
    pub run: String,
    pub profile: String,
    pub output: PathBuf,
    /// Steps taken from an earlier run.
    pub shared: Vec<String>,
    pub steps: Vec<runner::StepRun>,
}

/// Links the outputs of the steps an earlier run did into this run, and marks them done here.
fn share(plan: &Plan, keys: &[String], variant: &Variant, produced: &HashMap<String, Produced>) -> Result<Vec<String>> {
    let statuses = runner::statuses(plan, &variant.profile)?;
    let mut shared = Vec::new();
    for ((step, key), (status, _)) in plan.steps.iter().zip(keys).zip(&statuses) {
        let Some(earlier) = produced.get(key) else { continue };
        if *status == Status::Done || key.is_empty() {
            continue;
        }
        for (mine, theirs) in step.writes.iter().zip(&earlier.writes) {
            if mine.symlink_metadata().is_ok() {
                continue;
            }
            create_parent(mine)?;
            let target = std::path::absolute(theirs).map_err(|e| Error::io(theirs, e))?;
            std::os::unix::fs::symlink(&target, mine).map_err(|e| Error::io(mine, e))?;
        }
        runner::write_marker(step, &variant.profile, earlier.seconds, None)?;
        eprintln!("{}: {} shared with run {}", variant.label(), step.name, earlier.run);
        shared.push(step.name.clone());
    }
    Ok(shared)
}

/// Runs every variant in order, sharing steps, then writes the sweep's table; returns the runs.
pub fn run_sweep(
    variants: &[Variant],
    has_flag: FlagSupport,
    binary: &Path,
    launch: &runner::Launch,
) -> Result<Vec<VariantRun>> {
    let mut produced: HashMap<String, Produced> = HashMap::new();
    let mut runs = Vec::new();
    for (k, variant) in variants.iter().enumerate() {
        eprintln!(
            "sweep run {}/{}: {} ({})",
            k + 1,
            variants.len(),
            variant.label(),
            variant.profile.cfg.paths.output.display()
        );
        let plan = plan(&variant.profile, has_flag);
        let keys = step_keys(&plan, &variant.profile);
        let shared = share(&plan, &keys, variant, &produced)?;
        let steps = runner::run_steps(&plan, &variant.profile, binary, launch, None)?;
        for ((step, key), (status, seconds)) in
            plan.steps.iter().zip(&keys).zip(runner::statuses(&plan, &variant.profile)?)
        {
            if status == Status::Done && !key.is_empty() {
                produced.entry(key.clone()).or_insert_with(|| Produced {
                    run: variant.label(),
                    writes: step.writes.clone(),
                    seconds: seconds.unwrap_or(0.0),
                });
            }
        }
        runs.push(VariantRun {
            run: variant.label(),
            profile: variant.profile.cfg.profile.clone(),
            output: variant.profile.cfg.paths.output.clone(),
            shared,
            steps,
        });
    }
    Ok(runs)
}

/// `--plan` of a sweep: each run's switch, and which of its steps it shares with an earlier run.
pub fn print_sweep_plan(switches: &Switches, variants: &[Variant], has_flag: FlagSupport) -> Result<()> {
    let mut owners: HashMap<String, String> = HashMap::new();
    let (mut total, mut to_run) = (0usize, 0usize);
    println!("sweep: {} runs, the base profile and one per switch", variants.len());
    for (key, why) in &switches.not_swept {
        println!("  not swept: {key}: {why}");
    }
    for (k, variant) in variants.iter().enumerate() {
        let plan = plan(&variant.profile, has_flag);
        let keys = step_keys(&plan, &variant.profile);
        let statuses = runner::statuses(&plan, &variant.profile)?;
        let changes = variant.switch.as_ref().map_or_else(String::new, |s| {
            let values =
                |side: &[(String, Yaml)]| side.iter().map(|(_, v)| yaml_text(v)).collect::<Vec<_>>().join(", ");
            format!(": {} -> {}", values(&s.from), values(&s.to))
        });
        println!("{:>3}. {}{changes} ({})", k + 1, variant.label(), variant.profile.cfg.paths.output.display());
        for ((step, key), (status, _)) in plan.steps.iter().zip(&keys).zip(&statuses) {
            total += 1;
            let state = match (status, owners.get(key).filter(|_| !key.is_empty())) {
                (Status::Done, _) => "done".to_string(),
                (_, Some(owner)) => format!("shared with {owner}"),
                _ => {
                    to_run += 1;
                    "to run".to_string()
                }
            };
            if !key.is_empty() {
                owners.entry(key.clone()).or_insert_with(|| variant.label());
            }
            println!("       {} [{state}]", step.name);
        }
    }
    println!("{to_run} of {total} steps to run; the others are done or shared");
    Ok(())
}

/// The final row of a benchmark: STIC with DaR where the profile has it, else STIC.
fn final_score(rows: &BenchmarkRows) -> Option<f64> {
    rows.score(Row::SticDar).or_else(|| rows.score(Row::Stic))
}

/// Writes `<report>_sweep.md`, `.json` and `.png` beside the base run's report: each switch's change of every
/// measured number against the base run.
pub fn write_sweep_report(variants: &[Variant]) -> Result<String> {
    let base = &variants[0];
    let base_rows = report::collect(&base.profile);
    let stem = base
        .profile
        .cfg
        .paths
        .report
        .file_name()
        .map_or_else(|| "reproduce".into(), |n| n.to_string_lossy().into_owned());
    let path = base.profile.cfg.paths.report.with_file_name(format!("{stem}_sweep"));
    let benches: Vec<&str> = base_rows.iter().map(|r| r.bench.name()).collect();
    let mut md = vec![
        format!(
            "# Quirk sweep: profile {}, one switch at a time set as the other profile sets it\n",
            base.profile.cfg.profile
        ),
        "Each cell is the final row (STIC + DaR where the profile has it, else STIC) less the base run's; the \
         JSON has every row.\n"
            .to_string(),
        format!("| switch | from | to | {} |", benches.join(" | ")),
        format!("|---|---|---|{}", "---|".repeat(benches.len())),
        format!(
            "| base ({}) | | | {} |",
            base.profile.cfg.profile,
            base_rows
                .iter()
                .map(|r| final_score(r).map_or("–".into(), |v| format!("{v:.1}")))
                .collect::<Vec<_>>()
                .join(" | ")
        ),
    ];
    let mut json_runs = Vec::new();
    let mut series = Vec::new();
    for variant in &variants[1..] {
        let switch = variant.switch.as_ref().expect("a switch");
        let rows = report::collect(&variant.profile);
        let deltas: Vec<Option<f64>> =
            rows.iter().zip(&base_rows).map(|(mine, theirs)| Some(final_score(mine)? - final_score(theirs)?)).collect();
        let values = |side: &[(String, Yaml)]| side.iter().map(|(_, v)| yaml_text(v)).collect::<Vec<_>>().join(", ");
        md.push(format!(
            "| {} | {} | {} | {} |",
            switch.name,
            values(&switch.from),
            values(&switch.to),
            deltas.iter().map(|d| d.map_or("–".into(), |v| format!("{v:+.1}"))).collect::<Vec<_>>().join(" | ")
        ));
        let per_bench: serde_json::Map<String, Value> = rows
            .iter()
            .zip(&base_rows)
            .map(|(mine, theirs)| {
                let by_row: serde_json::Map<String, Value> = mine
                    .measured
                    .iter()
                    .map(|m| {
                        let delta = m.cell.value().zip(theirs.score(m.row)).map(|(a, b)| a - b);
                        (m.row.name().to_string(), json!({ "score": m.cell.value(), "delta": delta }))
                    })
                    .collect();
                (mine.bench.name().to_string(), Value::Object(by_row))
            })
            .collect();
        json_runs.push(json!({
            "switch": switch.name,
            "from": switch.from.iter().map(|(k, v)| (k.clone(), yaml_text(v))).collect::<BTreeMap<_, _>>(),
            "to": switch.to.iter().map(|(k, v)| (k.clone(), yaml_text(v))).collect::<BTreeMap<_, _>>(),
            "output": variant.profile.cfg.paths.output,
            "benchmarks": per_bench,
        }));
        series.push((switch.name.clone(), deltas));
    }
    let base_scores: serde_json::Map<String, Value> =
        base_rows.iter().map(|r| (r.bench.name().to_string(), json!(final_score(r)))).collect();
    let json = json!({ "profile": base.profile.cfg.profile, "base": base_scores, "switches": json_runs });
    let markdown = md.join("\n") + "\n";
    create_parent(&path)?;
    write_atomic(&path.with_extension("md"), markdown.as_bytes())?;
    write_atomic(&path.with_extension("json"), serde_json::to_string_pretty(&json).expect("json").as_bytes())?;
    write_sweep_chart(&path.with_extension("png"), &base.profile.cfg.profile, &benches, &series)?;
    Ok(markdown)
}

/// One bar per switch and benchmark: its change of the final row, in points.
fn write_sweep_chart(
    path: &Path,
    profile: &str,
    benches: &[&str],
    series: &[(String, Vec<Option<f64>>)],
) -> Result<()> {
    let largest = series.iter().flat_map(|(_, v)| v.iter().flatten()).fold(1.0f64, |m, v| m.max(v.abs()));
    let series: Vec<report::Series> = series
        .iter()
        .enumerate()
        .map(|(s, (name, deltas))| {
            let RGBAColor(r, g, b, _) = Palette99::pick(s).to_rgba();
            (name.clone(), RGBColor(r, g, b), deltas.clone())
        })
        .collect();
    let caption = format!("Quirk sweep of profile {profile}: each switch's change of the final row");
    let range = -largest * 1.15..largest * 1.15;
    report::write_grouped_bars(path, &caption, "points against the base run", range, benches, &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn official_against_paper_has_one_switch_per_difference() {
        let profile = |name: &str| Profile::path_of(&root(), name).unwrap();
        let switches = Switches::between(&profile("official"), &profile("paper")).unwrap();
        let names: Vec<&str> = switches.switches.iter().map(|s| s.name.as_str()).collect();
        for expected in [
            "generation.top_k",
            "stage1.corruption",
            "stage1.keep_duplicates",
            "stage1.config.text_only",
            "stage1.config.dpo.rejected_scoring",
            "stage1.config.max_length",
            "stage2.config.loss_weighting+stage2.config.device_batch",
            "stage2.subset+stage2.sample",
            "eval.mmbench_options",
            "eval.dar",
        ] {
            assert!(names.contains(&expected), "{expected} not in {names:?}");
        }
        assert!(!names.iter().any(|n| n.starts_with("paths.") || *n == "profile" || n.ends_with(".config")));
        assert_eq!(switches.not_swept.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["model.checkpoint"]);
        let top_k = &switches.switches[names.iter().position(|n| *n == "generation.top_k").unwrap()];
        assert_eq!((yaml_text(&top_k.from[0].1), yaml_text(&top_k.to[0].1)), ("50".into(), "0".into()));
        let subset = &switches.switches[names.iter().position(|n| n.starts_with("stage2.subset")).unwrap()];
        assert_eq!(subset.to.len(), 2);
    }

    #[test]
    fn set_makes_the_missing_mappings() {
        let mut value: Yaml = serde_yaml::from_str("a: {b: 1}").unwrap();
        set(&mut value, "a.c.d", Yaml::from(2));
        set(&mut value, "a.b", Yaml::from(3));
        assert_eq!(value, serde_yaml::from_str::<Yaml>("a: {b: 3, c: {d: 2}}").unwrap());
    }
}
