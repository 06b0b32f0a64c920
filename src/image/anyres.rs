//! LLaVA-NeXT "anyres" geometry, matching transformers' `select_best_resolution`,
//! `get_patch_output_size`, `get_anyres_image_grid_shape`, `unpad_image` and
//! `LlavaNextProcessor._get_number_of_features`, and LLaVA's versions of them where they differ
//! ([`Processing::Llava`]). Sizes are `(height, width)` throughout.
//! Float expressions are evaluated in the same order as the Python code so that every
//! comparison and truncation sees the same `f64`.

use super::{AspectMode, ImageConfig, PatchMerge, Processing};

/// The pinpoint that keeps the most image pixels after an aspect-preserving downscale,
/// ties broken by the least wasted area; the first such pinpoint wins.
pub fn select_best_resolution(original: (u32, u32), pinpoints: &[(u32, u32)]) -> (u32, u32) {
    assert!(!pinpoints.is_empty(), "select_best_resolution: no grid pinpoints configured");
    let (original_height, original_width) = (f64::from(original.0), f64::from(original.1));
    let original_area = i64::from(original.0) * i64::from(original.1);
    let mut best = pinpoints[0];
    let mut max_effective = 0i64;
    let mut min_wasted = i64::MAX;
    for &(height, width) in pinpoints {
        let scale = (f64::from(width) / original_width).min(f64::from(height) / original_height);
        let downscaled_width = (original_width * scale) as i64;
        let downscaled_height = (original_height * scale) as i64;
        let effective = (downscaled_width * downscaled_height).min(original_area);
        let wasted = i64::from(width) * i64::from(height) - effective;
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = (height, width);
        }
    }
    best
}

/// Size the image is resized to before being centred in `target` (`get_patch_output_size`).
pub fn patch_output_size(original: (u32, u32), target: (u32, u32)) -> (u32, u32) {
    let (original_height, original_width) = (f64::from(original.0), f64::from(original.1));
    let (target_height, target_width) = target;
    let scale_w = f64::from(target_width) / original_width;
    let scale_h = f64::from(target_height) / original_height;
    if scale_w < scale_h {
        let height = ((original_height * scale_w).ceil() as u32).min(target_height);
        (height, target_width)
    } else {
        let width = ((original_width * scale_h).ceil() as u32).min(target_width);
        (target_height, width)
    }
}

/// The pinpoints as `(height, width)` pairs in the reading of `cfg.processing`: transformers reads each
/// `image_grid_pinpoints` entry as (height, width), LLaVA as (width, height). The lists are symmetric, so the
/// two differ where pinpoints tie, which is the case for every image with both sides at most one tile.
fn pinpoints(cfg: &ImageConfig) -> Vec<(u32, u32)> {
    match cfg.processing {
        Processing::Transformers => cfg.grid_pinpoints.clone(),
        Processing::Llava => cfg.grid_pinpoints.iter().map(|&(a, b)| (b, a)).collect(),
    }
}

/// The grid resolution `(height, width)` an image of size `original` is fitted into.
pub fn best_resolution(original: (u32, u32), cfg: &ImageConfig) -> (u32, u32) {
    select_best_resolution(original, &pinpoints(cfg))
}

/// `(rows, cols)` of tiles covering the best resolution.
pub fn grid_shape(original: (u32, u32), cfg: &ImageConfig) -> (usize, usize) {
    let (height, width) = best_resolution(original, cfg);
    ((height / cfg.crop_size) as usize, (width / cfg.crop_size) as usize)
}

