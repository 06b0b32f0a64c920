//! Decoding to 8-bit RGB the way `PIL.Image.open(path).convert("RGB")` does, which is what
//! transformers' `convert_to_rgb` calls: alpha is dropped (not composited), grey is
//! replicated, and 16-bit samples are reduced as Pillow's PNG/TIFF modes reduce them.
//! JPEGs go to libjpeg-turbo as in Pillow ([`super::jpeg`]); the other formats to the `image` crate.

use std::io::Cursor;
use std::path::Path;

use super::error::ImageError;

use ::image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

/// Reads and decodes an image file; see [`load_image_bytes`].
pub fn load_image(path: &Path, max_pixels: u64) -> Result<RgbImage, ImageError> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ImageError::NotFound { what: what.clone() },
        _ => ImageError::Io { what: what.clone(), source },
    })?;
    load_image_bytes(&bytes, &what, max_pixels)
}

/// Decodes an in-memory image to RGB like `Image.open(..).convert("RGB")`.
///
/// The format is detected from the content. The pixel count is checked against `max_pixels`
/// from the header, before any pixel data is decoded. EXIF orientation is not applied
/// (neither `Image.open` nor the LLaVA processors apply it).
pub fn load_image_bytes(bytes: &[u8], what: &str, max_pixels: u64) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty { what: what.to_owned() });
    }
    let mut reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().expect("reading from memory cannot fail");
    let format = reader.format().ok_or_else(|| ImageError::UnknownFormat { what: what.to_owned() })?;
    if format == ImageFormat::Jpeg {
        return super::jpeg::decode(bytes, what, max_pixels);
    }
    let format_name = format_name(format);
    let decode_error = |error| classify_decode_error(error, what, format_name);

    // The pixel limit below bounds the allocation; the crate's own 512 MiB default would
    // otherwise reject large 16-bit images that are within the limit.
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 29));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError::TooManyPixels { what: what.to_owned(), width, height, pixels, limit: max_pixels });
    }
    let decoded = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    let grey_alpha16_is_grey16 = format == ImageFormat::Png && png_is_grey16(bytes);
    to_rgb_like_pillow(decoded, grey_alpha16_is_grey16).ok_or_else(|| ImageError::Unsupported {
        what: what.to_owned(),
        format: format_name,
        detail: "floating-point samples".to_owned(),
    })
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::WebP => "WebP",
        _ => "image",
    }
}

fn classify_decode_error(error: ::image::ImageError, what: &str, format: &'static str) -> ImageError {
    use ::image::ImageError as Decode;
    let what = what.to_owned();
    match error {
        Decode::Unsupported(e) => ImageError::Unsupported { what, format, detail: e.to_string() },
        Decode::Limits(e) => ImageError::Unsupported { what, format, detail: e.to_string() },
        other => ImageError::Corrupt { what, format, detail: other.to_string() },
    }
}

/// Whether a PNG's IHDR declares 16-bit greyscale. Pillow opens those as mode `I;16` even
/// when a tRNS chunk is present, whereas the `image` crate expands tRNS into an alpha channel.
fn png_is_grey16(bytes: &[u8]) -> bool {
    const GREYSCALE: u8 = 0;
    bytes.len() > 25 && &bytes[12..16] == b"IHDR" && bytes[24] == 16 && bytes[25] == GREYSCALE
}

