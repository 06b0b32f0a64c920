//! STIC stage 1 data: for each unlabeled image, a preferred description (the step-by-step prompt on the clean
//! image) and a dispreferred one (a hallucination prompt on the clean image, or a plain prompt on a corrupted
//! image, half and half). With `apply_corruption` off, the corrupted half is flagged (`image_corruption: true`)
//! but generated from the clean image, as the official `generate_pref.py` does (it never passes its flag on).
use clap::ValueEnum;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

use super::corrupt::Corruption;
use crate::error::{Error, Result};
use crate::generate::engine::EngineOptions;
use crate::generate::session::{ModelSource, ModelSpec};
use crate::generate::SamplingConfig;
use crate::image::Filter;
use crate::jobs::job::{GenerationTask, JobSummary, Request, ShardedJob};
use crate::jobs::shard::{merge_shards, MissingKeys};
use crate::text::Template;

/// `third_party/stic/prompts.json`: the prompts and settings of the official scripts.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct SticPrompts {
    pub preferred_prompt: String,
    pub description_prompts: Vec<String>,
    pub hallucination_prompts: Vec<String>,
    pub dar_description_prompt: String,
    pub generation: GenerationDefaults,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct GenerationDefaults {
    pub temperature: f64,
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    pub max_new_tokens: usize,
}

impl SticPrompts {
    pub fn shipped() -> Self {
        serde_json::from_str(include_str!("../../third_party/stic/prompts.json")).expect("the shipped prompts parse")
    }
}

/// What a stage-1 or stage-2 generation job (`prefs`, `describe`) is asked for besides its inputs; the sampling
/// left unset comes from the prompts file.
pub struct SticJobOptions {
    /// `I/N`: only the items whose position p in the list has p % N == I.
    pub shard: Option<String>,
    /// Only the first N items of the list.
    pub limit: Option<usize>,
    /// Seed of the sampling and of the corruptions (each item's own seed derives from it and its position).
    pub seed: u64,
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub engine: EngineOptions,
    /// The conversation template; `None`: the one the official scripts pick from the model's name
    /// ([`default_template`]).
    pub template: Option<Template>,
    /// Print the JSON summary on stdout too.
    pub print_summary: bool,
}

impl SticJobOptions {
    /// The job writing `output`; `task` names the job in the settings its output records (with the model's and
    /// the prompts and the template).
    pub fn job<'a>(
        &'a self,
        model: &'a ModelSpec,
        output: &'a Path,
        key_field: &'a str,
        unit: &'a str,
        prompts: &SticPrompts,
        task: &str,
    ) -> Result<ShardedJob<'a>> {
        let defaults = &prompts.generation;
        let sampling = SamplingConfig {
            max_new_tokens: self.max_new_tokens.unwrap_or(defaults.max_new_tokens),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.or(defaults.top_p).unwrap_or(1.0),
            top_k: self.top_k.or(defaults.top_k).unwrap_or(0),
            seed: self.seed,
        };
        let template = match self.template {
            Some(template) => template,
            None => match &model.model {
                ModelSource::Folder(dir) => default_template(dir)?,
                // both geometries are LLaVA-v1.6-Mistral's
                ModelSource::Random { .. } => Template::MistralInstruct,
            },
        };
        Ok(ShardedJob {
            model,
            output,
            key_field,
            unit,
            shard: self.shard.as_deref(),
            limit: self.limit,
            sampling,
            engine: self.engine.clone(),
            template,
            task_settings: serde_json::json!({"task": task, "template": template, "prompts": prompts}),
            print_summary: self.print_summary,
        })
    }
}

/// The name the official scripts read the template from: LLaVA's `get_model_name_from_path` (the last folder,
/// `parent_checkpoint-N` for a `checkpoint-N` folder), or the repository's name for a snapshot of the Hugging
/// Face cache (`models--owner--name/snapshots/<commit>`, what a hub id resolves to).
pub fn model_name(model: &Path) -> String {
    let name = |path: &Path| path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = model.parent().unwrap_or(Path::new(""));
    let hub_repo = parent.parent().filter(|_| name(parent) == "snapshots").map(name);
    if let Some(repo) = hub_repo.as_deref().and_then(|r| r.strip_prefix("models--")).and_then(|r| r.split_once("--")) {
        return repo.1.to_string();
    }
    let last = name(model);
    if last.starts_with("checkpoint-") {
        format!("{}_{last}", name(parent))
    } else {
        last
    }
}

