//! Image loading and LLaVA-NeXT preprocessing.
//!
//! Reproduces HF transformers' (slow, PIL/numpy) `LlavaNextImageProcessor` bit for bit for
//! "anyres", and the original LLaVA `expand2square` + `CLIPImageProcessor` path for "pad".
//! Decoding follows `PIL.Image.open(..).convert("RGB")`.

pub mod anyres;
mod load;
mod pil;
mod preprocess;

pub use load::{load_image, load_image_bytes, ImageError};
pub use pil::{resize, resize_bicubic, Filter};
pub use preprocess::{preprocess, Preprocessed};

/// How an image is turned into vision-tower tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AspectMode {
    /// LLaVA-NeXT: a downscaled base tile followed by the tiles of the best grid resolution.
    Anyres,
    /// Original LLaVA: pad to a square with the mean colour, one tile.
    Pad,
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
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}