/// Pillow's `convert("RGB")` applied to the mode Pillow would have opened the file in.
/// `grey_alpha16_is_grey16` says whether a 16-bit grey+alpha decode came from a greyscale
/// PNG with tRNS (Pillow mode `I;16`). Returns `None` for floating-point images.
fn to_rgb_like_pillow(image: DynamicImage, grey_alpha16_is_grey16: bool) -> Option<RgbImage> {
    // `I;16` -> RGB clamps the 16-bit value to 0..=255; it does not rescale.
    fn clamp16(v: u16) -> u8 {
        v.min(255) as u8
    }
    // 16-bit RGB(A) and grey+alpha samples are unpacked keeping the most significant byte.
    fn high_byte(v: u16) -> u8 {
        (v >> 8) as u8
    }
    fn replicate(grey: impl Iterator<Item = u8>) -> impl Iterator<Item = u8> {
        grey.flat_map(|g| [g, g, g])
    }
    let (width, height) = (image.width(), image.height());
    let samples: Vec<u8> = match image {
        DynamicImage::ImageRgb8(rgb) => return Some(rgb),
        DynamicImage::ImageRgba8(rgba) => rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(grey) => replicate(grey.into_raw().into_iter()).collect(),
        DynamicImage::ImageLumaA8(grey_alpha) => replicate(grey_alpha.pixels().map(|p| p[0])).collect(),
        DynamicImage::ImageLuma16(grey) => replicate(grey.pixels().map(|p| clamp16(p[0]))).collect(),
        DynamicImage::ImageLumaA16(grey_alpha) => {
            let reduce = if grey_alpha16_is_grey16 { clamp16 } else { high_byte };
            replicate(grey_alpha.pixels().map(|p| reduce(p[0]))).collect()
        }
        DynamicImage::ImageRgb16(rgb) => rgb.into_raw().into_iter().map(high_byte).collect(),
        DynamicImage::ImageRgba16(rgba) => rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).map(high_byte).collect(),
        _ => return None,
    };
    Some(RgbImage::from_raw(width, height, samples).expect("RGB buffer size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_png(width: u32, height: u32, color: ::image::ExtendedColorType, data: &[u8]) -> Vec<u8> {
        use ::image::ImageEncoder;
        let mut out = Vec::new();
        ::image::codecs::png::PngEncoder::new(&mut out).write_image(data, width, height, color).unwrap();
        out
    }

    #[test]
    fn alpha_is_dropped_not_composited() {
        let rgba = [10, 20, 30, 0, 200, 100, 50, 128];
        let png = encode_png(2, 1, ::image::ExtendedColorType::Rgba8, &rgba);
        let rgb = load_image_bytes(&png, "rgba", u64::MAX).unwrap();
        assert_eq!(rgb.as_raw(), &[10, 20, 30, 200, 100, 50]);

        let grey_alpha = [7, 0, 250, 255];
        let png = encode_png(2, 1, ::image::ExtendedColorType::La8, &grey_alpha);
        let rgb = load_image_bytes(&png, "la", u64::MAX).unwrap();
        assert_eq!(rgb.as_raw(), &[7, 7, 7, 250, 250, 250]);
    }

    #[test]
    fn sixteen_bit_samples_follow_pillow() {
        // Grey 16-bit opens as I;16 and clamps; RGB 16-bit keeps the high byte.
        // (The encoder takes 16-bit samples in native byte order.)
        let grey: Vec<u8> = [0u16, 255, 256, 65535].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let png = encode_png(4, 1, ::image::ExtendedColorType::L16, &grey);
        let rgb = load_image_bytes(&png, "grey16", u64::MAX).unwrap();
        let reds: Vec<u8> = rgb.pixels().map(|p| p.0[0]).collect();
        assert_eq!(reds, [0, 255, 255, 255]);

        let colour: Vec<u8> = [0x1234u16, 0xff00, 0x00ff].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let png = encode_png(1, 1, ::image::ExtendedColorType::Rgb16, &colour);
        let rgb = load_image_bytes(&png, "rgb16", u64::MAX).unwrap();
        assert_eq!(rgb.as_raw(), &[0x12, 0xff, 0x00]);
    }

    #[test]
    fn errors_name_the_source() {
        let missing = load_image(Path::new("/nonexistent/dir/x.png"), u64::MAX).unwrap_err();
        assert!(matches!(missing, ImageError::NotFound { .. }));
        assert!(missing.to_string().contains("/nonexistent/dir/x.png"));

        assert!(matches!(load_image_bytes(&[], "empty", 10), Err(ImageError::Empty { .. })));
        assert!(matches!(load_image_bytes(b"hello world", "text", 10), Err(ImageError::UnknownFormat { .. })));

        let png = encode_png(4, 3, ::image::ExtendedColorType::Rgb8, &[0; 36]);
        let err = load_image_bytes(&png, "big.png", 11).unwrap_err();
        assert!(matches!(err, ImageError::TooManyPixels { width: 4, height: 3, pixels: 12, limit: 11, .. }));
        assert!(err.to_string().contains("big.png"));
        assert!(load_image_bytes(&png, "ok.png", 12).is_ok());

        let truncated = &png[..png.len() - 20];
        let err = load_image_bytes(truncated, "cut.png", 100).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { format: "PNG", .. }), "{err}");
    }
}