/// The template of `prefs` and `describe` without `--template`: what the official `generate_pref.py` and
/// `generate_des_stage2.py` pick from the model's name ([`Template::official_choice`]). A name that none of their
/// rules match (they fall back on `llava_v0`) is read from the config's `_name_or_path` instead, and failing that
/// gets `mistral_instruct`, STIC's model's; a name they give a template stic does not have is refused.
pub fn default_template(model: &Path) -> Result<Template> {
    let mut name = model_name(model);
    if Template::official_choice(&name) == "llava_v0" {
        let config = std::fs::read_to_string(model.join("config.json")).ok();
        let json = config.and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        if let Some(name_or_path) = json.as_ref().and_then(|j| j["_name_or_path"].as_str()) {
            name = model_name(Path::new(name_or_path));
        }
    }
    match Template::official_choice(&name) {
        "llava_v0" => {
            eprintln!(
                "note: --model {}: no template rule of the official scripts matches '{name}': using mistral_instruct \
                 (give --template to choose)",
                model.display()
            );
            Ok(Template::MistralInstruct)
        }
        choice => choice.parse().map_err(|_| {
            Error::Input(format!(
                "--model {}: the official scripts use LLaVA's {choice} template for a model named '{name}', which \
                 stic does not have: give --template ({})",
                model.display(),
                Template::names().join(", ")
            ))
        }),
    }
}

/// `stic prefs`: the preference pairs of the images of a folder.
pub struct PrefsOptions {
    pub model: ModelSpec,
    /// Folder of unlabeled images.
    pub image_dir: PathBuf,
    /// JSON list of image names in `image_dir`; `None`: every image there.
    pub images: Option<PathBuf>,
    /// JSONL output; a rerun continues it.
    pub output: PathBuf,
    /// Corrupt the image of the corrupted-image half (false: flag it only, as the official code).
    pub apply_corruption: bool,
    /// Resampling of the 20-px downscale.
    pub resize_filter: Filter,
    /// One pair per entry of the list, a name listed twice included (as the official `generate_pref.py`), keyed
    /// by list position (`index`); otherwise one pair per image, keyed by name.
    pub keep_duplicates: bool,
    pub job: SticJobOptions,
}

/// An entry of the image list: its position there and the image it names.
pub struct ListedImage {
    pub index: usize,
    pub name: String,
}

/// The key field of `stic prefs` records: `index` (the list position) when duplicates are kept, else `image`.
fn prefs_key_field(keep_duplicates: bool) -> &'static str {
    if keep_duplicates {
        "index"
    } else {
        "image"
    }
}

/// Generates the preference pairs of `opts.images` (or of every image in the folder) into `opts.output`.
pub fn run_prefs(opts: &PrefsOptions) -> Result<JobSummary> {
    let list: Vec<(&str, &Path)> = opts.images.as_deref().map(|list| ("--images", list)).into_iter().collect();
    opts.model.check_output("--output", &opts.output, &list)?;
    let names = image_list(&opts.image_dir, opts.images.as_deref())?;
    let prompts = SticPrompts::shipped();
    let key_field = prefs_key_field(opts.keep_duplicates);
    let mut job = opts.job.job(&opts.model, &opts.output, key_field, "images", &prompts, "prefs")?;
    if opts.keep_duplicates {
        job.task_settings["keep_duplicates"] = true.into();
    }
    let entries: Vec<ListedImage> =
        names.into_iter().enumerate().map(|(index, name)| ListedImage { index, name }).collect();
    job.run(&entries, |session| PrefsTask {
        prompts,
        image_dir: &opts.image_dir,
        seed: opts.job.seed,
        model_name: opts.model.model.to_string(),
        max_pixels: session.model.cfg.image.max_pixels,
        apply_corruption: opts.apply_corruption,
        resize_filter: opts.resize_filter,
        keep_duplicates: opts.keep_duplicates,
    })
}