/// Python's `int(round(x, 7))` for a finite `0 <= x < 1e8`.
///
/// CPython rounds the exact binary value half-to-even at the 7th decimal; below 1e8 the
/// rounded decimal is either an integer or at least 1e-7 away from one, so `int()` of the
/// nearest double is the integer part of the decimal.
fn python_int_round7(x: f64) -> usize {
    debug_assert!(x.is_finite() && (0.0..1e8).contains(&x), "python_int_round7({x})");
    const SCALE: u128 = 10_000_000;
    let bits = x.to_bits();
    let biased_exponent = ((bits >> 52) & 0x7ff) as i32;
    let fraction = u128::from(bits & ((1u64 << 52) - 1));
    let (mantissa, exponent) =
        if biased_exponent == 0 { (fraction, -1074) } else { (fraction | 1 << 52, biased_exponent - 1075) };
    if exponent >= 0 {
        return x as usize;
    }
    // x * 10^7 = mantissa * 10^7 / 2^shift, with mantissa * 10^7 < 2^77.
    let shift = exponent.unsigned_abs();
    if shift >= 127 {
        return 0;
    }
    let numerator = mantissa * SCALE;
    let quotient = numerator >> shift;
    let remainder = numerator - (quotient << shift);
    let half = 1u128 << (shift - 1);
    let rounded = if remainder > half || (remainder == half && quotient & 1 == 1) { quotient + 1 } else { quotient };
    (rounded / SCALE) as usize
}

/// `(row_start, row_end, col_start, col_end)` of the part of the merged patch-feature grid of
/// size `current` (height, width) that `unpad_image` keeps for an image of size `original`:
/// the kept side is rounded with `int(round(x, 7))` by transformers, truncated with `int(x)` by LLaVA.
pub fn unpadded_size(
    current: (usize, usize),
    original: (u32, u32),
    processing: Processing,
) -> (usize, usize, usize, usize) {
    let to_int = |x: f64| match processing {
        Processing::Transformers => python_int_round7(x),
        Processing::Llava => x as usize,
    };
    let (current_height, current_width) = current;
    let (original_height, original_width) = (f64::from(original.0), f64::from(original.1));
    let original_aspect_ratio = original_width / original_height;
    let current_aspect_ratio = current_width as f64 / current_height as f64;
    if original_aspect_ratio > current_aspect_ratio {
        let scale_factor = current_width as f64 / original_width;
        let new_height = to_int(original_height * scale_factor);
        let padding = (current_height - new_height) / 2;
        (padding, current_height - padding, 0, current_width)
    } else {
        let scale_factor = current_height as f64 / original_height;
        let new_width = to_int(original_width * scale_factor);
        let padding = (current_width - new_width) / 2;
        (0, current_height, padding, current_width - padding)
    }
}

