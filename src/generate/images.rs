//! Images as a generation job shares them: a key per distinct decoded image, and the features of the images it
//! is working on, so that the vision tower and projector run once per image however many prompts look at it.
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use tch::Tensor;

use crate::error::Result;

/// The content of a decoded image (size and pixels, hashed): equal for the two prompts of one picture, different
/// for its corrupted copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageKey(u64);

impl ImageKey {
    pub fn of(image: &::image::RgbImage) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        image.dimensions().hash(&mut hasher);
        hasher.write(image.as_raw());
        ImageKey(hasher.finish())
    }
}

/// The features of the last few distinct images (a job's prompts of one image come close together).
pub struct FeatureCache {
    entries: VecDeque<(ImageKey, Tensor)>,
    capacity: usize,
    /// Images run through the vision tower.
    pub encoded: usize,
    /// Requests served from the cache.
    pub reused: usize,
}

/// Images kept for an engine of `rows` rows: those of the rows queued and of those just admitted.
fn capacity_for_rows(rows: usize) -> usize {
    2 * rows + 2
}

impl FeatureCache {
    pub fn new(capacity: usize) -> Self {
        FeatureCache { entries: VecDeque::new(), capacity: capacity.max(1), encoded: 0, reused: 0 }
    }

    /// A cache for an engine that runs `rows` rows.
    pub fn for_rows(rows: usize) -> Self {
        Self::new(capacity_for_rows(rows))
    }

    /// Resizes the cache as the engine's rows change (the least recently used images go first).
    pub fn fit_rows(&mut self, rows: usize) {
        self.capacity = capacity_for_rows(rows);
        while self.entries.len() > self.capacity {
            self.entries.pop_front();
        }
    }

    /// The features of the image `key`, computed by `encode` unless they are cached.
    pub fn get_or_encode(&mut self, key: ImageKey, encode: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        if let Some(i) = self.entries.iter().position(|(k, _)| *k == key) {
            let entry = self.entries.remove(i).expect("found");
            let features = entry.1.shallow_clone();
            self.entries.push_back(entry);
            self.reused += 1;
            return Ok(features);
        }
        let features = encode()?;
        self.encoded += 1;
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((key, features.shallow_clone()));
        Ok(features)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_images_apart_and_the_cache_encodes_each_once() {
        let a = ::image::RgbImage::from_pixel(4, 3, ::image::Rgb([1, 2, 3]));
        let mut b = a.clone();
        b.put_pixel(3, 2, ::image::Rgb([1, 2, 4]));
        let c = ::image::RgbImage::from_pixel(3, 4, ::image::Rgb([1, 2, 3]));
        assert_eq!(ImageKey::of(&a), ImageKey::of(&a.clone()));
        assert_ne!(ImageKey::of(&a), ImageKey::of(&b));
        assert_ne!(ImageKey::of(&a), ImageKey::of(&c));
        let mut cache = FeatureCache::new(2);
        for image in [&a, &a, &b, &a, &c, &b] {
            let _ = cache
                .get_or_encode(ImageKey::of(image), || Ok(Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu))))
                .unwrap();
        }
        // a, b and c encoded, a twice from the cache; c pushed b out (a was used last), so b is encoded again
        assert_eq!((cache.encoded, cache.reused), (4, 2));
    }
}
