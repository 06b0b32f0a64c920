//! The reproduction profiles (`configs/<profile>/reproduce.yaml`): where the inputs are, and one named switch for
//! every way the released STIC code differs from the method as the paper states it.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ReproduceError;
use crate::eval::benchmarks::{self, Benchmark, MmBenchOptions, BENCHMARKS};
use crate::generate::engine::BatchSize;
use crate::image::Filter;
use crate::text::Template;
use crate::train::config::TrainConfig;

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
    /// Which of the paper's base models; absent: LLaVA-v1.6-Mistral-7B.
    #[serde(default)]
    pub base: BaseModel,
    pub checkpoint: Checkpoint,
    /// Generation and evaluation dtype (`f16`, `bf16`, `f32`, `auto`); training uses the stage configs' dtype.
    pub dtype: String,
}

/// Which release of the base model, and so whose image and text processing.
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
}

/// The base models of the paper, each with the table its numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum BaseModel {
    /// Tables 1 and 2, the paper's main results.
    #[default]
    #[serde(rename = "llava-v1.6-mistral-7b")]
    LlavaV16Mistral7b,
    /// Table 1.
    #[serde(rename = "llava-v1.5-7b")]
    LlavaV15Vicuna7b,
    /// Table 5.
    #[serde(rename = "llava-v1.6-vicuna-13b")]
    LlavaV16Vicuna13b,
}

impl BaseModel {
    pub fn title(self) -> &'static str {
        match self {
            BaseModel::LlavaV16Mistral7b => "LLaVA-v1.6-Mistral-7B",
            BaseModel::LlavaV15Vicuna7b => "LLaVA-v1.5-7B",
            BaseModel::LlavaV16Vicuna13b => "LLaVA-v1.6-Vicuna-13B",
        }
    }

    /// The hub repository of this model in `checkpoint`'s release.
    pub fn hub_name(self, checkpoint: Checkpoint) -> &'static str {
        match (self, checkpoint) {
            (BaseModel::LlavaV16Mistral7b, Checkpoint::Original) => "liuhaotian/llava-v1.6-mistral-7b",
            (BaseModel::LlavaV16Mistral7b, Checkpoint::LlavaHf) => "llava-hf/llava-v1.6-mistral-7b-hf",
            (BaseModel::LlavaV15Vicuna7b, Checkpoint::Original) => "liuhaotian/llava-v1.5-7b",
            (BaseModel::LlavaV15Vicuna7b, Checkpoint::LlavaHf) => "llava-hf/llava-1.5-7b-hf",
            (BaseModel::LlavaV16Vicuna13b, Checkpoint::Original) => "liuhaotian/llava-v1.6-vicuna-13b",
            (BaseModel::LlavaV16Vicuna13b, Checkpoint::LlavaHf) => "llava-hf/llava-v1.6-vicuna-13b-hf",
        }
    }

    /// The CLIP tower to fetch on its own: the original LLaVA-v1.5 checkpoints hold none and load the one their
    /// `mm_vision_tower` names; llava-hf folders and every LLaVA-v1.6 checkpoint carry theirs.
    pub fn separate_tower(self, checkpoint: Checkpoint) -> Option<&'static str> {
        (self == BaseModel::LlavaV15Vicuna7b && checkpoint == Checkpoint::Original)
            .then_some("openai/clip-vit-large-patch14-336")
    }
}

