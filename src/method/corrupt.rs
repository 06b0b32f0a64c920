//! The image corruptions of STIC stage 1. The dispreferred description of an image is either a
//! hallucination prompt on the clean image or a plain prompt on a corrupted one; the official
//! `generate_pref.py` corrupts with torchvision `Resize(20)` or `ColorJitter(brightness=.5, hue=.3)`, 50/50,
//! on PIL images. On a PIL image torchvision's `Resize` is Pillow's `resize` with `BILINEAR` (antialiased), and
//! the colour jitter is PIL's 8-bit arithmetic: with [`Filter::Bilinear`] and for given jitter factors the output
//! is torchvision's, byte for byte.
use std::path::Path;
use std::str::FromStr;

use ::image::{Rgb, RgbImage};
use clap::ValueEnum;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::MethodError;
use crate::image::Filter;

/// Shorter side after [`Corruption::Resize20`].
pub const DOWNSCALE_SHORTER_SIDE: u32 = 20;
/// `ColorJitter(brightness=JITTER_BRIGHTNESS, hue=JITTER_HUE)` of [`Corruption::ColorJitter`].
pub const JITTER_BRIGHTNESS: f32 = 0.5;
pub const JITTER_HUE: f32 = 0.3;

/// A corruption, named on the command line and in JSON as `resize20` and `color_jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Corruption {
    /// torchvision `Resize(20)`: the shorter side becomes 20 px.
    Resize20,
    /// torchvision `ColorJitter(brightness=0.5, hue=0.3)`.
    ColorJitter,
}

impl Corruption {
    /// Applies the corruption; the downscale resamples with `resize_filter`, `rng` drives the random parameters
    /// of the colour jitter.
    pub fn apply<R: Rng + ?Sized>(self, img: &RgbImage, resize_filter: Filter, rng: &mut R) -> RgbImage {
        match self {
            Corruption::Resize20 => downscale_short_side(img, DOWNSCALE_SHORTER_SIDE, resize_filter),
            Corruption::ColorJitter => color_jitter(img, JITTER_BRIGHTNESS, JITTER_HUE, rng),
        }
    }
}

impl FromStr for Corruption {
    type Err = MethodError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        <Corruption as ValueEnum>::from_str(name, false).map_err(|_| MethodError::UnknownCorruption {
            name: name.to_owned(),
            expected: Corruption::value_variants().iter().map(Corruption::to_string).collect::<Vec<_>>().join(", "),
        })
    }
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.to_possible_value().expect("no variant is skipped").get_name())
    }
}

/// Resizes so that the shorter side is `shorter_side` px, keeping the aspect ratio as torchvision
/// `Resize(shorter_side)` does: the longer side becomes `int(shorter_side * long / short)`. Like torchvision,
/// this enlarges an image whose shorter side is below `shorter_side`. [`Filter::Bilinear`] is torchvision's
/// default (and so the official code's).
pub fn downscale_short_side(img: &RgbImage, shorter_side: u32, filter: Filter) -> RgbImage {
    let (width, height) = short_side_resize_dimensions(img.dimensions(), shorter_side);
    // torchvision returns the image untouched when the size does not change.
    if (width, height) == img.dimensions() {
        return img.clone();
    }
    crate::image::resize(img, width, height, filter)
}

fn short_side_resize_dimensions((width, height): (u32, u32), shorter_side: u32) -> (u32, u32) {
    // Integer division truncates exactly as Python's int() of the float quotient does.
    let scaled_long_side = |long: u32, short: u32| {
        let long = u64::from(shorter_side) * u64::from(long) / u64::from(short);
        u32::try_from(long).unwrap_or(u32::MAX)
    };
    if width <= height {
        (shorter_side, scaled_long_side(height, width))
    } else {
        (scaled_long_side(width, height), shorter_side)
    }
}

/// torchvision `ColorJitter(brightness, hue)` on a PIL image: one random draw of [`JitterParams`], applied.
///
/// Panics unless `brightness >= 0` and `0 <= hue <= 0.5` (torchvision's own limits).
pub fn color_jitter<R: Rng + ?Sized>(img: &RgbImage, brightness: f32, hue: f32, rng: &mut R) -> RgbImage {
    JitterParams::sample(brightness, hue, rng).apply(img)
}

/// The random parameters of one `ColorJitter(brightness, hue)` call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JitterParams {
    /// Uniform in `[max(0, 1 - brightness), 1 + brightness]`.
    pub brightness_factor: f32,
    /// Uniform in `[-hue, hue]`, in turns of the colour wheel.
    pub hue_factor: f32,
    /// torchvision applies its operations in the order of `torch.randperm(4)`; with only brightness and hue
    /// enabled, hue comes first half of the time.
    pub hue_first: bool,
}

