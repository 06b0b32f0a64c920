//! The reproduction profiles (`configs/<profile>/reproduce.yaml`): where the inputs are, and one named switch for
//! every way the released STIC code differs from the method as the paper states it.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ReproduceError;
use crate::eval::benchmarks::{self, Benchmark, BENCHMARKS};
use crate::image::Filter;
use crate::text::Template;
use crate::train::trainer::TrainConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReproduceConfig {
    /// The profile's name, recorded in the report (`official`, `paper`, or a user's own).
    pub profile: String,
    pub paths: Paths,
    pub model: ModelSettings,
    /// Sampling of the stage-1 preferences and the stage-2 descriptions.
    pub generation: GenerationSettings,
    pub stage1: Stage1,
    pub stage2: Stage2,
    pub eval: EvalSettings,
}

/// Input and output locations; each can be replaced by its environment variable ([`Paths::ENV`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paths {
    pub model: PathBuf,
    pub coco_train2014: PathBuf,
    /// JSON list of the stage-1 image names in `coco_train2014`.
    pub stage1_images: PathBuf,
    /// Stage-2 instruction data: STIC's 5k subset (`stage2.subset: official_5k`) or LLaVA's mix665k to sample
    /// from (`seeded_sample`).
    pub instruction_json: PathBuf,
    pub instruction_images: PathBuf,
    /// LLaVA-1.5's `playground/data/eval`: one folder per benchmark.
    pub eval_root: PathBuf,
    /// Every intermediate file and adapter.
    pub output: PathBuf,
    /// The report's path without extension: `.md`, `.json` and `.png` are written.
    pub report: PathBuf,
}

impl Paths {
    /// The environment variable of each path; a set variable wins over the config.
    pub const ENV: [(&'static str, &'static str); 8] = [
        ("model", "STIC_MODEL"),
        ("coco_train2014", "STIC_COCO_DIR"),
        ("stage1_images", "STIC_STAGE1_IMAGES"),
        ("instruction_json", "STIC_INSTRUCTION_JSON"),
        ("instruction_images", "STIC_INSTRUCTION_IMAGES"),
        ("eval_root", "STIC_EVAL_DIR"),
        ("output", "STIC_OUTPUT"),
        ("report", "STIC_REPORT"),
    ];

    fn slot(&mut self, key: &str) -> &mut PathBuf {
        match key {
            "model" => &mut self.model,
            "coco_train2014" => &mut self.coco_train2014,
            "stage1_images" => &mut self.stage1_images,
            "instruction_json" => &mut self.instruction_json,
            "instruction_images" => &mut self.instruction_images,
            "eval_root" => &mut self.eval_root,
            "output" => &mut self.output,
            _ => &mut self.report,
        }
    }

    fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        for (key, var) in Self::ENV {
            if let Some(value) = lookup(var).filter(|v| !v.is_empty()) {
                *self.slot(key) = PathBuf::from(value);
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub checkpoint: Checkpoint,
    /// Generation and evaluation dtype (`f16`, `bf16`, `f32`, `auto`); training uses the stage configs' dtype.
    pub dtype: String,
}

/// Which release of LLaVA-v1.6-Mistral-7B, and so whose image and text processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checkpoint {
    /// `liuhaotian/llava-v1.6-mistral-7b` through LLaVA's own processing (what every official script loads).
    Original,
    /// `llava-hf/llava-v1.6-mistral-7b-hf` through transformers' processing.
    LlavaHf,
}

impl Checkpoint {
    /// The `--processing` value of the model-loading commands.
    pub fn processing(self) -> &'static str {
        match self {
            Checkpoint::Original => "llava",
            Checkpoint::LlavaHf => "transformers",
        }
    }

