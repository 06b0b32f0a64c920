//! JPEG decoding identical to Pillow's: libjpeg-turbo (vendored by `turbojpeg-sys`) driven as Pillow's
//! `JpegDecode.c` drives it (see jpeg.c), then Pillow's `convert("RGB")` of the mode it opens the file in.

use std::ffi::{c_char, c_int, c_uint, CStr};

use ::image::RgbImage;

use super::error::ImageError;

// The libjpeg API that jpeg.c calls lives in turbojpeg-sys's static library.
use turbojpeg_sys as _;

const OK: c_int = 0;
const TRUNCATED: c_int = 1;
const UNSUPPORTED: c_int = 3;
const MESSAGE_LEN: usize = 200;

#[repr(C)]
#[derive(Default)]
struct Header {
    width: c_uint,
    height: c_uint,
    components: c_int,
}

extern "C" {
    fn stic_jpeg_read_header(data: *const u8, len: usize, header: *mut Header, message: *mut c_char) -> c_int;
    fn stic_jpeg_decode(data: *const u8, len: usize, out: *mut u8, out_len: usize, message: *mut c_char) -> c_int;
}

/// Decodes a JPEG to RGB like `Image.open(..).convert("RGB")`, refusing it before any pixel data is decoded
/// when it has more than `max_pixels` pixels.
pub(super) fn decode(bytes: &[u8], what: &str, max_pixels: u64) -> Result<RgbImage, ImageError> {
    let mut message = [0 as c_char; MESSAGE_LEN];
    let mut header = Header::default();
    // SAFETY: `bytes` is valid for its length and only read; `header` and `message` are sized as jpeg.h says.
    let status = unsafe { stic_jpeg_read_header(bytes.as_ptr(), bytes.len(), &mut header, message.as_mut_ptr()) };
    check(status, &message, what)?;
    let (width, height) = (header.width, header.height);
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError::TooManyPixels { what: what.to_owned(), width, height, pixels, limit: max_pixels });
    }
    let components = header.components as usize;
    let mut samples = vec![0u8; pixels as usize * components];
    // SAFETY: as above; `samples` is writable for the length passed.
    let status = unsafe {
        stic_jpeg_decode(bytes.as_ptr(), bytes.len(), samples.as_mut_ptr(), samples.len(), message.as_mut_ptr())
    };
    check(status, &message, what)?;
    let rgb = match components {
        1 => samples.iter().flat_map(|&grey| [grey, grey, grey]).collect(),
        3 => samples,
        _ => samples.chunks_exact(4).flat_map(inverted_cmyk_to_rgb).collect(),
    };
    Ok(RgbImage::from_raw(width, height, rgb).expect("RGB buffer size"))
}

fn check(status: c_int, message: &[c_char; MESSAGE_LEN], what: &str) -> Result<(), ImageError> {
    // SAFETY: the buffer starts zeroed, and jpeg.c writes only NUL-terminated messages of at most its length.
    let detail = || unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy().into_owned();
    let (what, format) = (what.to_owned(), "JPEG");
    match status {
        OK => Ok(()),
        TRUNCATED => Err(ImageError::Corrupt {
            what,
            format,
            detail: "data ends before the end-of-image marker (truncated file)".to_owned(),
        }),
        UNSUPPORTED => Err(ImageError::Unsupported { what, format, detail: detail() }),
        _ => Err(ImageError::Corrupt { what, format, detail: detail() }),
    }
}

/// Pillow opens 4-component JPEGs as mode CMYK with raw mode "CMYK;I" (inverted, the Adobe convention) and
/// converts CMYK to RGB as `255 - k` scaled by `255 - c` (and m, y), rounding as its `MULDIV255` does.
fn inverted_cmyk_to_rgb(stored: &[u8]) -> [u8; 3] {
    let not_k = u32::from(stored[3]); // 255 - (255 - stored)
    let channel = |v: u8| {
        let ink = u32::from(255 - v);
        let product = ink * not_k + 128;
        not_k.saturating_sub(((product >> 8) + product) >> 8) as u8
    };
    [channel(stored[0]), channel(stored[1]), channel(stored[2])]
}