const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// The image names of a JSON list, or every image file in the folder (sorted).
pub fn image_list(image_dir: &Path, list: Option<&Path>) -> Result<Vec<String>> {
    if image_dir.is_file() {
        return Err(Error::Input(format!(
            "image folder {} is a file: give the folder that holds the images",
            image_dir.display()
        )));
    }
    if !image_dir.is_dir() {
        return Err(Error::Input(format!("image folder {} does not exist", image_dir.display())));
    }
    let names: Vec<String> = match list {
        Some(path) => crate::fsutil::read_json(path)?,
        None => {
            let mut names: Vec<String> = std::fs::read_dir(image_dir)
                .map_err(|e| Error::io(image_dir, e))?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| {
                    Path::new(n)
                        .extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_lowercase().as_str()))
                })
                .collect();
            names.sort();
            names
        }
    };
    match list {
        Some(path) if names.is_empty() => {
            Err(Error::Input(format!("the image list {} is empty: name the images to process", path.display())))
        }
        None if names.is_empty() => Err(Error::Input(format!("no images to process in {}", image_dir.display()))),
        _ => Ok(names),
    }
}

/// `stic prefs-merge`: the shard outputs of a `prefs` run (ordered by its image folder or list) or of a `describe`
/// run (ordered by its instruction data), and the file to join them into.
pub struct MergeOptions {
    pub inputs: Vec<PathBuf>,
    pub output: PathBuf,
    pub image_dir: Option<PathBuf>,
    pub images: Option<PathBuf>,
    pub data: Option<PathBuf>,
}

/// Joins the shard outputs into one file in the order of the run's input list; returns the records written.
pub fn merge_job_shards(opts: &MergeOptions) -> Result<usize> {
    let mut inputs: Vec<(&str, &Path)> = opts.inputs.iter().map(|shard| ("--inputs", shard.as_path())).collect();
    inputs.extend(opts.images.as_deref().map(|list| ("--images", list)));
    inputs.extend(opts.data.as_deref().map(|data| ("--data", data)));
    crate::fsutil::check_output("--output", &opts.output, &inputs)?;
    let (key, order) = match (&opts.data, &opts.image_dir, &opts.images) {
        // `describe` only describes entries with an image.
        (Some(data), _, _) => (
            "id",
            super::infuse::load_instruction_data(data)?
                .iter()
                .filter(|e| e.image.is_some())
                .map(|e| e.id_text())
                .collect(),
        ),
        (None, Some(dir), list) => ("image", image_list(dir, list.as_deref())?),
        (None, None, Some(list)) => ("image", crate::fsutil::read_json::<Vec<String>>(list)?),
        _ => {
            return Err(Error::Input("give --image-dir or --images (prefs shards), or --data (describe shards)".into()))
        }
    };
    let kept_duplicates = crate::jobs::shard::shared_settings(&opts.inputs)?
        .is_some_and(|settings| settings["task"] == "prefs" && settings["keep_duplicates"] == true);
    let (key, order) = if kept_duplicates {
        (prefs_key_field(true), (0..order.len()).map(|index| index.to_string()).collect())
    } else {
        (key, order)
    };
    let mut seen = std::collections::HashSet::new();
    let order: Vec<String> = order.into_iter().filter(|k| seen.insert(k.clone())).collect();
    merge_shards(&opts.inputs, &opts.output, key, &order, MissingKeys::Refuse)
}

pub struct PrefsTask<'a> {
    pub prompts: SticPrompts,
    pub image_dir: &'a Path,
    pub seed: u64,
    pub model_name: String,
    pub max_pixels: u64,
    /// Corrupt the image of the corrupted-image half (false: flag it only, as the official code).
    pub apply_corruption: bool,
    /// Resampling of the 20-px downscale.
    pub resize_filter: Filter,
    /// Key records by list position, so that a name listed twice makes two pairs.
    pub keep_duplicates: bool,
}

