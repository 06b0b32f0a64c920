//! STIC stage 2: the stage-1 model describes the image of each instruction-data entry.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

use super::infuse::{load_instruction_data, validate_image_ids, InstructionEntry};
use super::prefs::{SticJobOptions, SticPrompts};
use crate::error::Result;
use crate::generate::session::ModelSpec;
use crate::jobs::job::{GenerationTask, JobSummary, Request};

/// `stic describe`: descriptions of the images of an instruction data set.
pub struct DescribeOptions {
    pub model: ModelSpec,
    /// Instruction data in LLaVA format (`[{id, image, conversations}]`).
    pub data: PathBuf,
    /// Folder of the images the entries name.
    pub image_dir: PathBuf,
    /// JSONL of `{id, image, prompt, description}`; a rerun continues it.
    pub output: PathBuf,
    pub job: SticJobOptions,
}

/// Describes the image of every entry of `opts.data` that has one, into `opts.output`.
pub fn run_describe(opts: &DescribeOptions) -> Result<JobSummary> {
    opts.model.check_output("--output", &opts.output, &[("--data", &opts.data)])?;
    let entries = load_instruction_data(&opts.data)?;
    validate_image_ids(&opts.data, &entries)?;
    let prompts = SticPrompts::shipped();
    let with_images: Vec<_> = entries.into_iter().filter(|e| e.image.is_some()).collect();
    let job = opts.job.job(&opts.model, &opts.output, "id", "descriptions", &prompts, "describe")?;
    job.run(&with_images, |session| DescribeTask {
        description_prompts: prompts.description_prompts.clone(),
        image_dir: &opts.image_dir,
        seed: opts.job.seed,
        max_pixels: session.model.cfg.image.max_pixels,
    })
}

pub struct DescribeTask<'a> {
    pub description_prompts: Vec<String>,
    pub image_dir: &'a Path,
    pub seed: u64,
    pub max_pixels: u64,
}

impl GenerationTask for DescribeTask<'_> {
    type Item = InstructionEntry;
    type Plan = String;

    fn key(&self, item: &InstructionEntry) -> String {
        item.id_text()
    }

    fn plan(&self, position: usize, entry: &InstructionEntry) -> std::result::Result<(String, Vec<Request>), String> {
        let name = entry.image.as_deref().ok_or("the entry has no image")?;
        let image = crate::image::load_image(&self.image_dir.join(name), self.max_pixels).map_err(|e| e.to_string())?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9).wrapping_add(position as u64));
        let prompt = self.description_prompts[rng.random_range(0..self.description_prompts.len())].clone();
        Ok((prompt.clone(), vec![Request { user_text: prompt, image: Some(image) }]))
    }

    fn record(
        &self,
        _position: usize,
        entry: &InstructionEntry,
        prompt: String,
        outputs: Vec<String>,
    ) -> serde_json::Value {
        serde_json::json!({
            "id": entry.id,
            "image": entry.image,
            "prompt": prompt,
            "description": outputs[0],
        })
    }
}
