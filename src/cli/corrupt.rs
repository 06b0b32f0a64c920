use std::path::PathBuf;

use stic::image::DEFAULT_MAX_PIXELS;
use stic::method::corrupt::{run_corrupt, Corruption};

#[derive(clap::Args)]
pub struct Args {
    /// Image to corrupt.
    #[arg(long)]
    image: PathBuf,
    /// Written as PNG.
    #[arg(long)]
    output: PathBuf,
    /// resize20 (shorter side to 20 px) or color_jitter (brightness 0.5, hue 0.3).
    #[arg(long, value_parser = super::choices::value_enum::<Corruption>())]
    kind: Corruption,
    /// Seed of the colour jitter's random parameters.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    stic::fsutil::check_output("--output", &args.output, &[("--image", &args.image)])?;
    run_corrupt(&args.image, &args.output, args.kind, args.seed, DEFAULT_MAX_PIXELS)?;
    Ok(())
}
