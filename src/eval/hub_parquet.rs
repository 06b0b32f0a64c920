//! Rows of the benchmarks' parquet releases on the Hugging Face hub, turned into
//! the same record structs the JSON loaders read, with each row's image kept as
//! the encoded file bytes the `datasets` library embeds.

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::files::EvalDataError;
use super::item::ImageSource;

/// A benchmark's parquet release: where its shards lie in a download of the hub
/// repository, and which column holds the images.
pub struct ParquetRelease {
    /// The hub repository, for messages.
    pub repo: &'static str,
    /// Folders of the download to look in, in order; "" is the benchmark folder itself.
    pub folders: &'static [&'static str],
    /// The split: its shards are named `<split>-NNNNN-of-NNNNN[-hash].parquet`.
    pub split: &'static str,
    pub image: ImageColumn,
}

/// A `datasets` Image column (a `{bytes, path}` struct) or a plain binary one.
pub enum ImageColumn {
    Required(&'static str),
    /// Rows may have no image (`ImageSource::None`).
    Optional(&'static str),
}

impl ParquetRelease {
    /// The release as an alternative to the LLaVA layout, for the missing-files error.
    pub fn describe(&self) -> String {
        let patterns: Vec<String> = self
            .folders
            .iter()
            .map(|folder| {
                let pattern = Path::new(folder).join(format!("{}-*.parquet", self.split));
                pattern.display().to_string()
            })
            .collect();
        format!("or, instead, {}'s parquet release from the Hugging Face hub: {}", self.repo, patterns.join(" or "))
    }

    /// The release's shards, when the folder has them and none of `layout_files` (the LLaVA layout, which is
    /// read when present).
    pub fn instead_of(&self, data_dir: &Path, layout_files: &[&str]) -> Result<Option<Vec<PathBuf>>, EvalDataError> {
        if layout_files.iter().any(|file| data_dir.join(file).exists()) {
            return Ok(None);
        }
        let files = self.files(data_dir)?;
        Ok((!files.is_empty()).then_some(files))
    }

    /// The shards of the first folder that has any, in name order (the split's row order).
    pub fn files(&self, data_dir: &Path) -> Result<Vec<PathBuf>, EvalDataError> {
        let prefix = format!("{}-", self.split);
        for folder in self.folders {
            let dir = data_dir.join(folder);
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(EvalDataError::Io { path: dir, source }),
            };
            let mut files = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| EvalDataError::Io { path: dir.clone(), source })?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(&prefix) && name.ends_with(".parquet") {
                    files.push(entry.path());
                }
            }
            if !files.is_empty() {
                files.sort();
                return Ok(files);
            }
        }
        Ok(Vec::new())
    }

    /// Every row of `files` in order, built by `build` from its position in the
    /// split, its other columns deserialized into `T` as if they were a JSON
    /// object, and its image. `build`'s errors are reported with the file and row.
    pub fn read_records<T: DeserializeOwned, U>(
        &self,
        files: &[PathBuf],
        mut build: impl FnMut(usize, T, ImageSource) -> Result<U, String>,
    ) -> Result<Vec<U>, EvalDataError> {
        let (column, required) = match self.image {
            ImageColumn::Required(column) => (column, true),
            ImageColumn::Optional(column) => (column, false),
        };
        let mut records = Vec::new();
        for path in files {
            let invalid = |message: String| EvalDataError::Invalid {
                path: path.clone(),
                message: format!("{message} (is it {}'s {} split?)", self.repo, self.split),
            };
            let parquet_error = |error| EvalDataError::Parquet { path: path.clone(), error };
            let file = File::open(path).map_err(|source| EvalDataError::Io { path: path.clone(), source })?;
            let reader = SerializedFileReader::new(file).map_err(parquet_error)?;
            let schema = reader.metadata().file_metadata().schema_descr().root_schema();
            if !schema.get_fields().iter().any(|field| field.name() == column) {
                return Err(invalid(format!("no `{column}` column")));
            }
            for (row, cells) in reader.into_iter().enumerate() {
                let mut image = None;
                let mut fields = Map::new();
                for (name, field) in cells.map_err(parquet_error)?.into_columns() {
                    if name == column {
                        image = image_bytes(field)
                            .map_err(|message| invalid(format!("row {row}: `{column}` {message}")))?;
                    } else {
                        // The JSON of a cell as pandas' `to_json` writes it (NaN as null).
                        fields.insert(name, field.to_json_value());
                    }
                }
                let image = match image {
                    Some(bytes) => ImageSource::Bytes(bytes),
                    None if required => return Err(invalid(format!("row {row}: `{column}` is empty"))),
                    None => ImageSource::None,
                };
                let record =
                    serde_json::from_value(Value::Object(fields)).map_err(|e| invalid(format!("row {row}: {e}")))?;
                let position = records.len();
                let built =
                    build(position, record, image).map_err(|message| invalid(format!("row {row}: {message}")))?;
                records.push(built);
            }
        }
        Ok(records)
    }
}

/// The encoded file of an image cell; `None` for a null cell.
fn image_bytes(field: Field) -> Result<Option<Vec<u8>>, String> {
    match field {
        Field::Null => Ok(None),
        Field::Bytes(bytes) => Ok(Some(bytes.data().to_vec())),
        Field::Group(image) => match image.into_columns().into_iter().find(|(name, _)| name == "bytes") {
            Some((_, Field::Bytes(bytes))) => Ok(Some(bytes.data().to_vec())),
            Some((_, Field::Null)) => Err("has no embedded bytes, only a path to a file elsewhere".into()),
            _ => Err("is a struct without a binary `bytes` field".into()),
        },
        other => Err(format!("is not an image (a {{bytes, path}} struct or binary): {other}")),
    }
}
