//! Tiling and normalisation: `LlavaNextImageProcessor.preprocess` for [`AspectMode::Anyres`],
//! LLaVA's `expand2square` + `CLIPImageProcessor.preprocess` for [`AspectMode::Pad`], `CLIPImageProcessor.preprocess`
//! alone for [`AspectMode::CenterCrop`].

use ::image::{GenericImage, GenericImageView, Rgb, RgbImage};
use ndarray::Array4;

use super::anyres::{best_resolution, patch_output_size};
use super::pil::resize_bicubic;
use super::{AspectMode, ImageConfig};

#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// `[n_tiles, 3, crop_size, crop_size]`; anyres: the base image first, then the grid
    /// tiles in row-major order.
    pub pixel_values: Array4<f32>,
    /// `(height, width)` of the RGB image.
    pub original_size: (u32, u32),
}

impl Preprocessed {
    /// The pixel values as a CPU f32 tensor of the same shape.
    pub fn pixel_tensor(&self) -> tch::Tensor {
        let shape: Vec<i64> = self.pixel_values.shape().iter().map(|&d| d as i64).collect();
        tch::Tensor::from_slice(self.pixel_values.as_slice().expect("pixel values are contiguous"))
            .view(shape.as_slice())
    }
}

/// Turns an RGB image into normalised vision-tower tiles as configured by `cfg.aspect_mode`.
pub fn preprocess(img: &RgbImage, cfg: &ImageConfig) -> Preprocessed {
    let tiles = match cfg.aspect_mode {
        AspectMode::Anyres => anyres_tiles(img, cfg),
        AspectMode::Pad => vec![expand_to_square(img, mean_background(cfg.image_mean))],
        AspectMode::CenterCrop => vec![img.clone()],
    };
    let crop = cfg.crop_size as usize;
    let mut pixel_values = Array4::<f32>::zeros((tiles.len(), 3, crop, crop));
    for (tile, mut out) in tiles.iter().zip(pixel_values.outer_iter_mut()) {
        let tile = center_crop(&resize_shortest_edge(tile, cfg.shortest_edge), cfg.crop_size);
        for (x, y, pixel) in tile.enumerate_pixels() {
            for channel in 0..3 {
                out[[channel, y as usize, x as usize]] =
                    normalize(pixel.0[channel], cfg.image_mean[channel], cfg.image_std[channel]);
            }
        }
    }
    Preprocessed { pixel_values, original_size: (img.height(), img.width()) }
}

/// `rescale` (float64 multiply by 1/255, cast to float32) then `normalize` in float32.
fn normalize(value: u8, mean: f32, std: f32) -> f32 {
    let rescaled = (f64::from(value) * (1.0 / 255.0)) as f32;
    (rescaled - mean) / std
}

/// `get_image_patches` (LLaVA: `process_anyres_image`, the same steps): the whole image squashed to
/// `shortest_edge`², then the tiles of the image resized into the best grid resolution and centred on a
/// black canvas.
fn anyres_tiles(img: &RgbImage, cfg: &ImageConfig) -> Vec<RgbImage> {
    let original = (img.height(), img.width());
    let (grid_height, grid_width) = best_resolution(original, cfg);
    let (height, width) = patch_output_size(original, (grid_height, grid_width));
    let resized = resize_bicubic(img, width, height);
    let mut canvas = RgbImage::new(grid_width, grid_height);
    canvas
        .copy_from(&resized, (grid_width - width) / 2, (grid_height - height) / 2)
        .expect("resized image fits its grid resolution");

    let mut tiles = vec![resize_bicubic(img, cfg.shortest_edge, cfg.shortest_edge)];
    let tile = cfg.crop_size;
    for top in (0..grid_height).step_by(tile as usize) {
        for left in (0..grid_width).step_by(tile as usize) {
            // numpy slicing: edge tiles are smaller when the grid is not a multiple of the tile.
            let view = canvas.view(left, top, tile.min(grid_width - left), tile.min(grid_height - top));
            tiles.push(view.to_image());
        }
    }
    tiles
}

