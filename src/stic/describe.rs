//! STIC stage 2: the stage-1 model describes the image of each instruction-data entry.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

use super::infuse::InstructionEntry;
use super::job::{GenerationTask, Request};

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

    fn plan(&self, position: usize, entry: &InstructionEntry) -> Result<(String, Vec<Request>), String> {
        let name = entry.image.as_deref().ok_or("the entry has no image")?;
        let image = crate::image::load_image(&self.image_dir.join(name), self.max_pixels).map_err(|e| e.to_string())?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9).wrapping_add(position as u64));
        let prompt = self.description_prompts[rng.random_range(0..self.description_prompts.len())].clone();
        Ok((prompt.clone(), vec![Request { user_text: prompt, image: Some(image) }]))
    }

    fn record(&self, _position: usize, entry: &InstructionEntry, prompt: String, outputs: Vec<String>) -> serde_json::Value {
        serde_json::json!({
            "id": entry.id,
            "image": entry.image,
            "prompt": prompt,
            "description": outputs[0],
        })
    }
}
