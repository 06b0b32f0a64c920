use std::path::PathBuf;

use stic::method::sample::{sample_images, SampleImagesOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Folder of images (e.g. COCO train2014): its image files, by sorted name, are drawn from.
    #[arg(long)]
    image_dir: PathBuf,
    /// How many image names to draw, without replacement.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    count: usize,
    /// Seed of the draw (ChaCha8): the same folder names and seed give the same list.
    #[arg(long)]
    seed: u64,
    /// The JSON list of image names written, for `stic prefs --images` or a profile's `paths.stage1_images`.
    #[arg(long)]
    output: PathBuf,
    /// A JSON list of image names to leave out (e.g. the 6k list, to draw the images that extend it).
    #[arg(long)]
    exclude: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = SampleImagesOptions {
        image_dir: args.image_dir,
        count: args.count,
        seed: args.seed,
        output: args.output,
        exclude: args.exclude,
    };
    let pool = sample_images(&opts)?;
    eprintln!("{}: {} of {pool} images (seed {})", opts.output.display(), opts.count, opts.seed);
    Ok(())
}