/// Number of image embeddings the model produces for an image of size `original`, which is
/// also the number of image positions the prompt gets (CLS dropped, i.e.
/// `vision_feature_select_strategy="default"`).
pub fn num_image_features(original: (u32, u32), cfg: &ImageConfig, patch_size: u32) -> usize {
    let patches_per_side = (cfg.crop_size / patch_size) as usize;
    let base_features = patches_per_side * patches_per_side;
    match (cfg.aspect_mode, cfg.patch_merge, cfg.processing) {
        // LLaVA's code hands pad-mode images to the tower as one batch and never merges them.
        (AspectMode::Pad, _, Processing::Llava) | (AspectMode::Pad, PatchMerge::Flat, _) => base_features,
        // LLaVA-1.5 has no `image_newline`.
        (AspectMode::CenterCrop, _, _) => base_features,
        // A single tile is followed by one `image_newline` (the spatial_unpad merge).
        (AspectMode::Pad, PatchMerge::SpatialUnpad, Processing::Transformers) => base_features + 1,
        (AspectMode::Anyres, PatchMerge::Flat, _) => {
            let (rows, cols) = grid_shape(original, cfg);
            (1 + rows * cols) * base_features
        }
        (AspectMode::Anyres, PatchMerge::SpatialUnpad, _) => {
            let (rows, cols) = grid_shape(original, cfg);
            let merged = (rows * patches_per_side, cols * patches_per_side);
            let (row_start, row_end, col_start, col_end) = unpadded_size(merged, original, cfg.processing);
            let (height, width) = (row_end - row_start, col_end - col_start);
            // One `image_newline` after each unpadded row.
            base_features + height * width + height
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINPOINTS: [(u32, u32); 5] = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

    #[test]
    fn best_resolution_follows_aspect_ratio() {
        assert_eq!(select_best_resolution((500, 500), &PINPOINTS), (672, 672));
        assert_eq!(select_best_resolution((300, 900), &PINPOINTS), (336, 1008));
        assert_eq!(select_best_resolution((900, 300), &PINPOINTS), (1008, 336));
        assert_eq!(select_best_resolution((400, 800), &PINPOINTS), (336, 672));
        assert_eq!(select_best_resolution((20, 20), &PINPOINTS), (336, 672));
        assert_eq!(grid_shape((900, 300), &ImageConfig::default()), (3, 1));
    }

    #[test]
    fn patch_output_size_keeps_aspect() {
        assert_eq!(patch_output_size((400, 800), (336, 672)), (336, 672));
        assert_eq!(patch_output_size((300, 451), (672, 672)), (448, 672));
        assert_eq!(patch_output_size((1000, 7), (1008, 336)), (1008, 8));
    }

    #[test]
    fn python_round_matches_cpython() {
        // Values checked with `int(round(x, 7))` in CPython 3.11.
        assert_eq!(python_int_round7(2.99999996), 3);
        assert_eq!(python_int_round7(2.9999999), 2);
        assert_eq!(python_int_round7(47.0), 47);
        assert_eq!(python_int_round7(0.0), 0);
        assert_eq!(python_int_round7(33.99999999999999), 34);
        assert_eq!(python_int_round7(1.0 / 3.0), 0);
        assert_eq!(python_int_round7(12345.678), 12345);
    }

    /// Token counts from transformers 4.57.6 `LlavaNextProcessor` (llava-v1.6-mistral
    /// settings): number of `<image>` tokens inserted for one image of the given (h, w).
    #[test]
    fn feature_counts_match_transformers() {
        let cfg = ImageConfig::default();
        for (size, expected) in [
            ((512, 512), 2928),
            ((300, 451), 1464),
            ((1, 300), 576),
            ((1000, 7), 648),
            ((336, 336), 1176),
            ((672, 336), 1776),
        ] {
            assert_eq!(num_image_features(size, &cfg, 14), expected, "{size:?}");
        }
        let pad = ImageConfig { aspect_mode: AspectMode::Pad, ..ImageConfig::default() };
        assert_eq!(num_image_features((300, 451), &pad, 14), 577);
    }

    #[test]
    fn unpad_removes_symmetric_padding() {
        // A 300x451 image in a 48x48 feature grid is width-limited: 32 of 48 rows are kept.
        let t = Processing::Transformers;
        assert_eq!(unpadded_size((48, 48), (300, 451), t), (8, 40, 0, 48));
        // In its best 1x2 grid (24x48) it is height-limited: 36 of 48 columns are kept.
        assert_eq!(unpadded_size((24, 48), (300, 451), t), (0, 24, 6, 42));
        assert_eq!(unpadded_size((48, 48), (512, 512), t), (0, 48, 0, 48));
    }

    /// Counts from LLaVA's own code (llava-torch 1.2.2.post1, llava-v1.6-mistral settings) and transformers
    /// 4.57.6 where they differ: the pinpoint tie for small images (320x240, w x h: 1,026 vs 1,368) and `int()`
    /// in `unpad_image` with the same grid (704x396: 1,850 vs 1,948; 396x704: 1,872 vs 1,968).
    #[test]
    fn feature_counts_match_llava() {
        let llava = ImageConfig { processing: Processing::Llava, ..ImageConfig::default() };
        let hf = ImageConfig::default();
        for ((h, w), ours, theirs) in
            [((240, 320), 1026, 1368), ((396, 704), 1850, 1948), ((704, 396), 1872, 1968), ((480, 640), 2340, 2340)]
        {
            assert_eq!(num_image_features((h, w), &llava, 14), ours, "{w}x{h}");
            assert_eq!(num_image_features((h, w), &hf, 14), theirs, "{w}x{h}");
        }
        let pad = ImageConfig { aspect_mode: AspectMode::Pad, ..llava.clone() };
        assert_eq!(num_image_features((300, 451), &pad, 14), 576);
        let flat = ImageConfig { patch_merge: PatchMerge::Flat, ..llava };
        assert_eq!(num_image_features((300, 451), &flat, 14), 3 * 576);
    }
}
