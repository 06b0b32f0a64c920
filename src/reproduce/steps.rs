//! The step list of a profile: each step's command line (this binary's subcommands, flags from the profile's
//! switches), what it reads and writes, and what it needs that is not there.
use std::path::{Path, PathBuf};

use super::config::{Checkpoint, DarMode, EvalSettings, Profile, ScienceQaQuestions, Stage1Method, Subset};
use crate::eval::benchmarks::Benchmark;
use crate::model::config::{Layout, LlavaConfig, VisionTower};

/// The measured rows of every benchmark: the DaR gain and the training gain separate, and with
/// `eval.stage1_row` the progression base → stage 1 → stage 1 + 2 → + DaR of the paper's Table 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    Original,
    OriginalDar,
    /// The stage-1 adapter, without DaR.
    Stage1,
    Stic,
    SticDar,
}

/// The adapter a row is evaluated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapter {
    Stage1,
    Stage2,
}

impl Row {
    /// The rows `eval` asks for, in the report's order.
    pub fn of(eval: &EvalSettings) -> Vec<Row> {
        let mut rows = vec![Row::Original, Row::OriginalDar];
        if eval.stage1_row {
            rows.push(Row::Stage1);
        }
        rows.extend([Row::Stic, Row::SticDar]);
        rows
    }

    pub fn name(self) -> &'static str {
        match self {
            Row::Original => "original",
            Row::OriginalDar => "original_dar",
            Row::Stage1 => "stage1",
            Row::Stic => "stic",
            Row::SticDar => "stic_dar",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Row::Original => "original",
            Row::OriginalDar => "original + DaR",
            Row::Stage1 => "stage 1 only",
            Row::Stic => "STIC",
            Row::SticDar => "STIC + DaR",
        }
    }

    pub fn dar(self) -> bool {
        matches!(self, Row::OriginalDar | Row::SticDar)
    }

    pub fn adapter(self) -> Option<Adapter> {
        match self {
            Row::Original | Row::OriginalDar => None,
            Row::Stage1 => Some(Adapter::Stage1),
            Row::Stic | Row::SticDar => Some(Adapter::Stage2),
        }
    }
}

/// How a subcommand runs over the ranks of `stic reproduce --nproc-per-node N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranks {
    /// In one process: the subcommand has no data-parallel mode.
    One,
    /// Under torchrun, one shard of the inputs per rank (the generation jobs and evaluation).
    Shards,
    /// Under torchrun, the ranks share each global batch; the profile's `grad_accum` is divided among them so
    /// that the global batch stays the profile's.
    Training { grad_accum: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A subcommand of this binary with its arguments; `resume_from`: the training output whose
    /// `checkpoints/latest` makes the run continue with `--resume`.
    Command { args: Vec<String>, resume_from: Option<PathBuf>, ranks: Ranks },
    /// Writes the stage-2 instruction subset.
    Subset,
    /// Writes the report (always rerun: it reads whatever evaluations are done).
    Report,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    /// Steps of one kind take similar times: the ETA is estimated per kind.
    pub kind: &'static str,
    pub what: String,
    pub reads: Vec<PathBuf>,
    pub writes: Vec<PathBuf>,
    pub action: Action,
    /// What this step needs that is missing or wrong (external inputs), each with where to get it.
    pub problems: Vec<String>,
    /// Switches whose command-line flag this build lacks.
    pub unsupported: Vec<String>,
}

pub struct Plan {
    pub steps: Vec<Step>,
    pub stage1_adapter: PathBuf,
    pub stage2_adapter: PathBuf,
}

/// Whether subcommand `.0` of this build has flag `.1` (e.g. `("eval", "--template")`): a plan whose commands
/// would pass a flag the build lacks stops at the start instead of failing at that step.
pub type FlagSupport<'a> = &'a dyn Fn(&str, &str) -> bool;

struct Cmd<'a> {
    sub: &'static str,
    args: Vec<String>,
    has: FlagSupport<'a>,
    unsupported: Vec<String>,
}

impl<'a> Cmd<'a> {
    fn new(sub: &'static str, has: FlagSupport<'a>) -> Self {
        Cmd { sub, args: vec![sub.to_string()], has, unsupported: Vec::new() }
    }

