//! Hidden: the decoded RGB of images, written as PNGs, for the tests that compare decoding with Pillow's.
use std::path::PathBuf;

use stic::image::{load_image, DEFAULT_MAX_PIXELS};

#[derive(clap::Args)]
pub struct Args {
    /// Images to decode, in one run (stops at the first that fails).
    #[arg(long, required = true)]
    image: Vec<PathBuf>,
    /// Folder for the decoded RGB: `photo.jpg` is written as `photo.png`.
    #[arg(long)]
    output_dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.output_dir)?;
    for path in &args.image {
        let rgb = load_image(path, DEFAULT_MAX_PIXELS).map_err(stic::Error::from)?;
        let mut png = Vec::new();
        rgb.write_to(&mut std::io::Cursor::new(&mut png), ::image::ImageFormat::Png)?;
        let stem = path.file_stem().unwrap_or(path.as_os_str()).to_string_lossy();
        stic::fsutil::write_atomic(&args.output_dir.join(format!("{stem}.png")), &png)?;
    }
    Ok(())
}
