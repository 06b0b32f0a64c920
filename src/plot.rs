//! What the pictures stic draws share: the font (DejaVu Sans, embedded in the binary: no system fonts) and the
//! PNG file they end as.
use std::path::Path;

use crate::error::Result;
use crate::fsutil::write_atomic;

/// The family name under which plotters finds the embedded font.
pub fn font() -> &'static str {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("the embedded DejaVu Sans font parses"));
    });
    "sans-serif"
}

/// Writes an RGB buffer of `width` × `height` pixels to `path` as a PNG, all or nothing.
pub fn save_png(path: &Path, width: u32, height: u32, pixels: Vec<u8>) -> Result<()> {
    let image = ::image::RgbImage::from_raw(width, height, pixels).expect("a buffer of the picture's size");
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), ::image::ImageFormat::Png)
        .expect("an RGB picture encodes as PNG in memory");
    write_atomic(path, &png)
}

/// The legend box every chart draws: upper right, on a translucent white background with a black border.
pub fn draw_legend<'a, DB, CT>(
    chart: &mut plotters::chart::ChartContext<'a, DB, CT>,
    font_size: u32,
) -> std::result::Result<(), plotters::drawing::DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: plotters::prelude::DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    use plotters::prelude::*;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((font(), font_size))
        .draw()
}