    fn arg(mut self, flag: &str, value: impl std::fmt::Display) -> Self {
        self.check(flag);
        self.args.push(flag.to_string());
        self.args.push(value.to_string());
        self
    }

    fn path(self, flag: &str, value: &Path) -> Self {
        self.arg(flag, value.display())
    }

    fn flag(mut self, flag: &str, on: bool) -> Self {
        if on {
            self.check(flag);
            self.args.push(flag.to_string());
        }
        self
    }

    fn check(&mut self, flag: &str) {
        if !(self.has)(self.sub, flag) {
            self.unsupported.push(format!("`stic {} {flag}` is not in this build", self.sub));
        }
    }
}

/// Where to get each input, for the message that stops a run that lacks it.
fn fetch_hint(what: &str, profile: &Profile) -> String {
    match what {
        "model" => format!(
            "huggingface.co/{} (config.json, tokenizer files, the weight shards); set paths.model or STIC_MODEL",
            profile.cfg.model.hub_name()
        ),
        "tower" => match profile.cfg.model.base.separate_tower(profile.cfg.model.checkpoint) {
            Some(tower) => format!(
                "huggingface.co/{tower}: the model's checkpoint has no tower tensors and loads the one its \
                 mm_vision_tower names, from a folder or the Hugging Face cache (`huggingface-cli download {tower}`)"
            ),
            None => "the model's own folder (its checkpoint carries the tower)".into(),
        },
        "coco_train2014" => "images.cocodataset.org/zips/train2014.zip, unzipped (or images.zip of huggingface.co/datasets/STIC-LVLM/stic-coco-preference-6k, the 6k images alone); set paths.coco_train2014 or STIC_COCO_DIR".into(),
        "stage1_images" => "third_party/stic/6k_coco_names.json ships with stic; set paths.stage1_images or STIC_STAGE1_IMAGES".into(),
        "instruction_json" => match profile.cfg.stage2.subset {
            Subset::Official5k => "STIC's 5k instruction subset mixed_5k.json: STIC's README, \"Download the 5k instruction fine-tuning data\" \
                 (drive.google.com/file/d/1VNT-p0qIshIESwCT3DjmHtsiYfH2VvR1); its description-infused form is \
                 huggingface.co/datasets/STIC-LVLM/stic-llava-instruct-desc-5k; set paths.instruction_json or STIC_INSTRUCTION_JSON"
                .into(),
            Subset::SeededSample => "llava_v1_5_mix665k.json of huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K; set paths.instruction_json or STIC_INSTRUCTION_JSON".into(),
        },
        "instruction_images" => "the image folders of LLaVA's README (coco/train2017, gqa/images, ocr_vqa/images, textvqa/train_images, vg/VG_100K, vg/VG_100K_2); set paths.instruction_images or STIC_INSTRUCTION_IMAGES".into(),
        _ => "LLaVA-1.5's eval.zip (playground/data/eval) and the benchmark's images, as LLaVA's docs/Evaluation.md says; set paths.eval_root or STIC_EVAL_DIR".into(),
    }
}

fn require(problems: &mut Vec<String>, path: &Path, key: &str, dir: bool, profile: &Profile) {
    let ok = if dir { path.is_dir() } else { path.is_file() };
    if !ok {
        problems.push(format!("  {key}: {} is missing; get it from {}", path.display(), fetch_hint(key, profile)));
    }
}

/// The tower a checkpoint without one loads: what its config's `mm_vision_tower` names (a folder or a hub id), or
/// the base model's hub id while the model is not there yet.
fn separate_tower(profile: &Profile) -> Option<String> {
    let hub_id = profile.cfg.model.base.separate_tower(profile.cfg.model.checkpoint)?;
    let config = crate::fsutil::read_json::<serde_json::Value>(&profile.cfg.paths.model.join("config.json")).ok();
    let named = config.and_then(|c| c.get("mm_vision_tower")?.as_str().map(String::from));
    Some(named.unwrap_or_else(|| hub_id.to_string()))
}

