//! STIC stage 1 data: for each unlabeled image, a preferred description (the step-by-step prompt on the clean
//! image) and a dispreferred one (a hallucination prompt on the clean image, or a plain prompt on a corrupted
//! image, half and half). With `apply_corruption` off, the corrupted half is flagged (`image_corruption: true`)
//! but generated from the clean image, as the official `generate_pref.py` does (it never passes its flag on).
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

use super::corrupt::Corruption;
use super::job::{GenerationTask, Request};
use crate::image::Filter;

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
    type Item = String;
    type Plan = PrefsPlan;

    fn key(&self, item: &String) -> String {
        item.clone()
    }

    fn plan(&self, position: usize, name: &String) -> Result<(PrefsPlan, Vec<Request>), String> {
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
                let corruption = Corruption::ALL[rng.random_range(0..Corruption::ALL.len())];
                (Some(corruption), corruption.apply(&image, self.resize_filter, &mut rng))
            } else {
                (None, image)
            };
            let request = Request { user_text: description_prompt.clone(), image: Some(image) };
            (PrefsPlan { description_prompt, hallucination_prompt: None, corrupted: Some(corruption) }, request)
        };
        Ok((plan, vec![chosen, rejected]))
    }

    fn record(&self, _position: usize, name: &String, plan: PrefsPlan, outputs: Vec<String>) -> serde_json::Value {
        let turns = |response: &str| {
            serde_json::json!([
                {"role": "user", "content": plan.description_prompt},
                {"role": "assistant", "content": response},
            ])
        };
        serde_json::json!({
            "image": name,
            "image_corruption": plan.corrupted.is_some(),
            "hallu_prompt": plan.hallucination_prompt.clone().unwrap_or_default(),
            "chosen": turns(&outputs[0]),
            "rejected": turns(&outputs[1]),
            "corruption": plan.corrupted.flatten().map(|c| c.name()),
            "seed": self.seed,
            "model": self.model_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(dir: &Path, apply_corruption: bool) -> PrefsTask<'_> {
        PrefsTask {
            prompts: SticPrompts::shipped(),
            image_dir: dir,
            seed: 1,
            model_name: "m".into(),
            max_pixels: crate::image::DEFAULT_MAX_PIXELS,
            apply_corruption,
            resize_filter: Filter::Bilinear,
        }
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
            let (plan_a, requests_a) = applied.plan(position, &"a.png".to_string()).unwrap();
            let (plan_f, requests_f) = flagged.plan(position, &"a.png".to_string()).unwrap();
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
                    let record = flagged.record(position, &"a.png".to_string(), plan_f, vec!["c".into(), "r".into()]);
                    assert_eq!((record["image_corruption"].as_bool(), record["corruption"].is_null()), (Some(true), true));
                }
                None => assert_eq!(requests_a[1].image.as_ref(), Some(&clean)),
            }
        }
        assert!((3..=13).contains(&corrupted_positions), "{corrupted_positions} of 16 corrupted");
    }
}
