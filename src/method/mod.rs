//! The STIC method itself, independent of the model: image corruptions and the preference pairs of stage 1
//! (`corrupt`, `prefs`), the descriptions and their infusion into instruction data of stage 2 (`describe`,
//! `infuse`), and the seeded image lists that choose the stage-1 images (`sample`).
//!
//! What the method finds wrong with its inputs is a [`MethodError`].
pub mod corrupt;
pub mod describe;
pub mod infuse;
pub mod prefs;
pub mod sample;

use std::path::PathBuf;

#[derive(thiserror::Error, Debug)]
pub enum MethodError {
    #[error("unknown corruption '{name}': expected one of {expected}")]
    UnknownCorruption { name: String, expected: String },

    #[error("could not encode the corrupted image as PNG for {path}: {source}")]
    EncodePng { path: PathBuf, source: ::image::ImageError },

    #[error("entry {entry_id}: turn {turn} is from '{from}', expected 'human' or 'gpt'; fix the data file")]
    UnknownSpeaker { entry_id: String, turn: usize, from: String },

    #[error("{path}, entry {entry}: the id {id} is not a string or a number; give every entry an id of its own")]
    EntryWithoutId { path: PathBuf, entry: usize, id: String },

    #[error(
        "{path}: entries {first} and {second} have the id {entry_id} but different images, and descriptions are \
         matched to entries by id; give every entry an id of its own"
    )]
    SharedEntryId { path: PathBuf, entry_id: String, first: usize, second: usize },

    #[error("entry {entry_id} has an image but no human turn to put its description in; fix the data file")]
    NoHumanTurn { entry_id: String },

    #[error("{path}: more than one description for entry {entry_id}; keep one per entry")]
    DuplicateDescription { path: PathBuf, entry_id: String },

    #[error(
        "the description of entry {entry_id} is of image '{description_image}' but the entry's image is \
         '{entry_image}': the descriptions were generated for another data file"
    )]
    DescriptionImageMismatch { entry_id: String, entry_image: String, description_image: String },

    #[error(
        "--count {count} is more than the {available} images of {image_dir}{}: lower --count, or give a folder \
         with more images",
        exclude.as_ref().map_or(String::new(), |list| format!(" not in {}", list.display()))
    )]
    SampleLargerThanPool { count: usize, available: usize, image_dir: PathBuf, exclude: Option<PathBuf> },
}