impl ModelSettings {
    pub fn hub_name(&self) -> &'static str {
        self.base.hub_name(self.checkpoint)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    /// The template of the preference and description prompts; absent: what the official `generate_pref.py` picks
    /// from the model's name (`stic prefs` without `--template`).
    #[serde(default)]
    pub template: Option<Template>,
    pub temperature: f64,
    /// 0: no top-k cut.
    pub top_k: usize,
    pub max_new_tokens: usize,
    pub batch_size: BatchSize,
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
    /// One pair per entry of the image list, a name listed twice included (`stic prefs --keep-duplicates`).
    #[serde(default)]
    pub keep_duplicates: bool,
    /// How stage 1 trains on the pairs: DPO (the method), or SFT on the preferred descriptions (the paper's
    /// Table 3, with the official `convert_pref_to_sft.py`'s conversion).
    #[serde(default)]
    pub method: Stage1Method,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage1Method {
    #[default]
    Dpo,
    Sft,
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
    /// Benchmark name -> its own limit, over `max_new_tokens` (the official TextVQA script's is 128).
    #[serde(default)]
    pub max_new_tokens_by_benchmark: BTreeMap<String, usize>,
    pub description_max_new_tokens: usize,
    pub scienceqa_questions: ScienceQaQuestions,
    /// The options each MMBench prompt lists.
    #[serde(default)]
    pub mmbench_options: MmBenchOptions,
    pub dar: DarMode,
    /// DaR's description prompt (the paper's Table 9 compares prompts); absent: the official
    /// `model_vqa_mmbench_dar.py` one.
    #[serde(default)]
    pub dar_prompt: Option<String>,
    /// Also evaluate the stage-1 adapter alone (no DaR): the row "stage 1 only" of the progression.
    #[serde(default)]
    pub stage1_row: bool,
    /// The LLaVA-Bench judge model (the other judged benchmarks keep their official graders' models).
    pub llava_bench_judge: String,
    /// An OpenAI-compatible endpoint for the judged benchmarks; without one their answers are written for the
    /// official graders and the report shows no number.
    pub judge_url: Option<String>,
    /// LLaVA-Bench: independent judge runs, their mean reported and their spread in its summary (Fig. 4: 3).
    #[serde(default = "one")]
    pub judge_runs: usize,
    pub batch_size: BatchSize,
    /// Benchmark name -> its folder under `paths.eval_root`.
    pub benchmarks: BTreeMap<String, String>,
    /// Also draw the paper's Fig. 7 (`stic image-distribution`): the stage-1 images against each benchmark's.
    #[serde(default)]
    pub image_distribution: bool,
    /// Fig. 7's t-SNE perplexity (scikit-learn's default); it must be below the number of images drawn.
    #[serde(default = "thirty")]
    pub image_distribution_perplexity: f64,
}

fn one() -> usize {
    1
}

fn thirty() -> f64 {
    30.0
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

impl EvalSettings {
    /// The `--max-new-tokens` of `bench`'s answers; `None`: the benchmark's own default.
    pub fn max_new_tokens_of(&self, bench: &dyn Benchmark) -> Option<usize> {
        let own = self.max_new_tokens_by_benchmark.iter().find(|(name, _)| name.eq_ignore_ascii_case(bench.name()));
        own.map(|(_, &tokens)| tokens).or(self.max_new_tokens)
    }
}

impl DarMode {
    /// Whether the +DaR rows exist for `bench`.
    pub fn applies_to(self, bench: &dyn Benchmark) -> bool {
        self == DarMode::WithImage || bench.name() == "mmbench"
    }
}

/// Reads YAML into `T`, naming the file (and the key, as serde reports it) in every error.
pub fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ReproduceError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ReproduceError::ReadConfig { path: path.to_owned(), source })?;
    serde_yaml::from_str(&text)
        .map_err(|source| ReproduceError::BadConfig { path: path.to_owned(), reason: source.to_string() })
}

/// A profile's YAML laid over the profile its `extends` names (a folder beside its own under `configs/`), so that a
/// profile for another base model states only what differs: mappings merge key by key, any other value replaces.
pub(super) fn read_profile_yaml(path: &Path, seen: &mut Vec<PathBuf>) -> Result<serde_yaml::Value, ReproduceError> {
    let bad = |reason: String| ReproduceError::BadConfig { path: path.to_owned(), reason };
    let mut value: serde_yaml::Value = read_yaml(path)?;
    let Some(parent) = value.as_mapping_mut().and_then(|m| m.remove("extends")) else { return Ok(value) };
    let name = parent.as_str().ok_or_else(|| bad("extends must be the name of a profile folder".into()))?;
    let parent_path = path.parent().and_then(Path::parent).unwrap_or(Path::new("")).join(name).join("reproduce.yaml");
    if name.is_empty() || name.contains(['/', '\\']) || !parent_path.is_file() {
        return Err(bad(format!("extends: {name}: there is no {}", parent_path.display())));
    }
    seen.push(path.to_owned());
    if seen.contains(&parent_path) {
        return Err(bad(format!("extends: {name}: the profiles extend each other in a loop")));
    }
    let mut base = read_profile_yaml(&parent_path, seen)?;
    merge_yaml(&mut base, value);
    Ok(base)
}