/// LLaVA's background colour `tuple(int(x * 255) for x in image_mean)`.
fn mean_background(mean: [f32; 3]) -> Rgb<u8> {
    Rgb(mean.map(|m| (f64::from(m) * 255.0) as u8))
}

/// LLaVA's `expand2square`: pad the short side symmetrically (extra pixel after) with `background`.
fn expand_to_square(img: &RgbImage, background: Rgb<u8>) -> RgbImage {
    let (width, height) = img.dimensions();
    if width == height {
        return img.clone();
    }
    let side = width.max(height);
    let mut square = RgbImage::from_pixel(side, side, background);
    square.copy_from(img, (side - width) / 2, (side - height) / 2).expect("image fits its square");
    square
}

/// CLIP `resize` with `{"shortest_edge": size}` (transformers' `get_resize_output_image_size`).
fn resize_shortest_edge(img: &RgbImage, size: u32) -> RgbImage {
    let (width, height) = img.dimensions();
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = (f64::from(size) * f64::from(long) / f64::from(short)) as u32;
    let (new_width, new_height) = if width <= height { (size, new_long) } else { (new_long, size) };
    resize_bicubic(img, new_width, new_height)
}

/// transformers' `center_crop`: offset `(size - crop) // 2`, or zero padding (extra pixel
/// before) along a side shorter than `crop`.
fn center_crop(img: &RgbImage, crop: u32) -> RgbImage {
    let (width, height) = img.dimensions();
    if width >= crop && height >= crop {
        return img.view((width - crop) / 2, (height - crop) / 2, crop, crop).to_image();
    }
    let place = |size: u32| -> (u32, u32, u32) {
        // (source offset, destination offset, length)
        if size >= crop {
            ((size - crop) / 2, 0, crop)
        } else {
            (0, (crop - size).div_ceil(2), size)
        }
    };
    let (src_x, dst_x, len_x) = place(width);
    let (src_y, dst_y, len_y) = place(height);
    let mut out = RgbImage::new(crop, crop);
    out.copy_from(&*img.view(src_x, src_y, len_x, len_y), dst_x, dst_y).expect("crop fits its canvas");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkerboard(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            let v = if (x / 3 + y / 5) % 2 == 0 { 230 } else { 20 };
            Rgb([v, 255 - v, (x % 256) as u8])
        })
    }

    #[test]
    fn anyres_tile_count_and_order() {
        let cfg = ImageConfig::default();
        let img = checkerboard(900, 300); // wide: 1x3 grid of 336 tiles
        let out = preprocess(&img, &cfg);
        assert_eq!(out.pixel_values.shape(), &[4, 3, 336, 336]);
        assert_eq!(out.original_size, (300, 900));

        let square = preprocess(&RgbImage::from_pixel(500, 500, Rgb([1, 2, 3])), &cfg);
        assert_eq!(square.pixel_values.shape(), &[5, 3, 336, 336]);
    }

    /// Values from transformers 4.57.6 `LlavaNextImageProcessor` (llava-v1.6 settings) on a
    /// 13x9 image with a[y, x] = [(37x+11y)%256, (5x+53y+17)%256, (xy+3x+101)%256].
    #[test]
    fn anyres_matches_transformers_golden_values() {
        let img = RgbImage::from_fn(13, 9, |x, y| {
            Rgb([
                ((37 * x + 11 * y) % 256) as u8,
                ((5 * x + 53 * y + 17) % 256) as u8,
                ((x * y + 3 * x + 101) % 256) as u8,
            ])
        });
        let out = preprocess(&img, &ImageConfig::default());
        assert_eq!(out.pixel_values.shape(), &[3, 3, 336, 336]);
        for (index, expected) in [
            ([0, 0, 0, 0], -1.792_262_6_f32),
            ([0, 1, 100, 200], 0.844_246_8),
            ([0, 2, 335, 335], 1.861_495_6),
            ([1, 0, 10, 10], -1.792_262_6),
            ([1, 0, 30, 300], 0.966_840_1),
            ([2, 1, 200, 17], -1.016_716_5),
            ([2, 2, 335, 0], 0.908_751_37),
            ([1, 2, 168, 168], 0.112_427_63),
        ] {
            assert_eq!(out.pixel_values[index], expected, "{index:?}");
        }
    }

    #[test]
    fn normalisation_is_float32_clip() {
        // (np.float64(v) * (1 / 255)).astype(np.float32), then (x - mean) / std in float32.
        let cfg = ImageConfig::default();
        let out = preprocess(&RgbImage::from_pixel(336, 336, Rgb([0, 128, 255])), &cfg);
        let expected = [-1.792_262_6_f32, 0.168_897_32, 2.145_897];
        for (channel, &value) in expected.iter().enumerate() {
            assert_eq!(out.pixel_values[[0, channel, 17, 300]], value);
        }
    }

    #[test]
    fn grid_padding_is_black_and_centred() {
        // 100x400 (h x w) goes to a 336x672 grid: resized to 168x672, 84 black rows above.
        let cfg = ImageConfig::default();
        let out = preprocess(&RgbImage::from_pixel(400, 100, Rgb([255, 255, 255])), &cfg);
        let black_red = normalize(0, cfg.image_mean[0], cfg.image_std[0]);
        let white_red = normalize(255, cfg.image_mean[0], cfg.image_std[0]);
        assert_eq!(out.pixel_values.shape(), &[3, 3, 336, 336]);
        for tile in 1..3 {
            assert_eq!(out.pixel_values[[tile, 0, 83, 10]], black_red);
            assert_eq!(out.pixel_values[[tile, 0, 84, 10]], white_red);
            assert_eq!(out.pixel_values[[tile, 0, 251, 10]], white_red);
            assert_eq!(out.pixel_values[[tile, 0, 252, 10]], black_red);
        }
    }

    #[test]
    fn pad_mode_uses_mean_background() {
        let cfg = ImageConfig { aspect_mode: AspectMode::Pad, ..ImageConfig::default() };
        assert_eq!(mean_background(cfg.image_mean), Rgb([122, 116, 104]));
        let out = preprocess(&RgbImage::from_pixel(100, 50, Rgb([9, 9, 9])), &cfg);
        assert_eq!(out.pixel_values.shape(), &[1, 3, 336, 336]);
        let background = normalize(122, cfg.image_mean[0], cfg.image_std[0]);
        assert_eq!(out.pixel_values[[0, 0, 5, 168]], background);
        assert_eq!(out.pixel_values[[0, 0, 168, 168]], normalize(9, cfg.image_mean[0], cfg.image_std[0]));
    }

    #[test]
    fn center_crop_mode_keeps_the_middle_of_the_long_side() {
        // 1000x336: no resize (the short side is 336 already), then columns (1000 - 336) / 2 = 332 to 667.
        let img = RgbImage::from_fn(1000, 336, |x, _| match x {
            0..332 => Rgb([255, 0, 0]),
            332..668 => Rgb([0, 255, 0]),
            _ => Rgb([0, 0, 255]),
        });
        let cfg = ImageConfig { aspect_mode: AspectMode::CenterCrop, ..ImageConfig::default() };
        let out = preprocess(&img, &cfg);
        assert_eq!(out.pixel_values.shape(), &[1, 3, 336, 336]);
        let green = normalize(255, cfg.image_mean[1], cfg.image_std[1]);
        for (y, x) in [(0, 0), (100, 335), (335, 168)] {
            assert_eq!(out.pixel_values[[0, 1, y, x]], green, "({y}, {x})");
            assert_eq!(out.pixel_values[[0, 0, y, x]], normalize(0, cfg.image_mean[0], cfg.image_std[0]));
        }
    }

    #[test]
    fn center_crop_pads_small_sides() {
        let img = RgbImage::from_pixel(3, 8, Rgb([5, 5, 5]));
        let out = center_crop(&img, 6);
        // Width 3 -> placed at ceil(3 / 2) = 2; height 8 -> rows 1..7.
        let row: Vec<u8> = (0..6).map(|x| out.get_pixel(x, 0)[0]).collect();
        assert_eq!(row, [0, 0, 5, 5, 5, 0]);
    }
}
