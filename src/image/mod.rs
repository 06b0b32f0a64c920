//! Image loading and LLaVA-NeXT preprocessing.
//!
//! Reproduces HF transformers' (slow, PIL/numpy) `LlavaNextImageProcessor` bit for bit for
//! "anyres", LLaVA's `process_anyres_image` where it differs (the pinpoint reading), and the original
//! LLaVA `expand2square` + `CLIPImageProcessor` path for "pad".
//! Decoding follows `PIL.Image.open(..).convert("RGB")`.

pub mod anyres;
mod load;
mod pil;
mod preprocess;

pub use load::{load_image, load_image_bytes, ImageError};
pub use pil::resize_bicubic;
pub use preprocess::{preprocess, Preprocessed};

/// How an image is turned into vision-tower tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AspectMode {
    /// LLaVA-NeXT: a downscaled base tile followed by the tiles of the best grid resolution.
    Anyres,
    /// Original LLaVA: pad to a square with the mean colour, one tile.
    Pad,
}

/// Whose code the image and prompt processing follows, where LLaVA's and transformers' differ: the reading of
/// `image_grid_pinpoints`, the rounding of `unpad_image`, the pad-mode feature layout, and the tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        match s {
            "llava" => Ok(Processing::Llava),
            "transformers" => Ok(Processing::Transformers),
            other => Err(format!("unknown processing '{other}' (llava or transformers)")),
        }
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