impl JitterParams {
    pub fn sample<R: Rng + ?Sized>(brightness: f32, hue: f32, rng: &mut R) -> Self {
        assert!(brightness >= 0.0, "ColorJitter brightness must be >= 0, got {brightness}");
        assert!((0.0..=0.5).contains(&hue), "ColorJitter hue must be in [0, 0.5], got {hue}");
        JitterParams {
            brightness_factor: rng.random_range((1.0 - brightness).max(0.0)..=1.0 + brightness),
            hue_factor: rng.random_range(-hue..=hue),
            hue_first: rng.random_bool(0.5),
        }
    }

    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        let mut out = img.clone();
        if self.hue_first {
            shift_hue(&mut out, self.hue_factor);
            scale_brightness(&mut out, self.brightness_factor);
        } else {
            scale_brightness(&mut out, self.brightness_factor);
            shift_hue(&mut out, self.hue_factor);
        }
        out
    }
}

/// `F.adjust_brightness` on PIL: `Image.blend(black, img, factor)`, which computes `factor * value` in single
/// precision and truncates it, clipped to 255.
fn scale_brightness(img: &mut RgbImage, factor: f32) {
    for value in img.iter_mut() {
        *value = (factor * f32::from(*value)) as u8;
    }
}

/// `F.adjust_hue` on PIL: to 8-bit HSV, `H += uint8(int32(hue_factor * 255))` with wrap-around, back to RGB.
/// The HSV round trip is lossy, so it runs even when the shift is 0, as in torchvision.
fn shift_hue(img: &mut RgbImage, hue_factor: f32) {
    let shift = (f64::from(hue_factor) * 255.0) as i32 as u8;
    for pixel in img.pixels_mut() {
        let [hue, saturation, value] = pil_rgb_to_hsv(pixel.0);
        *pixel = Rgb(pil_hsv_to_rgb([hue.wrapping_add(shift), saturation, value]));
    }
}

// The two conversions follow Pillow's `Convert.c` (`rgb2hsv_row`, `hsv2rgb`) operation by operation, with its
// mix of single- and double-precision steps, so that every 8-bit result is the same as PIL's.

fn pil_rgb_to_hsv([r, g, b]: [u8; 3]) -> [u8; 3] {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    if max == min {
        return [0, 0, max];
    }
    let range = f32::from(max - min);
    let saturation = range / f32::from(max);
    let red_distance = f32::from(max - r) / range;
    let green_distance = f32::from(max - g) / range;
    let blue_distance = f32::from(max - b) / range;
    let hue_sixths = if r == max {
        blue_distance - green_distance
    } else if g == max {
        (2.0 + f64::from(red_distance) - f64::from(blue_distance)) as f32
    } else {
        (4.0 + f64::from(green_distance) - f64::from(red_distance)) as f32
    };
    let hue = ((f64::from(hue_sixths) / 6.0 + 1.0) % 1.0) as f32;
    [(f64::from(hue) * 255.0) as u8, (f64::from(saturation) * 255.0) as u8, max]
}

fn pil_hsv_to_rgb([h, s, v]: [u8; 3]) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let sector_position = f64::from(h) * 6.0 / 255.0;
    let sector = sector_position.floor();
    let fraction = (sector_position - sector) as f32;
    let saturation = (f64::from(s) / 255.0) as f32;
    let value = f64::from(v);
    let p = (value * (1.0 - f64::from(saturation))).round() as u8;
    let q = (value * (1.0 - f64::from(saturation * fraction))).round() as u8;
    let t = (value * (1.0 - f64::from(saturation) * (1.0 - f64::from(fraction)))).round() as u8;
    // h = 255 gives sector 6, which wraps to 0.
    match sector as u8 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// Loads `input`, applies `kind` (downscaling as torchvision does, bilinear) with a [`ChaCha8Rng`] seeded by