pub struct PrefsPlan {
    description_prompt: String,
    hallucination_prompt: Option<String>,
    /// The corrupted-image half: the corruption applied, or `None` when it is only flagged.
    corrupted: Option<Option<Corruption>>,
}

impl PrefsTask<'_> {
    fn rng(&self, position: usize) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(position as u64))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.image_dir.join(name)
    }
}

impl GenerationTask for PrefsTask<'_> {
    type Item = ListedImage;
    type Plan = PrefsPlan;

    fn key(&self, item: &ListedImage) -> String {
        if self.keep_duplicates {
            item.index.to_string()
        } else {
            item.name.clone()
        }
    }

    /// `position` is the entry's place in the list: a name listed twice gets two seeds, so two draws of prompts
    /// and samples, as the official loop's two iterations do.
    fn plan(&self, position: usize, entry: &ListedImage) -> std::result::Result<(PrefsPlan, Vec<Request>), String> {
        let name = &entry.name;
        let image = crate::image::load_image(&self.path(name), self.max_pixels).map_err(|e| e.to_string())?;
        let mut rng = self.rng(position);
        let pick = |rng: &mut ChaCha8Rng, list: &[String]| list[rng.random_range(0..list.len())].clone();
        let description_prompt = pick(&mut rng, &self.prompts.description_prompts);
        let chosen = Request { user_text: self.prompts.preferred_prompt.clone(), image: Some(image.clone()) };
        let (plan, rejected) = if rng.random_bool(0.5) {
            let hallucination = pick(&mut rng, &self.prompts.hallucination_prompts);
            let request = Request { user_text: hallucination.clone(), image: Some(image) };
            (PrefsPlan { description_prompt, hallucination_prompt: Some(hallucination), corrupted: None }, request)
        } else {
            let (corruption, image) = if self.apply_corruption {
                let corruptions = Corruption::value_variants();
                let corruption = corruptions[rng.random_range(0..corruptions.len())];
                (Some(corruption), corruption.apply(&image, self.resize_filter, &mut rng))
            } else {
                (None, image)
            };
            let request = Request { user_text: description_prompt.clone(), image: Some(image) };
            (PrefsPlan { description_prompt, hallucination_prompt: None, corrupted: Some(corruption) }, request)
        };
        Ok((plan, vec![chosen, rejected]))
    }

    fn record(
        &self,
        _position: usize,
        entry: &ListedImage,
        plan: PrefsPlan,
        outputs: Vec<String>,
    ) -> serde_json::Value {
        let turns = |response: &str| {
            serde_json::json!([
                {"role": "user", "content": plan.description_prompt},
                {"role": "assistant", "content": response},
            ])
        };
        let mut record = serde_json::json!({
            "image": entry.name,
            "image_corruption": plan.corrupted.is_some(),
            "hallu_prompt": plan.hallucination_prompt.clone().unwrap_or_default(),
            "chosen": turns(&outputs[0]),
            "rejected": turns(&outputs[1]),
            "corruption": plan.corrupted.flatten(),
            "seed": self.seed,
            "model": self.model_name,
        });
        if self.keep_duplicates {
            record["index"] = entry.index.into();
        }
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_name_is_llavas_get_model_name_from_path_or_the_hub_repository() {
        for (path, name) in [
            ("/data/llava-v1.6-mistral-7b/", "llava-v1.6-mistral-7b"),
            ("runs/llava-v1.5-7b/checkpoint-500", "llava-v1.5-7b_checkpoint-500"),
            ("/hf/hub/models--liuhaotian--llava-v1.6-34b/snapshots/0123abc", "llava-v1.6-34b"),
            ("/elsewhere/snapshots/0123abc", "0123abc"),
        ] {
            assert_eq!(model_name(Path::new(path)), name, "{path}");
        }
    }

    #[test]
    fn the_default_template_follows_the_name_then_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str, config: Option<&str>| {
            let folder = dir.path().join(name);
            std::fs::create_dir_all(&folder).unwrap();
            if let Some(config) = config {
                std::fs::write(folder.join("config.json"), config).unwrap();
            }
            default_template(&folder)
        };
        assert_eq!(at("llava-v1.6-vicuna-13b", None).unwrap(), Template::LlavaV1);
        assert_eq!(
            at("merged", Some(r#"{"_name_or_path": "liuhaotian/llava-v1.6-34b"}"#)).unwrap(),
            Template::ChatmlDirect
        );
        assert_eq!(at("plain", Some("{}")).unwrap(), Template::MistralInstruct);
        assert!(matches!(at("llava-mpt-7b", None), Err(Error::Input(m)) if m.contains("mpt template")));
    }

    fn task(dir: &Path, apply_corruption: bool) -> PrefsTask<'_> {
        PrefsTask {
            prompts: SticPrompts::shipped(),
            image_dir: dir,
            seed: 1,
            model_name: "m".into(),
            max_pixels: crate::image::DEFAULT_MAX_PIXELS,
            apply_corruption,
            resize_filter: Filter::Bilinear,
            keep_duplicates: false,
        }
    }

    fn entry(index: usize, name: &str) -> ListedImage {
        ListedImage { index, name: name.into() }
    }

    /// The shipped stage-1 list (the official `data/6k_coco_names.json`) names 6,275 entries, 176 of them repeats
    /// of 6,099 images: one pair per image makes 6,099, one per entry (`--keep-duplicates`, the official loop) 6,275.
    #[test]
    fn the_shipped_list_makes_6275_pairs_with_duplicates_kept_and_6099_without() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let names: Vec<String> = crate::fsutil::read_json(&root.join("third_party/stic/6k_coco_names.json")).unwrap();
        let entries: Vec<ListedImage> =
            names.into_iter().enumerate().map(|(index, name)| ListedImage { index, name }).collect();
        let dir = tempfile::tempdir().unwrap();
        let keys = |keep_duplicates| {
            let task = PrefsTask { keep_duplicates, ..task(dir.path(), false) };
            entries.iter().map(|e| task.key(e)).collect::<std::collections::HashSet<_>>().len()
        };
        assert_eq!((entries.len(), keys(true), keys(false)), (6275, 6275, 6099));
    }

    /// The rejected request sees the corrupted image when corruption is applied, the clean one when only
    /// flagged; everything else (prompts, which half) is the same.
    #[test]
    fn flag_only_keeps_the_clean_image_and_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let clean = ::image::RgbImage::from_fn(64, 48, |x, y| ::image::Rgb([(x * 4) as u8, (y * 5) as u8, 90]));
        clean.save(dir.path().join("a.png")).unwrap();
        let (applied, flagged) = (task(dir.path(), true), task(dir.path(), false));
        let mut corrupted_positions = 0;
        for position in 0..16 {
            let (plan_a, requests_a) = applied.plan(position, &entry(position, "a.png")).unwrap();
            let (plan_f, requests_f) = flagged.plan(position, &entry(position, "a.png")).unwrap();
            assert_eq!(requests_a[0].image.as_ref(), Some(&clean));
            assert_eq!(requests_f[0].image.as_ref(), Some(&clean));
            assert_eq!(requests_a[1].user_text, requests_f[1].user_text);
            assert_eq!(plan_a.corrupted.is_some(), plan_f.corrupted.is_some());
            assert_eq!(requests_f[1].image.as_ref(), Some(&clean));
            match plan_a.corrupted {
                Some(corruption) => {
                    corrupted_positions += 1;
                    assert!(corruption.is_some() && plan_f.corrupted == Some(None));
                    assert_ne!(requests_a[1].image.as_ref(), Some(&clean));
                    let record =
                        flagged.record(position, &entry(position, "a.png"), plan_f, vec!["c".into(), "r".into()]);
                    assert_eq!(
                        (record["image_corruption"].as_bool(), record["corruption"].is_null()),
                        (Some(true), true)
                    );
                }
                None => assert_eq!(requests_a[1].image.as_ref(), Some(&clean)),
            }
        }
        assert!((3..=13).contains(&corrupted_positions), "{corrupted_positions} of 16 corrupted");
    }
}
