//! Pillow's `Image.resize(size, Image.BICUBIC)` and `Image.BILINEAR` for 8-bit RGB, reproduced bit for bit
//! (libImaging/Resample.c: separable convolution with fixed-point weights; both filters antialias when
//! downscaling).

use ::image::RgbImage;

const CHANNELS: usize = 3;
/// Fixed-point precision of the 8-bit resampling weights (Resample.c: `32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// A Pillow resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// `Image.BILINEAR`: the triangle filter (torchvision's default `Resize` interpolation on PIL images).
    Bilinear,
    /// `Image.BICUBIC`: Keys' cubic convolution (what the CLIP image processors use).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Bicubic => bicubic_filter(x),
        }
    }
}

/// Keys' cubic convolution with a = -0.5, as Pillow defines BICUBIC.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output position: the first input index, the number of taps, and the fixed-point
/// weights (padded to `taps_per_output`).
struct Coefficients {
    taps_per_output: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i32>,
}

impl Coefficients {
    fn weights_of(&self, out_index: usize) -> &[i32] {
        let start = out_index * self.taps_per_output;
        &self.weights[start..start + self.count[out_index]]
    }
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the whole-image box `(0, in_size)`.
fn precompute_coefficients(in_size: u32, out_size: u32, filter: Filter) -> Coefficients {
    let scale = f64::from(in_size) / f64::from(out_size);
    // Downscaling widens the filter (antialiasing); upscaling keeps it at its natural width.
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let taps_per_output = support.ceil() as usize * 2 + 1;
    let inverse_filter_scale = 1.0 / filter_scale;

    let out_len = out_size as usize;
    let mut first = Vec::with_capacity(out_len);
    let mut count = Vec::with_capacity(out_len);
    let mut weights = vec![0i32; out_len * taps_per_output];
    let mut float_weights = vec![0f64; taps_per_output];
    for out_index in 0..out_len {
        let center = (out_index as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero; `as i64` does the same.
        let min = ((center - support + 0.5) as i64).max(0);
        let max = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let taps = (max - min) as usize;

        let mut total = 0.0;
        for (tap, weight) in float_weights[..taps].iter_mut().enumerate() {
            let distance = (tap as i64 + min) as f64 - center + 0.5;
            *weight = filter.weight(distance * inverse_filter_scale);
            total += *weight;
        }
        let row = &mut weights[out_index * taps_per_output..][..taps];
        for (fixed, &weight) in row.iter_mut().zip(&float_weights[..taps]) {
            let normalized = if total != 0.0 { weight / total } else { weight };
            let scaled = normalized * f64::from(1u32 << PRECISION_BITS);
            *fixed = if normalized < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
        }
        first.push(min as usize);
        count.push(taps);
    }
    Coefficients { taps_per_output, first, count, weights }
}

/// Rounds a fixed-point accumulator (which already holds the +0.5 offset) to a byte.
fn clip8(accumulator: i32) -> u8 {
    if accumulator >= 1 << (PRECISION_BITS + 8) {
        255
    } else if accumulator <= 0 {
        0
    } else {
        (accumulator >> PRECISION_BITS) as u8
    }
}

const ROUNDING_OFFSET: i32 = 1 << (PRECISION_BITS - 1);

/// Resamples rows `first_row..first_row + rows` of `input` horizontally.
fn resample_horizontal(
    input: &[u8],
    in_width: usize,
    first_row: usize,
    rows: usize,
    coefficients: &Coefficients,
) -> Vec<u8> {
    let out_width = coefficients.first.len();
    let mut output = vec![0u8; rows * out_width * CHANNELS];
    for (row, out_row) in output.chunks_exact_mut(out_width * CHANNELS).enumerate() {
        let in_row = &input[(first_row + row) * in_width * CHANNELS..][..in_width * CHANNELS];
        for (x, out_pixel) in out_row.chunks_exact_mut(CHANNELS).enumerate() {
            let mut sums = [ROUNDING_OFFSET; CHANNELS];
            let source = &in_row[coefficients.first[x] * CHANNELS..];
            for (pixel, &weight) in source.chunks_exact(CHANNELS).zip(coefficients.weights_of(x)) {
                for (sum, &value) in sums.iter_mut().zip(pixel) {
                    *sum += i32::from(value) * weight;
                }
            }
            for (out, &sum) in out_pixel.iter_mut().zip(&sums) {
                *out = clip8(sum);
            }
        }
    }
    output
}

/// Resamples `input` vertically; `row_offset` is subtracted from the coefficient row indices
/// (the horizontal pass only produced the rows the vertical pass reads).
fn resample_vertical(input: &[u8], width: usize, row_offset: usize, coefficients: &Coefficients) -> Vec<u8> {
    let row_len = width * CHANNELS;
    let out_height = coefficients.first.len();
    let mut output = vec![0u8; out_height * row_len];
    // Integer sums are exact, so accumulating row by row equals Pillow's per-pixel loop.
    let mut sums = vec![0i32; row_len];
    for (y, out_row) in output.chunks_exact_mut(row_len).enumerate() {
        sums.fill(ROUNDING_OFFSET);
        let first_row = coefficients.first[y] - row_offset;
        for (tap, &weight) in coefficients.weights_of(y).iter().enumerate() {
            let in_row = &input[(first_row + tap) * row_len..][..row_len];
            for (sum, &value) in sums.iter_mut().zip(in_row) {
                *sum += i32::from(value) * weight;
            }
        }
        for (out, &sum) in out_row.iter_mut().zip(&sums) {
            *out = clip8(sum);
        }
    }
    output
}

/// Pillow-exact `img.resize((width, height), Image.BICUBIC)`.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize(img, width, height, Filter::Bicubic)
}

/// Pillow-exact `img.resize((width, height), filter)`.
///
/// Each axis whose size changes is resampled in its own pass, rounding to 8 bits in between.
/// Pillow runs the horizontal pass first unless the height shrinks by more than twice as many
/// pixels as the width (Pillow 13, python-pillow/Pillow#9549); the order changes the rounding.
///
/// Panics if `width` or `height` is zero (Pillow raises there too).
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    assert!(width > 0 && height > 0, "resize: target size {width}x{height} is empty");
    let (in_width, in_height) = img.dimensions();
    let input = img.as_raw();
    let resized = match (width != in_width, height != in_height) {
        (false, false) => return img.clone(),
        (true, false) => {
            let horizontal = precompute_coefficients(in_width, width, filter);
            resample_horizontal(input, in_width as usize, 0, in_height as usize, &horizontal)
        }
        (false, true) => {
            let vertical = precompute_coefficients(in_height, height, filter);
            resample_vertical(input, in_width as usize, 0, &vertical)
        }
        (true, true) => {
            let horizontal = precompute_coefficients(in_width, width, filter);
            let vertical = precompute_coefficients(in_height, height, filter);
            let height_shrink = i64::from(in_height) - i64::from(height);
            let width_shrink = i64::from(in_width) - i64::from(width);
            if height_shrink > 0 && height_shrink > 2 * width_shrink {
                let temp = resample_vertical(input, in_width as usize, 0, &vertical);
                resample_horizontal(&temp, in_width as usize, 0, height as usize, &horizontal)
            } else {
                // Only the input rows the vertical pass reads are resampled horizontally.
                let last = vertical.first.len() - 1;
                let first_row = vertical.first[0];
                let end_row = vertical.first[last] + vertical.count[last];
                let temp = resample_horizontal(input, in_width as usize, first_row, end_row - first_row, &horizontal);
                resample_vertical(&temp, width as usize, first_row, &vertical)
            }
        }
    };
    RgbImage::from_raw(width, height, resized).expect("resampled buffer size")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            ::image::Rgb([
                ((x * 37 + y * 11) % 256) as u8,
                ((x * 5 + y * 53 + 17) % 256) as u8,
                ((x * y + 3 * x + 101) % 256) as u8,
            ])
        })
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = gradient(9, 4);
        assert_eq!(resize_bicubic(&img, 9, 4), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(13, 7, ::image::Rgb([200, 3, 77]));
        for (w, h) in [(5, 3), (40, 21), (13, 2), (1, 1), (26, 7)] {
            let out = resize_bicubic(&img, w, h);
            assert!(out.pixels().all(|p| p.0 == [200, 3, 77]), "{w}x{h}");
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(100, 7), (7, 100), (336, 335), (1, 5), (5, 1)] {
            let c = precompute_coefficients(input, output, Filter::Bicubic);
            for i in 0..output as usize {
                let sum: i32 = c.weights_of(i).iter().sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= c.count[i] as i32, "{input}->{output}");
            }
        }
    }

    /// Golden values from Pillow 13.0.0:
    /// `Image.fromarray(a).resize((w, h), Image.BICUBIC)` with `a` built like `gradient`,
    /// i.e. a[y, x] = [(37x+11y)%256, (5x+53y+17)%256, (xy+3x+101)%256].
    #[test]
    fn matches_pillow_golden_values() {
        let img = gradient(6, 5);
        let down = resize_bicubic(&img, 4, 3);
        let expected_down: [[u8; 3]; 12] = [
            [15, 37, 102],
            [67, 45, 107],
            [126, 52, 112],
            [178, 60, 117],
            [33, 124, 102],
            [85, 132, 110],
            [144, 139, 117],
            [196, 147, 125],
            [51, 211, 103],
            [103, 219, 112],
            [162, 226, 123],
            [214, 234, 132],
        ];
        let got: Vec<[u8; 3]> = down.pixels().map(|p| p.0).collect();
        assert_eq!(got, expected_down);

        let up = resize_bicubic(&img, 7, 2);
        let expected_up: [[u8; 3]; 14] = [
            [8, 62, 101],
            [37, 66, 104],
            [70, 70, 108],
            [102, 75, 111],
            [133, 79, 114],
            [166, 83, 117],
            [195, 87, 120],
            [34, 184, 101],
            [63, 188, 106],
            [96, 192, 111],
            [128, 197, 116],
            [159, 201, 121],
            [192, 205, 128],
            [221, 209, 132],
        ];
        let got: Vec<[u8; 3]> = up.pixels().map(|p| p.0).collect();
        assert_eq!(got, expected_up);

        // Height shrinks by 6 > 2 * 1 pixels, so Pillow resamples vertically first; the
        // horizontal-first order would give different values here.
        let tall = resize_bicubic(&gradient(6, 9), 5, 3);
        let expected_tall: [[u8; 3]; 15] = [
            [16, 85, 101],
            [59, 90, 106],
            [105, 97, 111],
            [150, 103, 116],
            [193, 108, 121],
            [48, 144, 102],
            [91, 149, 110],
            [137, 156, 119],
            [181, 162, 127],
            [230, 167, 135],
            [80, 119, 102],
            [123, 124, 114],
            [169, 131, 126],
            [218, 137, 138],
            [118, 142, 150],
        ];
        let got: Vec<[u8; 3]> = tall.pixels().map(|p| p.0).collect();
        assert_eq!(got, expected_tall);
    }

    /// Golden values from Pillow 13.0.0, `Image.BILINEAR`, on the same gradients: downscale, the vertical-first
    /// order, and an upscale.
    #[test]
    fn bilinear_matches_pillow_golden_values() {
        let pixels = |img: RgbImage| img.pixels().map(|p| p.0).collect::<Vec<[u8; 3]>>();
        let down: Vec<[u8; 3]> = vec![
            [19, 42, 102],
            [71, 49, 107],
            [124, 56, 112],
            [176, 63, 117],
            [36, 125, 103],
            [88, 132, 110],
            [141, 139, 117],
            [193, 146, 124],
            [53, 208, 104],
            [105, 215, 113],
            [158, 222, 122],
            [210, 229, 131],
        ];
        assert_eq!(pixels(resize(&gradient(6, 5), 4, 3, Filter::Bilinear)), down);
        let tall: Vec<[u8; 3]> = vec![
            [22, 84, 102],
            [64, 90, 107],
            [107, 96, 112],
            [149, 101, 117],
            [191, 107, 121],
            [52, 145, 102],
            [94, 151, 111],
            [137, 157, 119],
            [179, 162, 126],
            [221, 168, 135],
            [82, 120, 103],
            [124, 126, 115],
            [167, 132, 126],
            [209, 137, 136],
            [125, 143, 148],
        ];
        assert_eq!(pixels(resize(&gradient(6, 9), 5, 3, Filter::Bilinear)), tall);
        let up = pixels(resize(&gradient(6, 5), 9, 4, Filter::Bilinear));
        assert_eq!(up.len(), 36);
        assert_eq!((up[0], up[8], up[27], up[35]), ([3, 30, 101], [188, 55, 117], [41, 216, 101], [226, 241, 135]));
        assert_eq!(up[13], [109, 105, 112]);
    }
}