fn merge_yaml(base: &mut serde_yaml::Value, over: serde_yaml::Value) {
    let serde_yaml::Value::Mapping(over) = over else {
        *base = over;
        return;
    };
    let Some(base_map) = base.as_mapping_mut() else {
        *base = serde_yaml::Value::Mapping(over);
        return;
    };
    for (key, value) in over {
        match base_map.get_mut(&key) {
            Some(slot) => merge_yaml(slot, value),
            None => {
                base_map.insert(key, value);
            }
        }
    }
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
    pub fn load(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
        only: Option<&[String]>,
    ) -> Result<Self, ReproduceError> {
        let merged = read_profile_yaml(path, &mut Vec::new())?;
        let mut cfg: ReproduceConfig = serde_yaml::from_value(merged)
            .map_err(|source| ReproduceError::BadConfig { path: path.to_owned(), reason: source.to_string() })?;
        cfg.paths.apply_env(env);
        let bad = |reason: String| ReproduceError::BadConfig { path: path.to_owned(), reason };
        match (cfg.stage2.subset, cfg.stage2.sample) {
            (Subset::SeededSample, None) => {
                return Err(bad("stage2.subset seeded_sample needs stage2.sample: {size, seed}".into()))
            }
            (Subset::Official5k, Some(_)) => {
                return Err(bad("stage2.sample applies to stage2.subset seeded_sample only; remove it".into()))
            }
            _ => {}
        }
        if cfg.eval.judge_runs == 0 {
            return Err(bad("eval.judge_runs must be at least 1".into()));
        }
        let perplexity = cfg.eval.image_distribution_perplexity;
        if !(perplexity.is_finite() && perplexity > 0.0) {
            return Err(bad(format!("eval.image_distribution_perplexity must be a positive number, not {perplexity}")));
        }
        if cfg.eval.dar_prompt.as_deref().is_some_and(|p| p.trim().is_empty()) {
            return Err(bad("eval.dar_prompt is empty: give the description prompt's text, or remove the key for \
                            the official prompt"
                .into()));
        }
        for name in cfg.eval.max_new_tokens_by_benchmark.keys() {
            benchmarks::find(name).map_err(|e| bad(format!("eval.max_new_tokens_by_benchmark: {e}")))?;
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
        Ok(Profile {
            stage1: stage(&cfg.stage1.config)?,
            stage2: stage(&cfg.stage2.config)?,
            path: path.to_owned(),
            cfg,
            benchmarks,
        })
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
        assert_eq!(
            (official.cfg.model.checkpoint, paper.cfg.model.checkpoint),
            (Checkpoint::Original, Checkpoint::LlavaHf)
        );
        assert_eq!(
            (official.cfg.stage1.corruption, paper.cfg.stage1.corruption),
            (CorruptionMode::FlagOnly, CorruptionMode::Apply)
        );
        assert_eq!((official.cfg.stage1.keep_duplicates, paper.cfg.stage1.keep_duplicates), (true, false));
        assert_eq!((official.stage2.pooled_device_batch(), paper.stage2.pooled_device_batch()), (Some(16), None));
        assert!(official.stage1.text_only && !paper.stage1.text_only);
        assert!(official.stage1.disable_dropout && !paper.stage1.disable_dropout);
        assert!(!official.stage1.lora.train_projector && !official.stage2.lora.train_projector);
        assert_eq!((official.stage1.max_length, official.stage2.max_length), (1048, 2048));
        assert_eq!(official.cfg.stage2.subset, Subset::Official5k);
        assert_eq!(paper.cfg.stage2.subset, Subset::SeededSample);
        assert_eq!(official.cfg.eval.dar, DarMode::ImageBlindMmbench);
        assert_eq!(official.cfg.eval.template, Template::VicunaV1);
        for profile in [&official, &paper] {
            let template = crate::method::prefs::default_template(&profile.cfg.paths.model).unwrap();
            assert_eq!(template, Template::MistralInstruct, "prefs and describe keep generate_pref.py's pick");
            assert_eq!((profile.cfg.model.base, profile.cfg.generation.template), (BaseModel::LlavaV16Mistral7b, None));
        }
        assert_eq!(official.benchmarks.len(), 7);
        let textvqa = benchmarks::find("textvqa").unwrap();
        let scienceqa = benchmarks::find("scienceqa").unwrap();
        assert_eq!(official.cfg.eval.max_new_tokens_of(textvqa), Some(128), "model_vqa_loader.py's default");
        assert_eq!(official.cfg.eval.max_new_tokens_of(scienceqa), Some(1024));
        assert_eq!(paper.cfg.eval.max_new_tokens_of(textvqa), None);
        assert_eq!(
            (official.cfg.eval.mmbench_options, paper.cfg.eval.mmbench_options),
            (MmBenchOptions::Official, MmBenchOptions::All)
        );
        assert_eq!(official.benchmarks[0].0.name(), "scienceqa");
    }

    #[test]
    fn every_shipped_profile_parses_with_its_model_template_and_tower() {
        let names: Vec<String> = std::fs::read_dir(root().join("configs"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("reproduce.yaml").is_file())
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 6, "{names:?}");
        for name in names {
            let profile = shipped(&name);
            assert_eq!(profile.cfg.profile, name);
            let (base, template) = (profile.cfg.model.base, profile.cfg.generation.template);
            let from_name = crate::method::prefs::default_template(&profile.cfg.paths.model).unwrap();
            assert_eq!(template.unwrap_or(from_name), from_name, "{name}: generate_pref.py's pick from the name");
            let expected = match base {
                BaseModel::LlavaV16Mistral7b => Template::MistralInstruct,
                _ => Template::LlavaV1,
            };
            assert_eq!(from_name, expected, "{name}");
            assert_eq!(profile.cfg.eval.template, Template::VicunaV1, "{name}");
            let (kind, model) = name.split_once('-').unwrap_or((&name, "llava-v1.6-mistral-7b"));
            assert_eq!(base, serde_yaml::from_str::<BaseModel>(model).unwrap(), "{name}: the name says the model");
            let like = shipped(kind);
            assert_eq!(profile.cfg.stage1.config, like.cfg.stage1.config, "{name} trains as {kind}");
            assert_eq!(profile.cfg.stage2.config, like.cfg.stage2.config, "{name} trains as {kind}");
            assert_eq!(profile.cfg.stage1.corruption, like.cfg.stage1.corruption, "{name}");
            assert_eq!(profile.cfg.stage2.subset, like.cfg.stage2.subset, "{name}");
            assert_eq!(profile.cfg.eval.dar, like.cfg.eval.dar, "{name}");
            assert_ne!(profile.cfg.paths.output == like.cfg.paths.output, name != kind, "{name}: its own output");
            let tower = base.separate_tower(profile.cfg.model.checkpoint);
            let v15 = base == BaseModel::LlavaV15Vicuna7b;
            assert_eq!(tower, v15.then_some("openai/clip-vit-large-patch14-336"), "{name}");
            if v15 {
                assert_eq!(profile.cfg.model.checkpoint, Checkpoint::Original, "{name}: LLaVA's pad layout");
            }
        }
    }

    #[test]
    fn a_profile_extends_another_key_by_key_and_loops_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let configs = dir.path().join("configs");
        let paper = std::fs::read_to_string(root().join("configs/paper/reproduce.yaml")).unwrap();
        let root_paths = |text: &str| text.replace("configs/paper/", &format!("{}/configs/paper/", root().display()));
        for (name, text) in [
            ("paper", root_paths(&paper)),
            ("child", "extends: paper\nprofile: child\nmodel: {dtype: f16}\n".into()),
            ("a", "extends: b\n".into()),
            ("b", "extends: a\n".into()),
        ] {
            std::fs::create_dir_all(configs.join(name)).unwrap();
            std::fs::write(configs.join(name).join("reproduce.yaml"), text).unwrap();
        }
        let child = Profile::load(&Profile::path_of(dir.path(), "child").unwrap(), |_| None, None).unwrap();
        assert_eq!((child.cfg.profile.as_str(), child.cfg.model.dtype.as_str()), ("child", "f16"));
        assert_eq!(child.cfg.model.checkpoint, Checkpoint::LlavaHf, "the rest of model: from paper");
        let err = Profile::load(&Profile::path_of(dir.path(), "a").unwrap(), |_| None, None).unwrap_err();
        assert!(err.to_string().contains("in a loop"), "{err}");
    }

    #[test]
    fn environment_wins_over_the_config() {
        let root = root();
        let path = Profile::path_of(&root, "paper").unwrap();
        let profile =
            Profile::load(&path, |var| (var == "STIC_MODEL").then(|| "/elsewhere".to_string()), None).unwrap();
        assert_eq!(profile.cfg.paths.model, PathBuf::from("/elsewhere"));
    }

    #[test]
    fn unknown_profile_lists_the_known_ones() {
        let err = Profile::path_of(&root(), "nope").unwrap_err().to_string();
        assert!(err.contains("unknown profile 'nope'") && err.contains("official, official-llava-v1.5-7b"), "{err}");
    }
}