#[cfg(test)]
mod tests {
    use super::*;
    use turbojpeg_sys::*;

    /// A 16x16 RGB JPEG written by libjpeg-turbo (quality 90, 4:2:0).
    fn encode() -> Vec<u8> {
        let pixels: Vec<u8> = (0..16 * 16 * 3).map(|i| (i * 7 % 256) as u8).collect();
        // SAFETY: the TurboJPEG calls get a live handle, a source buffer of 16x16 RGB pixels, and out-pointers
        // that tj3Compress8 fills with a buffer it allocates (freed with tj3Free).
        unsafe {
            let handle = tj3Init(TJINIT_TJINIT_COMPRESS as c_int);
            assert!(!handle.is_null());
            assert_eq!(tj3Set(handle, TJPARAM_TJPARAM_QUALITY as c_int, 90), 0);
            assert_eq!(tj3Set(handle, TJPARAM_TJPARAM_SUBSAMP as c_int, TJSAMP_TJSAMP_420 as c_int), 0);
            let (mut out, mut len) = (std::ptr::null_mut(), 0);
            let status = tj3Compress8(handle, pixels.as_ptr(), 16, 0, 16, TJPF_TJPF_RGB as c_int, &mut out, &mut len);
            assert_eq!(status, 0);
            let jpeg = std::slice::from_raw_parts(out, len as usize).to_vec();
            tj3Free(out.cast());
            tj3Destroy(handle);
            jpeg
        }
    }

    #[test]
    fn truncated_files_are_rejected_like_pillow() {
        let jpeg = encode();
        assert_eq!(decode(&jpeg, "whole.jpg", 1000).unwrap().dimensions(), (16, 16));

        let mut with_trailer = jpeg.clone();
        with_trailer.extend_from_slice(b"trailing \xff\xda bytes");
        assert_eq!(decode(&with_trailer, "trailer.jpg", 1000).unwrap(), decode(&jpeg, "whole.jpg", 1000).unwrap());

        for cut in [jpeg.len() - 2, jpeg.len() / 2, 20] {
            let err = decode(&jpeg[..cut], "cut.jpg", 1000).unwrap_err();
            assert!(matches!(err, ImageError::Corrupt { format: "JPEG", .. }), "{err}");
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }

    #[test]
    fn the_pixel_limit_is_checked_from_the_header() {
        let jpeg = encode();
        let err = decode(&jpeg, "big.jpg", 255).unwrap_err();
        assert!(
            matches!(err, ImageError::TooManyPixels { width: 16, height: 16, pixels: 256, limit: 255, .. }),
            "{err}"
        );
        assert!(decode(&jpeg, "ok.jpg", 256).is_ok());
    }

    #[test]
    fn garbage_after_the_signature_is_corrupt() {
        let err = decode(b"\xff\xd8\xff\xe0garbage", "bad.jpg", 1000).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn other_precisions_are_unsupported_like_pillow() {
        // Pillow: "cannot handle 12-bit layers". The frame header's first byte is the sample precision.
        let mut jpeg = encode();
        let frame = jpeg.windows(2).position(|pair| pair == [0xFF, 0xC0]).unwrap();
        jpeg[frame + 4] = 12;
        let err = decode(&jpeg, "deep.jpg", 1000).unwrap_err();
        assert!(matches!(err, ImageError::Unsupported { format: "JPEG", .. }), "{err}");
        assert!(err.to_string().contains("12-bit samples"), "{err}");
    }

    #[test]
    fn cmyk_converts_like_pillow() {
        // Image.new("CMYK", (1, 1), cmyk).convert("RGB") with Pillow 13; the file stores 255 - cmyk.
        for (cmyk, rgb) in [
            ([0, 0, 0, 0], [255, 255, 255]),
            ([255, 255, 255, 255], [0, 0, 0]),
            ([10, 200, 30, 40], [207, 46, 190]),
            ([128, 64, 32, 100], [77, 116, 136]),
            ([255, 0, 128, 1], [0, 254, 127]),
        ] {
            assert_eq!(inverted_cmyk_to_rgb(&cmyk.map(|v: u8| 255 - v)), rgb, "{cmyk:?}");
        }
    }
}