fn model_problems(profile: &Profile) -> Vec<String> {
    let path = &profile.cfg.paths.model;
    let mut problems = Vec::new();
    if let Some(tower) = separate_tower(profile) {
        if matches!(VisionTower::locate(&tower), VisionTower::NotFound(_)) {
            let hint = fetch_hint("tower", profile);
            problems.push(format!(
                "  tower: {tower} is neither a folder nor in the Hugging Face cache; get it from {hint}"
            ));
        }
    }
    require(&mut problems, &path.join("config.json"), "model", false, profile);
    if !path.join("config.json").is_file() {
        return problems;
    }
    let expected = match profile.cfg.model.checkpoint {
        Checkpoint::Original => Layout::OriginalLlava,
        Checkpoint::LlavaHf => Layout::LlavaHf,
    };
    match LlavaConfig::from_dir(path, None) {
        Ok(cfg) if cfg.layout == expected => {}
        Ok(_) => problems.push(format!(
            "  model: {} is not the checkpoint model.checkpoint asks for; get it from {}",
            path.display(),
            fetch_hint("model", profile)
        )),
        Err(e) => problems.push(format!("  model: {e}")),
    }
    problems
}

/// What the profile reads that is fetched from elsewhere, by key (as the `missing` lines name them), with where
/// it goes and where it comes from: the model, its tower where the checkpoint has none, and the data.
pub fn fetch_list(profile: &Profile) -> Vec<(&'static str, String, String)> {
    let paths = &profile.cfg.paths;
    let mut list = vec![("model", paths.model.display().to_string(), fetch_hint("model", profile))];
    if let Some(tower) = separate_tower(profile) {
        let place = match VisionTower::locate(&tower) {
            VisionTower::Folder(folder) => format!("{tower} (found: {})", folder.display()),
            VisionTower::NotFound(_) => format!("{tower} (a folder, or the Hugging Face cache)"),
        };
        list.push(("tower", place, fetch_hint("tower", profile)));
    }
    for (key, path) in [
        ("coco_train2014", &paths.coco_train2014),
        ("stage1_images", &paths.stage1_images),
        ("instruction_json", &paths.instruction_json),
        ("instruction_images", &paths.instruction_images),
        ("eval_root", &paths.eval_root),
    ] {
        list.push((key, path.display().to_string(), fetch_hint(key, profile)));
    }
    list
}

/// Stage-1 images named in the list but missing from the COCO folder.
fn stage1_image_problems(profile: &Profile) -> Vec<String> {
    let paths = &profile.cfg.paths;
    let mut problems = Vec::new();
    require(&mut problems, &paths.stage1_images, "stage1_images", false, profile);
    require(&mut problems, &paths.coco_train2014, "coco_train2014", true, profile);
    if !problems.is_empty() {
        return problems;
    }
    match crate::fsutil::read_json::<Vec<String>>(&paths.stage1_images) {
        Ok(names) => {
            let missing: Vec<&String> = names.iter().filter(|n| !paths.coco_train2014.join(n).is_file()).collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "  coco_train2014: {} of the {} images of {} are not in {} (e.g. {}); get them from {}",
                    missing.len(),
                    names.len(),
                    paths.stage1_images.display(),
                    paths.coco_train2014.display(),
                    missing[0],
                    fetch_hint("coco_train2014", profile)
                ));
            }
        }
        Err(e) => problems.push(format!("  stage1_images: {e}")),
    }
    problems
}

/// The eval data of `bench` if its folder is missing.
fn eval_data_problem(bench: &dyn Benchmark, data: &Path, profile: &Profile) -> Option<String> {
    (!data.is_dir()).then(|| {
        format!(
            "  eval data for {}: {} is missing; get it from {}",
            bench.name(),
            data.display(),
            fetch_hint("eval_root", profile)
        )
    })
}

