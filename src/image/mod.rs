//! Image loading and LLaVA-NeXT preprocessing.
//!
//! Reproduces HF transformers' (slow, PIL/numpy) `LlavaNextImageProcessor` bit for bit for
//! "anyres", LLaVA's `process_anyres_image` where it differs (the pinpoint reading), and the original
//! LLaVA `expand2square` + `CLIPImageProcessor` path for "pad", and `CLIPImageProcessor` alone (LLaVA-1.5 in
//! transformers) for the centre crop.
//! Decoding follows `PIL.Image.open(..).convert("RGB")`.

pub mod anyres;
mod error;
mod jpeg;
mod load;
mod pil;
mod preprocess;

pub use error::ImageError;
pub use load::{load_image, load_image_bytes};
pub use pil::{resize, resize_bicubic, Filter};
pub use preprocess::{preprocess, Preprocessed};

/// How an image is turned into vision-tower tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AspectMode {
    /// LLaVA-NeXT: a downscaled base tile followed by the tiles of the best grid resolution.
    Anyres,
    /// Original LLaVA: pad to a square with the mean colour, one tile.
    Pad,
    /// LLaVA-1.5 in transformers (`CLIPImageProcessor`): the shortest edge resized to `shortest_edge`, then the
    /// centre `crop_size` square cut out, one tile.
    CenterCrop,
}

/// Whose code the image and prompt processing follows, where LLaVA's and transformers' differ: the reading of
/// `image_grid_pinpoints`, the rounding of `unpad_image`, the pad-mode feature layout, and the tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Processing {
    /// haotian-liu/LLaVA (what made the paper's numbers): pinpoints read as (width, height), `int()` in
    /// `unpad_image`, the slow tokenizer with `tokenizer_image_token`.
    Llava,
    /// transformers' `LlavaNextProcessor` and `LlavaNextForConditionalGeneration`.
    Transformers,
}

impl std::str::FromStr for Processing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        <Processing as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| format!("unknown processing '{s}' (llava or transformers)"))
    }
}

/// How the tile features of an image are laid out for the decoder (LLaVA's `mm_patch_merge_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchMerge {
    /// anyres: the base tile, then the grid unpadded with one `image_newline` per row.
    SpatialUnpad,
    /// Every tile's features one after the other, no `image_newline` (pad mode: the 576 features of one tile).
    Flat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    /// Tile side, equal to the CLIP `image_size`.
    pub crop_size: u32,
    pub shortest_edge: u32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// `(height, width)` pairs, in the order transformers reads `image_grid_pinpoints`.
    pub grid_pinpoints: Vec<(u32, u32)>,
    pub aspect_mode: AspectMode,
    pub processing: Processing,
    pub patch_merge: PatchMerge,
    /// Images with more pixels than this are rejected before decoding.
    pub max_pixels: u64,
}

/// PIL's `Image.MAX_IMAGE_PIXELS`.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

