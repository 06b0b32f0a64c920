//! `preprocessor_config.json` (and transformers 5's `processor_config.json`): the image settings beside the model's.
use serde::Deserialize;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil::read_json;
use crate::image::AspectMode;

use super::{pairs, LlavaConfig};

/// The subset of `preprocessor_config.json` that changes preprocessing.
#[derive(Deserialize, Default, PartialEq)]
struct PreprocessorConfig {
    image_grid_pinpoints: Option<Vec<[u32; 2]>>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    crop_size: Option<serde_json::Value>,
    size: Option<serde_json::Value>,
    image_aspect_ratio: Option<String>,
    #[serde(flatten)]
    steps: ProcessorSteps,
}

fn edge_from(value: &serde_json::Value, keys: &[&str]) -> Option<u32> {
    if let Some(n) = value.as_u64() {
        return Some(n as u32);
    }
    keys.iter().find_map(|k| value.get(k).and_then(|v| v.as_u64())).map(|n| n as u32)
}

impl LlavaConfig {
    pub(super) fn apply_preprocessor_config(&mut self, dir: &Path) -> Result<()> {
        let config_path = dir.join("config.json");
        let Some((path, pre)) = read_image_processor(dir)? else {
            self.image.crop_size = self.vision.image_size as u32;
            self.image.shortest_edge = self.vision.image_size as u32;
            return self.check_image_settings(&config_path, &config_path);
        };
        pre.check(&path)?;
        let pinpoints_path = if pre.image_grid_pinpoints.is_some() { path.clone() } else { config_path.clone() };
        let model_pinpoints = self.image.grid_pinpoints.clone();
        if let Some(p) = pre.image_grid_pinpoints {
            self.image.grid_pinpoints = pairs(&p);
        }
        if let Some(m) = pre.image_mean {
            self.image.image_mean = m;
        }
        if let Some(s) = pre.image_std {
            self.image.image_std = s;
        }
        self.image.crop_size = pre
            .crop_size
            .as_ref()
            .and_then(|v| edge_from(v, &["height", "shortest_edge"]))
            .unwrap_or(self.vision.image_size as u32);
        self.image.shortest_edge =
            pre.size.as_ref().and_then(|v| edge_from(v, &["shortest_edge", "height"])).unwrap_or(self.image.crop_size);
        if pre.image_aspect_ratio.as_deref() == Some("pad") {
            self.image.aspect_mode = AspectMode::Pad;
        }
        self.check_image_settings(&pinpoints_path, &path)?;
        if self.image.grid_pinpoints != model_pinpoints {
            return Err(Error::Config(format!(
                "the image_grid_pinpoints of {} differ from those of {} (transformers tiles images with the first and \
                 unpads their features with the second): make them equal",
                path.display(),
                config_path.display()
            )));
        }
        Ok(())
    }
}

/// The switches of transformers' image processors that turn a step of the pipeline off or change it. stic runs the
/// steps as `LlavaNextImageProcessor` does by default, so each is accepted only absent or at that default.
#[derive(Deserialize, Default, PartialEq)]
struct ProcessorSteps {
    do_resize: Option<bool>,
    do_center_crop: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    do_convert_rgb: Option<bool>,
    resample: Option<serde_json::Value>,
    rescale_factor: Option<f64>,
}

/// PIL's `Image.BICUBIC`.
const BICUBIC: u64 = 3;

impl PreprocessorConfig {
    /// Refuses processor settings that stic does not compute (so that they are never silently ignored).
    fn check(&self, path: &Path) -> Result<()> {
        let refuse = |why: String| Err(Error::Config(format!("{}: {why}", path.display())));
        let steps = &self.steps;
        for (name, value) in [
            ("do_resize", steps.do_resize),
            ("do_center_crop", steps.do_center_crop),
            ("do_rescale", steps.do_rescale),
            ("do_normalize", steps.do_normalize),
            ("do_convert_rgb", steps.do_convert_rgb),
        ] {
            if value == Some(false) {
                return refuse(format!(
                    "{name} is false: stic always runs that step, as the LLaVA-NeXT processor does by default"
                ));
            }
        }
        if let Some(resample) = steps.resample.as_ref().filter(|r| r.as_u64() != Some(BICUBIC)) {
            return refuse(format!("resample is {resample}: stic resizes with bicubic resampling only (resample 3)"));
        }
        if let Some(factor) = steps.rescale_factor.filter(|f| (f - 1.0 / 255.0).abs() > 1e-12) {
            return refuse(format!("rescale_factor is {factor}: stic scales pixels by 1/255 only"));
        }
        for (name, value) in [("crop_size", &self.crop_size), ("size", &self.size)] {
            if let Some(value) = value {
                check_square_edge(value).or_else(|why| refuse(format!("{name} {value}: {why}")))?;
            }
        }
        Ok(())
    }
}

/// A tile edge as processors write it (`336`, `{"height": 336, "width": 336}` or `{"shortest_edge": 336}`): whole
/// numbers that fit in 32 bits, height equal to width (stic's tiles are square).
fn check_square_edge(value: &serde_json::Value) -> std::result::Result<(), String> {
    let whole = |v: &serde_json::Value| v.as_u64().is_some_and(|n| n <= u64::from(u32::MAX));
    let entries: Vec<&serde_json::Value> = match value.as_object() {
        Some(map) => ["height", "width", "shortest_edge"].iter().filter_map(|k| map.get(*k)).collect(),
        None => vec![value],
    };
    if entries.is_empty() || !entries.iter().all(|v| whole(v)) {
        return Err("the sizes must be whole numbers of pixels (height/width or shortest_edge)".into());
    }
    match (value.get("height"), value.get("width")) {
        (Some(h), Some(w)) if h != w => Err("height and width differ; stic supports square tiles only".into()),
        _ => Ok(()),
    }
}

/// The image processor settings: `preprocessor_config.json` (what transformers 4 reads) or the `image_processor`
/// entry of `processor_config.json` (what transformers 5 writes, and reads first). When both are there they must
/// agree, since the two transformers versions would otherwise preprocess differently.
fn read_image_processor(dir: &Path) -> Result<Option<(PathBuf, PreprocessorConfig)>> {
    let legacy_path = dir.join("preprocessor_config.json");
    let legacy: Option<PreprocessorConfig> = if legacy_path.is_file() { Some(read_json(&legacy_path)?) } else { None };
    let nested_path = dir.join("processor_config.json");
    let nested = if nested_path.is_file() {
        let processor: serde_json::Value = read_json(&nested_path)?;
        match processor.get("image_processor") {
            Some(settings) => Some(
                PreprocessorConfig::deserialize(settings)
                    .map_err(|e| Error::Config(format!("{}: image_processor: {e}", nested_path.display())))?,
            ),
            None => None,
        }
    } else {
        None
    };
    match (legacy, nested) {
        (Some(legacy), Some(nested)) if legacy != nested => Err(Error::Config(format!(
            "{} and the image_processor entry of {} give different image settings (transformers 4 reads the first, \
             transformers 5 the second): remove one of them or make them equal",
            legacy_path.display(),
            nested_path.display()
        ))),
        (Some(legacy), _) => Ok(Some((legacy_path, legacy))),
        (None, Some(nested)) => Ok(Some((nested_path, nested))),
        (None, None) => Ok(None),
    }
}