/// The steps of `profile`, checked against the file system and against the flags of this build.
pub fn plan(profile: &Profile, has_flag: FlagSupport) -> Plan {
    let cfg = &profile.cfg;
    let paths = &cfg.paths;
    let out = &paths.output;
    let processing = cfg.model.checkpoint.processing();
    let model_problems = model_problems(profile);
    let generation = |sub: &'static str| {
        let g = &cfg.generation;
        let cmd = Cmd::new(sub, has_flag)
            .path("--model", &paths.model)
            .arg("--dtype", &cfg.model.dtype)
            .arg("--temperature", g.temperature)
            .arg("--top-k", g.top_k)
            .arg("--max-new-tokens", g.max_new_tokens)
            .arg("--batch-size", g.batch_size)
            .arg("--seed", g.seed)
            .arg("--processing", processing);
        match g.template {
            Some(template) => cmd.arg("--template", template.name()),
            None => cmd,
        }
    };
    let mut steps = Vec::new();
    let mut push = |name: String,
                    kind: &'static str,
                    what: String,
                    reads: Vec<PathBuf>,
                    writes: Vec<PathBuf>,
                    action: Action,
                    problems: Vec<String>,
                    unsupported: Vec<String>| {
        steps.push(Step { name, kind, what, reads, writes, action, problems, unsupported });
    };

    let prefs = out.join("stage1/prefs.jsonl");
    let cmd = generation("prefs")
        .path("--image-dir", &paths.coco_train2014)
        .path("--images", &paths.stage1_images)
        .path("--output", &prefs)
        .arg("--corruption", cfg.stage1.corruption.flag())
        .arg(
            "--resize-filter",
            match cfg.stage1.corruption_resize {
                crate::image::Filter::Bilinear => "bilinear",
                crate::image::Filter::Bicubic => "bicubic",
            },
        )
        .flag("--keep-duplicates", cfg.stage1.keep_duplicates);
    let mut problems = model_problems.clone();
    problems.extend(stage1_image_problems(profile));
    push(
        "prefs".into(),
        "prefs",
        format!(
            "stage-1 preferences: a preferred and a dispreferred description of each image (corruption: {})",
            cfg.stage1.corruption.flag()
        ),
        vec![paths.model.clone(), paths.stage1_images.clone(), paths.coco_train2014.clone()],
        vec![prefs.clone()],
        Action::Command { args: cmd.args, resume_from: None, ranks: Ranks::Shards },
        problems,
        cmd.unsupported,
    );

    let stage1 = out.join("stage1/adapter");
    let (trainer, step, data, what) = match cfg.stage1.method {
        Stage1Method::Dpo => {
            ("train-dpo", "train-dpo", prefs.clone(), "stage 1: LoRA with DPO and the chosen-likelihood term")
        }
        Stage1Method::Sft => {
            let sft = out.join("stage1/sft.json");
            let cmd = Cmd::new("prefs-to-sft", has_flag).path("--prefs", &prefs).path("--output", &sft);
            push(
                "prefs-to-sft".into(),
                "prefs-to-sft",
                "stage 1 as SFT: the preferred description of each pair as a conversation (convert_pref_to_sft.py)"
                    .into(),
                vec![prefs.clone()],
                vec![sft.clone()],
                Action::Command { args: cmd.args, resume_from: None, ranks: Ranks::One },
                Vec::new(),
                cmd.unsupported,
            );
            (
                "train-sft",
                "train-stage1-sft",
                sft,
                "stage 1: LoRA SFT on the preferred descriptions (the paper's Table 3)",
            )
        }
    };
    let cmd = Cmd::new(trainer, has_flag)
        .path("--model", &paths.model)
        .path("--data", &data)
        .path("--image-dir", &paths.coco_train2014)
        .path("--output", &stage1)
        .path("--config", &cfg.stage1.config)
        .arg("--processing", processing);
    push(
        step.into(),
        trainer,
        what.into(),
        vec![paths.model.clone(), data, cfg.stage1.config.clone()],
        vec![stage1.clone()],
        Action::Command {
            args: cmd.args,
            resume_from: Some(stage1.clone()),
            ranks: Ranks::Training { grad_accum: profile.stage1.grad_accum },
        },
        model_problems.clone(),
        cmd.unsupported,
    );

    let subset = out.join("stage2/instructions.json");
    let mut problems = Vec::new();
    require(&mut problems, &paths.instruction_json, "instruction_json", false, profile);
    let what = match (cfg.stage2.subset, cfg.stage2.sample) {
        (Subset::SeededSample, Some(s)) => {
            format!("stage-2 subset: {} entries with an image, sampled with seed {}", s.size, s.seed)
        }
        _ => "stage-2 subset: STIC's released 5k instruction entries".into(),
    };
    push(
        "stage2-subset".into(),
        "stage2-subset",
        what,
        vec![paths.instruction_json.clone()],
        vec![subset.clone()],
        Action::Subset,
        problems,
        Vec::new(),
    );

    let descriptions = out.join("stage2/descriptions.jsonl");
    let cmd = generation("describe")
        .path("--adapter", &stage1)
        .path("--data", &subset)
        .path("--image-dir", &paths.instruction_images)
        .path("--output", &descriptions);
    let mut problems = model_problems.clone();
    require(&mut problems, &paths.instruction_images, "instruction_images", true, profile);
    push(
        "describe".into(),
        "describe",
        "stage 2: the stage-1 model describes the image of each subset entry".into(),
        vec![paths.model.clone(), stage1.clone(), subset.clone(), paths.instruction_images.clone()],
        vec![descriptions.clone()],
        Action::Command { args: cmd.args, resume_from: None, ranks: Ranks::Shards },
        problems.clone(),
        cmd.unsupported,
    );

    let infused = out.join("stage2/infused.json");
    let cmd = Cmd::new("infuse", has_flag)
        .path("--data", &subset)
        .path("--descriptions", &descriptions)
        .path("--output", &infused);
    push(
        "infuse".into(),
        "infuse",
        "stage 2: each description into the first user turn of its entry".into(),
        vec![subset.clone(), descriptions.clone()],
        vec![infused.clone()],
        Action::Command { args: cmd.args, resume_from: None, ranks: Ranks::One },
        Vec::new(),
        Vec::new(),
    );

    let stage2 = out.join("stage2/adapter");
    let cmd = Cmd::new("train-sft", has_flag)
        .path("--model", &paths.model)
        .path("--init-adapter", &stage1)
        .path("--data", &infused)
        .path("--image-dir", &paths.instruction_images)
        .path("--output", &stage2)
        .path("--config", &cfg.stage2.config)
        .arg("--processing", processing);
    push(
        "train-sft".into(),
        "train-sft",
        "stage 2: LoRA fine-tuning on the description-infused data, from the stage-1 adapter".into(),
        vec![
            paths.model.clone(),
            stage1.clone(),
            infused.clone(),
            paths.instruction_images.clone(),
            cfg.stage2.config.clone(),
        ],
        vec![stage2.clone()],
        Action::Command {
            args: cmd.args,
            resume_from: Some(stage2.clone()),
            ranks: Ranks::Training { grad_accum: profile.stage2.grad_accum },
        },
        problems,
        cmd.unsupported,
    );

    let mut eval_count = 0;
    for row in Row::of(&cfg.eval) {
        let adapter = row.adapter().map(|adapter| match adapter {
            Adapter::Stage1 => &stage1,
            Adapter::Stage2 => &stage2,
        });
        for (bench, data) in &profile.benchmarks {
            if row.dar() && !cfg.eval.dar.applies_to(*bench) {
                continue;
            }
            let dir = eval_dir(out, row, *bench);
            let e = &cfg.eval;
            let mut cmd = Cmd::new("eval", has_flag)
                .path("--model", &paths.model)
                .arg("--benchmark", bench.name())
                .path("--data", data)
                .path("--output", &dir)
                .arg("--dtype", &cfg.model.dtype)
                .arg("--batch-size", e.batch_size)
                .arg("--description-max-new-tokens", e.description_max_new_tokens)
                .arg("--processing", processing)
                .arg("--template", e.template.name())
                .flag("--dar", row.dar())
                .arg("--profile", &cfg.profile);
            if let Some(adapter) = adapter {
                cmd = cmd.path("--adapter", adapter);
            }
            if let Some(n) = e.max_new_tokens_of(*bench) {
                cmd = cmd.arg("--max-new-tokens", n);
            }
            if bench.name() == "mmbench" && !e.mmbench_options.is_default() {
                cmd = cmd.arg("--mmbench-options", e.mmbench_options.name());
            }
            if row.dar() {
                cmd = cmd.flag("--dar-image-blind", e.dar == DarMode::ImageBlindMmbench);
                if let Some(prompt) = &e.dar_prompt {
                    cmd = cmd.arg("--dar-prompt", prompt);
                }
            }
            if bench.name() == "scienceqa" {
                cmd = cmd.flag("--with-text-only", e.scienceqa_questions == ScienceQaQuestions::All);
            }
            if let Some(url) = &e.judge_url {
                cmd = cmd.arg("--judge-url", url);
            }
            if bench.name() == "llava-bench" {
                cmd = cmd.arg("--judge-model", &e.llava_bench_judge);
                if e.judge_url.is_some() && e.judge_runs > 1 {
                    cmd = cmd.arg("--judge-runs", e.judge_runs);
                }
            }
            let mut problems = model_problems.clone();
            problems.extend(eval_data_problem(*bench, data, profile));
            let mut reads = vec![paths.model.clone(), data.clone()];
            reads.extend(adapter.cloned());
            eval_count += 1;
            push(
                format!("eval-{}-{}", row.name(), bench.name()),
                "eval",
                format!("{}: {}", bench.name(), row.label()),
                reads,
                vec![dir.clone()],
                Action::Command { args: cmd.args, resume_from: None, ranks: Ranks::Shards },
                problems,
                cmd.unsupported,
            );
        }
    }
    let mut report_reads = vec![out.join("eval")];
    if cfg.eval.image_distribution {
        let dir = image_distribution_dir(out);
        let mut cmd = Cmd::new("image-distribution", has_flag)
            .path("--model", &paths.model)
            .arg("--set", format!("stage1={}", paths.stage1_images.display()))
            .path("--image-dir", &paths.coco_train2014);
        let mut reads = vec![paths.model.clone(), paths.stage1_images.clone(), paths.coco_train2014.clone()];
        let mut problems = model_problems.clone();
        problems.extend(stage1_image_problems(profile));
        for (bench, data) in &profile.benchmarks {
            cmd = cmd.arg("--benchmark-set", format!("{}={}", bench.name(), data.display()));
            reads.push(data.clone());
            problems.extend(eval_data_problem(*bench, data, profile));
        }
        let cmd = cmd.arg("--perplexity", cfg.eval.image_distribution_perplexity).path("--output", &dir);
        push(
            "image-distribution".into(),
            "image-distribution",
            "Fig. 7: t-SNE of the CLIP features of the stage-1 images and of each benchmark's".into(),
            reads,
            vec![dir.clone()],
            Action::Command { args: cmd.args, resume_from: None, ranks: Ranks::One },
            problems,
            cmd.unsupported,
        );
        report_reads.push(dir);
    }
    push(
        "report".into(),
        "report",
        format!(
            "the measured rows beside the paper's, and the chart (from the {} evaluations' summary.json)",
            eval_count
        ),
        report_reads,
        ["md", "json", "png"].iter().map(|ext| paths.report.with_extension(ext)).collect(),
        Action::Report,
        Vec::new(),
        Vec::new(),
    );
    Plan { steps, stage1_adapter: stage1, stage2_adapter: stage2 }
}

