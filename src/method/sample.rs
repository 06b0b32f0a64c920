//! Seeded draws without replacement: the stage-1 image lists of the paper's Fig. 6 (6k, 12k and 30k images of
//! COCO train2014, `stic sample-images`) and the stage-2 `seeded_sample` of an instruction set.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use std::path::PathBuf;

use super::MethodError;
use crate::error::Result;

/// The first `count` of `items` (all of them when there are fewer) after a shuffle with [`ChaCha8Rng`] seeded
/// by `seed` (rand 0.9's Fisher–Yates `shuffle`, pinned by Cargo.lock). The draw depends only on the items, their
/// order and the seed, and a larger count extends a smaller one: the draw of N is the first N of the draw of N+k.
pub fn seeded_sample<T>(mut items: Vec<T>, count: usize, seed: u64) -> Vec<T> {
    items.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    items.truncate(count);
    items
}

/// `stic sample-images`: a seeded list of images of a folder.
pub struct SampleImagesOptions {
    /// Folder of images (e.g. COCO train2014); its sorted image names are the pool.
    pub image_dir: PathBuf,
    pub count: usize,
    pub seed: u64,
    /// The JSON list written (the format of `stic prefs --images`).
    pub output: PathBuf,
    /// A JSON list of names left out of the pool (an earlier, smaller list to extend).
    pub exclude: Option<PathBuf>,
}

/// Writes `opts.count` image names drawn without replacement from the images of `opts.image_dir` less those of
/// `opts.exclude`; returns the size of the pool drawn from.
pub fn sample_images(opts: &SampleImagesOptions) -> Result<usize> {
    let mut inputs = vec![("--image-dir", opts.image_dir.as_path())];
    inputs.extend(opts.exclude.as_deref().map(|list| ("--exclude", list)));
    crate::fsutil::check_output("--output", &opts.output, &inputs)?;
    let excluded: HashSet<String> = match &opts.exclude {
        Some(list) => crate::fsutil::read_json::<Vec<String>>(list)?.into_iter().collect(),
        None => HashSet::new(),
    };
    let pool: Vec<String> =
        super::prefs::image_list(&opts.image_dir, None)?.into_iter().filter(|name| !excluded.contains(name)).collect();
    if opts.count > pool.len() {
        return Err(MethodError::SampleLargerThanPool {
            count: opts.count,
            available: pool.len(),
            image_dir: opts.image_dir.clone(),
            exclude: opts.exclude.clone(),
        }
        .into());
    }
    let pool_size = pool.len();
    let names = seeded_sample(pool, opts.count, opts.seed);
    let text = serde_json::to_string(&names).expect("names serialise");
    crate::fsutil::create_parent(&opts.output)?;
    crate::fsutil::write_atomic(&opts.output, text.as_bytes())?;
    Ok(pool_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn names(count: usize) -> Vec<String> {
        (0..count).map(|k| format!("COCO_train2014_{k:012}.jpg")).collect()
    }

    #[test]
    fn the_draw_is_fixed_by_the_seed_and_a_larger_count_extends_a_smaller_one() {
        let pool = names(100);
        let draw = seeded_sample(pool.clone(), 10, 42);
        assert_eq!(draw, seeded_sample(pool.clone(), 10, 42));
        assert_ne!(draw, seeded_sample(pool.clone(), 10, 43));
        assert_eq!(draw.iter().collect::<HashSet<_>>().len(), 10, "drawn without replacement");
        assert!(draw.iter().all(|name| pool.contains(name)));
        assert_eq!(seeded_sample(pool.clone(), 30, 42)[..10], draw[..]);
        assert_eq!(seeded_sample(pool, 1000, 42).len(), 100);
    }

    #[test]
    fn sample_images_leaves_out_the_excluded_names_and_refuses_a_count_above_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        for name in names(20) {
            std::fs::write(images.join(name), b"").unwrap();
        }
        std::fs::write(images.join("notes.txt"), b"").unwrap();
        let first = dir.path().join("first.json");
        let opts = |count, output: &Path, exclude: Option<&Path>| SampleImagesOptions {
            image_dir: images.clone(),
            count,
            seed: 7,
            output: output.to_path_buf(),
            exclude: exclude.map(Path::to_path_buf),
        };
        assert_eq!(sample_images(&opts(8, &first, None)).unwrap(), 20);
        let first_names: Vec<String> = crate::fsutil::read_json(&first).unwrap();
        assert_eq!(first_names, seeded_sample(names(20), 8, 7));

        let rest = dir.path().join("rest.json");
        assert_eq!(sample_images(&opts(12, &rest, Some(&first))).unwrap(), 12);
        let rest_names: Vec<String> = crate::fsutil::read_json(&rest).unwrap();
        let mut all: Vec<String> = first_names.into_iter().chain(rest_names).collect();
        all.sort();
        assert_eq!(all, names(20), "the two lists split the folder");

        let refused = dir.path().join("refused.json");
        let error = sample_images(&opts(13, &refused, Some(&first))).unwrap_err().to_string();
        assert!(error.contains("--count 13") && error.contains("12 images"), "{error}");
        assert!(!refused.exists());
    }
}