    pub fn hub_name(self) -> &'static str {
        match self {
            Checkpoint::Original => "liuhaotian/llava-v1.6-mistral-7b",
            Checkpoint::LlavaHf => "llava-hf/llava-v1.6-mistral-7b-hf",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    pub temperature: f64,
    /// 0: no top-k cut.
    pub top_k: usize,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage1 {
    /// The `train-dpo` settings (a [`TrainConfig`] file).
    pub config: PathBuf,
    pub corruption: CorruptionMode,
    /// Resampling of the 20-px downscale corruption.
    pub corruption_resize: Filter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorruptionMode {
    /// Generate the corrupted-image half from the corrupted image (the paper).
    Apply,
    /// Flag it but generate it from the clean image (the released `generate_pref.py`).
    FlagOnly,
}

impl CorruptionMode {
    pub fn flag(self) -> &'static str {
        match self {
            CorruptionMode::Apply => "apply",
            CorruptionMode::FlagOnly => "flag-only",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage2 {
    /// The `train-sft` settings (a [`TrainConfig`] file).
    pub config: PathBuf,
    pub subset: Subset,
    /// Size and seed of a `seeded_sample`.
    #[serde(default)]
    pub sample: Option<Sample>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subset {
    /// `paths.instruction_json` is STIC's released 5k subset (`mixed_5k.json`), used as it is.
    #[serde(rename = "official_5k")]
    Official5k,
    /// A seeded random sample of the entries with an image of `paths.instruction_json` (LLaVA's mix665k).
    SeededSample,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    pub size: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    /// Conversation template of both DaR passes and of plain answers.
    pub template: Template,
    /// New tokens per answer; `null`: each benchmark's LLaVA-1.5 default.
    pub max_new_tokens: Option<usize>,
    pub description_max_new_tokens: usize,
    pub scienceqa_questions: ScienceQaQuestions,
    pub dar: DarMode,
    /// The LLaVA-Bench judge model (the other judged benchmarks keep their official graders' models).
    pub llava_bench_judge: String,
    /// An OpenAI-compatible endpoint for the judged benchmarks; without one their answers are written for the
    /// official graders and the report shows no number.
    pub judge_url: Option<String>,
    pub batch_size: usize,
    /// Benchmark name -> its folder under `paths.eval_root`.
    pub benchmarks: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScienceQaQuestions {
    /// Every question of `llava_test_CQM-A.json`, text-only ones included (Accuracy and IMG-Accuracy).
    All,
    /// The questions with an image (ScienceQA-IMG).
    Image,
}


#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DarMode {
    /// Describe the image, then answer with the description, on every benchmark (the paper).
    WithImage,
    /// Only on MMBench, and the description prompt has no image (`model_vqa_mmbench_dar.py`).
    ImageBlindMmbench,
}

impl DarMode {
    /// Whether the +DaR rows exist for `bench`.
    pub fn applies_to(self, bench: &dyn Benchmark) -> bool {
        self == DarMode::WithImage || bench.name() == "mmbench"
    }
}

/// Reads YAML into `T`, naming the file (and the key, as serde reports it) in every error.
pub fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ReproduceError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReproduceError::ReadConfig { path: path.to_owned(), source })?;
    serde_yaml::from_str(&text).map_err(|source| ReproduceError::BadConfig { path: path.to_owned(), reason: source.to_string() })
}

/// A profile with its stage configs, paths resolved (environment first).
#[derive(Debug, Clone)]
pub struct Profile {
    pub path: PathBuf,
    pub cfg: ReproduceConfig,
    pub stage1: TrainConfig,
    pub stage2: TrainConfig,
    /// The benchmarks to run, in the paper's order, with their folders.
    pub benchmarks: Vec<(&'static dyn Benchmark, PathBuf)>,
}

impl Profile {
    /// `configs/<name>/reproduce.yaml` under `root`.
    pub fn path_of(root: &Path, name: &str) -> Result<PathBuf, ReproduceError> {
        let path = root.join("configs").join(name).join("reproduce.yaml");
        if name.is_empty() || name.contains(['/', '\\']) || !path.is_file() {
            let known = std::fs::read_dir(root.join("configs"))
                .map(|dir| {
                    let mut names: Vec<String> = dir
                        .filter_map(|e| e.ok())
                        .filter(|e| e.path().join("reproduce.yaml").is_file())
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect();
                    names.sort();
                    names
                })
                .unwrap_or_default();
            return Err(ReproduceError::UnknownProfile { name: name.to_string(), path, known });
        }
        Ok(path)
    }

    /// Loads a profile; `only` restricts the benchmarks (names as in the config).
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>, only: Option<&[String]>) -> Result<Self, ReproduceError> {
        let mut cfg: ReproduceConfig = read_yaml(path)?;
        cfg.paths.apply_env(env);
        let bad = |reason: String| ReproduceError::BadConfig { path: path.to_owned(), reason };
        match (cfg.stage2.subset, cfg.stage2.sample) {
            (Subset::SeededSample, None) => return Err(bad("stage2.subset seeded_sample needs stage2.sample: {size, seed}".into())),
            (Subset::Official5k, Some(_)) => return Err(bad("stage2.sample applies to stage2.subset seeded_sample only; remove it".into())),
            _ => {}
        }
        for (what, value) in [("generation.batch_size", cfg.generation.batch_size), ("eval.batch_size", cfg.eval.batch_size)] {
            if value == 0 {
                return Err(bad(format!("{what} must be at least 1")));
            }
        }
        let mut benchmarks = Vec::new();
        for (name, folder) in &cfg.eval.benchmarks {
            let bench = benchmarks::find(name).map_err(|e| bad(format!("eval.benchmarks: {e}")))?;
            benchmarks.push((bench, cfg.paths.eval_root.join(folder)));
        }
        benchmarks.sort_by_key(|(b, _)| BENCHMARKS.iter().position(|a| a.name() == b.name()));
        if let Some(only) = only {
            for name in only {
                if !cfg.eval.benchmarks.contains_key(name) {
                    return Err(ReproduceError::UnknownBenchmark { name: name.clone(), path: path.to_owned() });
                }
            }
            benchmarks.retain(|(b, _)| only.iter().any(|n| n == b.name()));
        }
        let stage = |file: &Path| -> Result<TrainConfig, ReproduceError> { read_yaml(file) };
        Ok(Profile { stage1: stage(&cfg.stage1.config)?, stage2: stage(&cfg.stage2.config)?, path: path.to_owned(), cfg, benchmarks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// Cargo runs the tests in the crate root, which the profiles' relative paths are relative to.
    fn shipped(name: &str) -> Profile {
        let root = root();
        Profile::load(&Profile::path_of(&root, name).unwrap(), |_| None, None).unwrap()
    }

    #[test]
    fn shipped_profiles_parse_and_differ_where_the_issue_says() {
        let official = shipped("official");
        let paper = shipped("paper");
        assert_eq!((official.cfg.model.checkpoint, paper.cfg.model.checkpoint), (Checkpoint::Original, Checkpoint::LlavaHf));
        assert_eq!((official.cfg.stage1.corruption, paper.cfg.stage1.corruption), (CorruptionMode::FlagOnly, CorruptionMode::Apply));
        assert!(official.stage1.text_only && !paper.stage1.text_only);
        assert!(official.stage1.disable_dropout && !paper.stage1.disable_dropout);
        assert!(!official.stage1.lora.train_projector && !official.stage2.lora.train_projector);
        assert_eq!((official.stage1.max_length, official.stage2.max_length), (1048, 2048));
        assert_eq!(official.cfg.stage2.subset, Subset::Official5k);
        assert_eq!(paper.cfg.stage2.subset, Subset::SeededSample);
        assert_eq!(official.cfg.eval.dar, DarMode::ImageBlindMmbench);
        assert_eq!(official.cfg.eval.template, Template::VicunaV1);
        assert_eq!(official.benchmarks.len(), 7);
        assert_eq!(official.benchmarks[0].0.name(), "scienceqa");
    }

    #[test]
    fn environment_wins_over_the_config() {
        let root = root();
        let path = Profile::path_of(&root, "paper").unwrap();
        let profile = Profile::load(&path, |var| (var == "STIC_MODEL").then(|| "/elsewhere".to_string()), None).unwrap();
        assert_eq!(profile.cfg.paths.model, PathBuf::from("/elsewhere"));
    }

    #[test]
    fn unknown_profile_lists_the_known_ones() {
        let err = Profile::path_of(&root(), "nope").unwrap_err().to_string();
        assert!(err.contains("unknown profile 'nope'") && err.contains("official, paper"), "{err}");
    }
}