/// `seed` and writes the result as a PNG to `output` (whatever its extension), atomically. `max_pixels` bounds
/// the decoded input.
pub fn run_corrupt(input: &Path, output: &Path, kind: Corruption, seed: u64, max_pixels: u64) -> crate::Result<()> {
    let image = crate::image::load_image(input, max_pixels)?;
    let corrupted = kind.apply(&image, Filter::Bilinear, &mut ChaCha8Rng::seed_from_u64(seed));
    let mut png = Vec::new();
    corrupted
        .write_to(&mut std::io::Cursor::new(&mut png), ::image::ImageFormat::Png)
        .map_err(|source| MethodError::EncodePng { path: output.to_owned(), source })?;
    crate::fsutil::write_atomic(output, &png)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A colourful image: hue varies along x, saturation and value along y (value at most 160, so a
    /// brightness factor up to 1.5 never clips).
    fn colour_wheel(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            let hue = (x * 255 / width) as u8;
            let saturation = 96 + (y * 159 / height) as u8;
            let value = 100 + ((x + y) % 61) as u8;
            Rgb(pil_hsv_to_rgb([hue, saturation, value]))
        })
    }

    fn mean_value(img: &RgbImage) -> f64 {
        img.pixels().map(|p| f64::from(*p.0.iter().max().unwrap())).sum::<f64>() / f64::from(img.width() * img.height())
    }

    /// Median over the pixels of the PIL hue change, as a signed 8-bit step.
    fn median_hue_shift(before: &RgbImage, after: &RgbImage) -> i32 {
        let mut shifts: Vec<i32> = before
            .pixels()
            .zip(after.pixels())
            .map(|(b, a)| i32::from(pil_rgb_to_hsv(a.0)[0].wrapping_sub(pil_rgb_to_hsv(b.0)[0]) as i8))
            .collect();
        shifts.sort_unstable();
        shifts[shifts.len() / 2]
    }

    #[test]
    fn resize_sets_the_shorter_side_to_20_like_torchvision() {
        // Expected sizes are torchvision's: int(20 * long / short).
        let cases = [
            ((640, 480), (26, 20)),
            ((480, 640), (20, 26)),
            ((300, 300), (20, 20)),
            ((451, 300), (30, 20)),
            ((1000, 21), (952, 20)),
            ((21, 1000), (20, 952)),
            ((10, 15), (20, 30)),
        ];
        for ((width, height), expected) in cases {
            let resized = downscale_short_side(&colour_wheel(width, height), 20, Filter::Bilinear);
            assert_eq!(resized.dimensions(), expected, "{width}x{height}");
            let elongation = |(w, h): (u32, u32)| f64::from(w.max(h)) / f64::from(w.min(h));
            // Truncating the longer side loses less than one of its pixels.
            let ratio_error = elongation(expected) - elongation((width, height));
            assert!(ratio_error <= 0.0 && ratio_error > -1.0 / 20.0, "{width}x{height}: {ratio_error}");
        }
    }

    #[test]
    fn resize_to_the_same_size_returns_the_image_untouched() {
        let img = colour_wheel(35, 20);
        assert_eq!(downscale_short_side(&img, 20, Filter::Bicubic), img);
    }

    #[test]
    fn jitter_parameters_cover_the_torchvision_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let draws: Vec<JitterParams> = (0..2000).map(|_| JitterParams::sample(0.5, 0.3, &mut rng)).collect();
        let brightness: Vec<f32> = draws.iter().map(|d| d.brightness_factor).collect();
        let hue: Vec<f32> = draws.iter().map(|d| d.hue_factor).collect();
        let min = |v: &[f32]| v.iter().copied().fold(f32::INFINITY, f32::min);
        let max = |v: &[f32]| v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!(min(&brightness) >= 0.5 && min(&brightness) < 0.51);
        assert!(max(&brightness) <= 1.5 && max(&brightness) > 1.49);
        assert!(min(&hue) >= -0.3 && min(&hue) < -0.29);
        assert!(max(&hue) <= 0.3 && max(&hue) > 0.29);
        let hue_first = draws.iter().filter(|d| d.hue_first).count();
        assert!((900..1100).contains(&hue_first), "{hue_first} of 2000 draws put hue first");
    }

    #[test]
    fn jitter_scales_brightness_and_shifts_hue_by_the_drawn_factors() {
        let img = colour_wheel(64, 48);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..40 {
            let params = JitterParams::sample(0.5, 0.3, &mut rng);
            let jittered = params.apply(&img);
            // The value channel goes through the hue round trip unchanged and is truncated by the scaling.
            let ratio = mean_value(&jittered) / mean_value(&img);
            let factor = f64::from(params.brightness_factor);
            assert!(ratio <= factor && ratio > factor - 0.011, "ratio {ratio} for factor {factor}");
            let expected_shift = (f64::from(params.hue_factor) * 255.0) as i32;
            let shift = median_hue_shift(&img, &jittered);
            assert!((shift - expected_shift).abs() <= 1, "hue shift {shift}, expected {expected_shift}");
            assert!((-76..=76).contains(&shift));
        }
    }

    #[test]
    fn jitter_matches_torchvision_for_given_parameters() {
        // torchvision 0.26 F.adjust_brightness / F.adjust_hue on PIL (Pillow 13) images, in both orders.
        let img = RgbImage::from_raw(
            4,
            2,
            vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 250, 30, 60, 90, 200, 120, 10, 7, 7, 8, 128, 64, 192],
        )
        .unwrap();
        let brightness_then_hue = JitterParams { brightness_factor: 1.3, hue_factor: -0.21, hue_first: false };
        assert_eq!(
            brightness_then_hue.apply(&img).into_raw(),
            [198, 0, 255, 255, 192, 0, 0, 255, 192, 255, 255, 255, 39, 116, 57, 255, 13, 167, 9, 10, 10, 83, 208, 249]
        );
        let hue_then_brightness = JitterParams { brightness_factor: 0.7, hue_factor: 0.27, hue_first: true };
        assert_eq!(
            hue_then_brightness.apply(&img).into_raw(),
            [71, 178, 0, 0, 71, 178, 178, 0, 71, 175, 175, 175, 63, 21, 59, 7, 140, 28, 5, 4, 4, 134, 51, 44]
        );
    }

    #[test]
    fn brightness_matches_pil_blend_truncation_and_clipping() {
        // Image.blend(black, img, factor) from Pillow 13 for values 0, 1, 77, 128, 200, 255.
        let values = RgbImage::from_raw(2, 1, vec![0, 1, 77, 128, 200, 255]).unwrap();
        for (factor, expected) in [
            (0.5f32, [0, 0, 38, 64, 100, 127]),
            (0.7f32, [0, 0, 53, 89, 140, 178]),
            (1.3f32, [0, 1, 100, 166, 255, 255]),
        ] {
            let mut scaled = values.clone();
            scale_brightness(&mut scaled, factor);
            assert_eq!(scaled.as_raw().as_slice(), expected, "factor {factor}");
        }
    }

    #[test]
    fn corruption_names_round_trip_through_strings_and_json() {
        assert_eq!(Corruption::value_variants(), [Corruption::Resize20, Corruption::ColorJitter]);
        for &corruption in Corruption::value_variants() {
            assert_eq!(corruption.to_string().parse::<Corruption>().unwrap(), corruption);
            let json = serde_json::to_string(&corruption).unwrap();
            assert_eq!(json, format!("\"{corruption}\""));
            assert_eq!(serde_json::from_str::<Corruption>(&json).unwrap(), corruption);
        }
        let error = "blur".parse::<Corruption>().unwrap_err().to_string();
        assert_eq!(error, "unknown corruption 'blur': expected one of resize20, color_jitter");
        assert!(serde_json::from_str::<Corruption>("\"blur\"").is_err());
    }

    #[test]
    fn constants_match_the_official_settings() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/third_party/stic/prompts.json");
        let prompts: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let corruptions = &prompts["corruptions"];
        let as_f32 = |value: &serde_json::Value| value.as_f64().unwrap() as f32;
        assert_eq!(corruptions["downscale"]["shorter_side"], DOWNSCALE_SHORTER_SIDE);
        assert_eq!(as_f32(&corruptions["color_jitter"]["brightness"]), JITTER_BRIGHTNESS);
        assert_eq!(as_f32(&corruptions["color_jitter"]["hue"]), JITTER_HUE);
    }

    #[test]
    fn run_corrupt_writes_a_png_that_depends_only_on_the_seed() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.png");
        colour_wheel(90, 60).save(&input).unwrap();
        let corrupt_to_bytes = |kind: Corruption, seed: u64, name: &str| {
            let output = dir.path().join(name);
            run_corrupt(&input, &output, kind, seed, 1 << 20).unwrap();
            std::fs::read(output).unwrap()
        };

        let resized = ::image::load_from_memory(&corrupt_to_bytes(Corruption::Resize20, 0, "small.png")).unwrap();
        assert_eq!((resized.width(), resized.height()), (30, 20));

        let first = corrupt_to_bytes(Corruption::ColorJitter, 11, "a.png");
        assert_eq!(corrupt_to_bytes(Corruption::ColorJitter, 11, "b.png"), first);
        assert_ne!(corrupt_to_bytes(Corruption::ColorJitter, 12, "c.png"), first);
        let jittered = ::image::load_from_memory(&first).unwrap();
        assert_eq!((jittered.width(), jittered.height()), (90, 60));
    }

    #[test]
    fn run_corrupt_names_an_unreadable_input() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.png");
        let error = run_corrupt(&missing, &dir.path().join("out.png"), Corruption::ColorJitter, 0, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing.png"), "{error}");
        assert!(!dir.path().join("out.png").exists());
    }
}
