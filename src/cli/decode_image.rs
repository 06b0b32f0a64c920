//! Hidden: the decoded RGB of an image, written as PNG, for the tests that compare decoding with Pillow's.
use std::path::PathBuf;

use stic::image::{load_image, DEFAULT_MAX_PIXELS};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    image: PathBuf,
    /// Written as an RGB PNG.
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rgb = load_image(&args.image, DEFAULT_MAX_PIXELS).map_err(stic::Error::from)?;
    let mut png = Vec::new();
    rgb.write_to(&mut std::io::Cursor::new(&mut png), ::image::ImageFormat::Png)?;
    stic::fsutil::write_atomic(&args.output, &png)?;
    Ok(())
}