/// The output folder of Fig. 7 (`stic image-distribution`).
pub fn image_distribution_dir(output: &Path) -> PathBuf {
    output.join("analysis").join("image_distribution")
}

/// The output folder of one evaluation.
pub fn eval_dir(output: &Path, row: Row, bench: &dyn Benchmark) -> PathBuf {
    output.join("eval").join(row.name()).join(bench.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped `paper` profile (DaR on every benchmark) writing to `out`, with or without the stage-1 row.
    fn paper_profile(out: &Path, stage1_row: bool) -> Profile {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = out.to_string_lossy().to_string();
        let path = Profile::path_of(&root, "paper").unwrap();
        let mut profile = Profile::load(&path, |var| (var == "STIC_OUTPUT").then(|| out.clone()), None).unwrap();
        profile.cfg.eval.stage1_row = stage1_row;
        profile
    }

    fn position(plan: &Plan, prefix: &str) -> usize {
        plan.steps.iter().position(|s| s.name.starts_with(prefix)).unwrap()
    }

    #[test]
    fn the_stage1_row_is_off_by_default_and_adds_only_its_evaluations() {
        let dir = tempfile::tempdir().unwrap();
        let off = plan(&paper_profile(dir.path(), false), &|_, _| true);
        let on = plan(&paper_profile(dir.path(), true), &|_, _| true);
        assert!(!paper_profile(dir.path(), false).cfg.eval.stage1_row, "serde default: off");
        assert!(off.steps.iter().all(|s| !s.name.starts_with("eval-stage1-")));
        let stage1: Vec<&Step> = on.steps.iter().filter(|s| s.name.starts_with("eval-stage1-")).collect();
        assert_eq!(stage1.len(), 7, "one per benchmark");
        let others: Vec<(&String, &Action)> =
            on.steps.iter().filter(|s| !s.name.starts_with("eval-stage1-")).map(|s| (&s.name, &s.action)).collect();
        let unchanged: Vec<(&String, &Action)> = off.steps.iter().map(|s| (&s.name, &s.action)).collect();
        assert_eq!(others, unchanged, "the other steps keep their command lines (and so their markers)");
        assert!(position(&on, "eval-original_dar-") < position(&on, "eval-stage1-"));
        assert_eq!(position(&on, "eval-stage1-") + 7, position(&on, "eval-stic-"));
    }

    #[test]
    fn image_distribution_is_off_by_default_and_when_on_runs_after_the_evaluations_with_every_benchmark() {
        let dir = tempfile::tempdir().unwrap();
        let mut profile = paper_profile(dir.path(), false);
        let off = plan(&profile, &|_, _| true);
        assert!(off.steps.iter().all(|s| s.name != "image-distribution"), "serde default: off");
        profile.cfg.eval.image_distribution = true;
        profile.benchmarks[0].1 = dir.path().join("missing");
        let on = plan(&profile, &|_, _| true);
        let names: Vec<&str> = on.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names[names.len() - 2..], ["image-distribution", "report"]);
        let step = &on.steps[names.len() - 2];
        let Action::Command { args, ranks, .. } = &step.action else { panic!("{:?}", step.action) };
        assert_eq!(*ranks, Ranks::One);
        let values =
            |flag: &str| -> Vec<&str> { args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect() };
        let paths = &profile.cfg.paths;
        assert_eq!(values("--set"), [format!("stage1={}", paths.stage1_images.display())]);
        assert_eq!(values("--image-dir"), [paths.coco_train2014.display().to_string()]);
        let benchmark_sets: Vec<String> =
            profile.benchmarks.iter().map(|(b, data)| format!("{}={}", b.name(), data.display())).collect();
        assert_eq!(values("--benchmark-set"), benchmark_sets);
        assert_eq!(values("--perplexity"), ["30"]);
        assert_eq!(step.writes, vec![dir.path().join("analysis/image_distribution")]);
        assert!(step.reads.contains(&paths.stage1_images) && step.reads.contains(&profile.benchmarks[0].1));
        let missing = format!("eval data for scienceqa: {} is missing", dir.path().join("missing").display());
        assert!(step.problems.iter().any(|p| p.contains(&missing)), "{:?}", step.problems);
        assert!(on.steps.last().unwrap().reads.contains(&step.writes[0]), "the report reads it");
    }

    #[test]
    fn the_stage1_row_evaluates_the_stage1_adapter_without_dar() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(&paper_profile(dir.path(), true), &|_, _| true);
        let step = plan.steps.iter().find(|s| s.name == "eval-stage1-scienceqa").unwrap();
        let Action::Command { args, .. } = &step.action else { panic!("{:?}", step.action) };
        let adapter = args.iter().position(|a| a == "--adapter").map(|k| PathBuf::from(&args[k + 1]));
        assert_eq!(adapter.as_ref(), Some(&plan.stage1_adapter));
        assert!(!args.iter().any(|a| a == "--dar"), "{args:?}");
        assert!(step.reads.contains(&plan.stage1_adapter) && !step.reads.contains(&plan.stage2_adapter));
        assert_eq!(step.writes, vec![dir.path().join("eval/stage1/scienceqa")]);
        assert_eq!(step.what, "scienceqa: stage 1 only");
        let stic = plan.steps.iter().find(|s| s.name == "eval-stic-scienceqa").unwrap();
        assert!(stic.reads.contains(&plan.stage2_adapter) && !stic.reads.contains(&plan.stage1_adapter));
    }
}