impl Default for ImageConfig {
    /// llava-hf/llava-v1.6-mistral-7b-hf `preprocessor_config.json`.
    #[allow(clippy::excessive_precision)] // the config's digits; they round to the same f32
    fn default() -> Self {
        Self {
            crop_size: 336,
            shortest_edge: 336,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
            grid_pinpoints: vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)],
            aspect_mode: AspectMode::Anyres,
            processing: Processing::Transformers,
            patch_merge: PatchMerge::SpatialUnpad,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// The most grid tiles one pinpoint may ask for (LLaVA-NeXT uses up to 4, LLaVA-OneVision 36): it bounds the memory
/// a config can make one image take, checked before anything is allocated.
pub const MAX_GRID_TILES: u64 = 64;
/// The largest `shortest_edge` as a multiple of the tile side (the same bound, for the resize before cropping).
pub const MAX_EDGE_PER_TILE: u32 = 4;

/// An image setting that cannot work, found when the config is read.
#[derive(thiserror::Error, Debug, PartialEq)]
pub enum ImageConfigError {
    /// `image_grid_pinpoints` (read from the model config or from the image processor's).
    #[error("image_grid_pinpoints {0}")]
    Pinpoints(String),
    /// Any other setting of the image processor.
    #[error("{0}")]
    Processor(String),
}

impl ImageConfig {
    /// Checks every value that sizes an allocation or divides a pixel.
    pub fn validate(&self) -> Result<(), ImageConfigError> {
        use ImageConfigError::{Pinpoints, Processor};
        let tile = self.crop_size;
        if tile == 0 {
            return Err(Processor(
                "crop_size is 0: the tiles must be the vision tower's image_size (336 for LLaVA-v1.6)".into(),
            ));
        }
        if self.shortest_edge == 0 || self.shortest_edge > MAX_EDGE_PER_TILE * tile {
            return Err(Processor(format!(
                "size.shortest_edge is {}: it must be between 1 and {} ({MAX_EDGE_PER_TILE} × crop_size {tile}); LLaVA-v1.6 uses crop_size",
                self.shortest_edge,
                MAX_EDGE_PER_TILE * tile
            )));
        }
        if let Some(c) = (0..3).find(|&c| !self.image_mean[c].is_finite()) {
            return Err(Processor(format!(
                "image_mean has {} for channel {c}: it must be a finite number",
                self.image_mean[c]
            )));
        }
        if let Some(c) = (0..3).find(|&c| !(self.image_std[c].is_finite() && self.image_std[c] > 0.0)) {
            return Err(Processor(format!(
                "image_std has {} for channel {c}: pixels are divided by it, so it must be a positive number \
                 (CLIP's is [0.26862954, 0.26130258, 0.27577711])",
                self.image_std[c]
            )));
        }
        if self.aspect_mode != AspectMode::Anyres {
            return Ok(());
        }
        if self.grid_pinpoints.is_empty() {
            return Err(Pinpoints(
                "is empty: anyres needs at least one [height, width], e.g. [[336, 672], [672, 336], [672, 672]]".into(),
            ));
        }
        for &(height, width) in &self.grid_pinpoints {
            if height == 0 || width == 0 || height % tile != 0 || width % tile != 0 {
                return Err(Pinpoints(format!(
                    "has [{height}, {width}]: each side must be a positive multiple of the tile side {tile}"
                )));
            }
            let tiles = u64::from(height / tile) * u64::from(width / tile);
            if tiles > MAX_GRID_TILES {
                return Err(Pinpoints(format!(
                    "has [{height}, {width}], a grid of {tiles} tiles of {tile} px: at most {MAX_GRID_TILES} are supported"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_settings_are_valid_and_nonsense_is_named() {
        assert_eq!(ImageConfig::default().validate(), Ok(()));
        let bad = |change: fn(&mut ImageConfig)| {
            let mut cfg = ImageConfig::default();
            change(&mut cfg);
            cfg.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.crop_size = 0).contains("crop_size is 0"));
        assert!(bad(|c| c.shortest_edge = 0).contains("shortest_edge is 0"));
        assert!(bad(|c| c.image_std = [0.0; 3]).contains("image_std"));
        assert!(bad(|c| c.image_mean[1] = f32::NAN).contains("image_mean"));
        assert!(bad(|c| c.grid_pinpoints.clear()).contains("image_grid_pinpoints is empty"));
        assert!(bad(|c| c.grid_pinpoints = vec![(0, 0)]).contains("[0, 0]"));
        assert!(bad(|c| c.grid_pinpoints = vec![(500, 672)]).contains("multiple of the tile side 336"));
        assert!(bad(|c| c.grid_pinpoints = vec![(67200, 67200)]).contains("40000 tiles"));
        let pad = ImageConfig { aspect_mode: AspectMode::Pad, grid_pinpoints: Vec::new(), ..ImageConfig::default() };
        assert_eq!(pad.validate(), Ok(()));
        let crop = ImageConfig { aspect_mode: AspectMode::CenterCrop, ..pad };
        assert_eq!(crop.validate(), Ok(()));
    }
}
